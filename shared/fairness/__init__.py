"""Fairness without demographics: cohorts (federated k-means on speaker embeddings, disaggregated WER),
EWC against forgetting (Trinh et al.), and adversarial reweighting (ARL / ARW).

Plain numpy / PyTorch, no Flower: a ClientApp or ServerApp calls these functions and only wraps their
arrays and scalars into records. Import the submodules directly (``shared.fairness.cohorts``, ``.ewc``,
``.arw``); nothing is imported here, so loading one does not load the others' dependencies.
"""
