"""Membership inference by loss threshold (Yeom et al., CSF 2018): did this utterance train the model?

The attacker sees a model and an utterance and guesses "member" when the model's loss on it is low: training
drives the loss of training utterances below that of unseen ones, and the gap measures how much the model
memorized. Evaluation runs it on a device's training utterances (members) against held-out utterances of the
same device or population (non-members), without and with DP-SGD.

    * ``auc``: ROC AUC of the score -loss (sklearn's ``roc_auc_score``); 0.5 = the attacker learns nothing,
      1 = the losses separate members perfectly.
    * ``advantage``: Yeom et al.'s membership advantage TPR - FPR at the best threshold, max over thresholds.
      The threshold is chosen on the very losses it is scored on, so this is an optimistic (oracle) attacker:
      an upper bound on what a threshold attacker achieves. (epsilon-DP bounds it by e^epsilon - 1.)
    * Losses are per token (NLL / the utterance's token count) so that long transcripts do not look like
      non-members merely for being long.

Example:
    >>> result = loss_threshold_attack(member_losses=[0.1, 0.2, 0.3], non_member_losses=[0.25, 0.9, 1.2])
    >>> round(result.auc, 3), round(result.advantage, 3), result.threshold
    (0.889, 0.667, 0.2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from shared.data.dataset import Batch
from shared.models.transducer import Transducer

__all__ = ["MembershipAttack", "loss_threshold_attack", "utterance_losses"]


@dataclass(frozen=True)
class MembershipAttack:
    """Result of ``loss_threshold_attack``.

    Attributes:
        auc: ROC AUC of "lower loss = member" (0.5: no leak).
        advantage: max over thresholds of TPR - FPR (Yeom et al.'s membership advantage), in [0, 1].
        threshold: the loss at that best point: utterances with loss <= threshold are called members (the
            strictest such loss on ties; -inf when no threshold beats calling nobody a member).
        members: number of member losses.
        non_members: number of non-member losses.
    """

    auc: float
    advantage: float
    threshold: float
    members: int
    non_members: int


def loss_threshold_attack(
    member_losses: Sequence[float] | np.ndarray, non_member_losses: Sequence[float] | np.ndarray
) -> MembershipAttack:
    """Score the loss-threshold attack on per-utterance losses of members and non-members.

    Raises:
        ValueError: either set is empty, or a loss is not finite.
    """
    members = np.asarray(member_losses, dtype=np.float64).ravel()
    non_members = np.asarray(non_member_losses, dtype=np.float64).ravel()
    for name, losses in (("member_losses", members), ("non_member_losses", non_members)):
        if losses.size == 0:
            raise ValueError(f"{name} is empty: the attack needs members and non-members")
        if not np.isfinite(losses).all():
            raise ValueError(f"{name} has {int((~np.isfinite(losses)).sum())} non-finite value(s)")
    labels = np.concatenate([np.ones(members.size), np.zeros(non_members.size)])
    auc = float(roc_auc_score(labels, -np.concatenate([members, non_members])))  # higher score = member
    # Every distinct loss as a threshold "loss <= t is a member"; TPR - FPR compared in exact integers
    # (tp * N - fp * P), so ties resolve to the strictest threshold rather than by rounding.
    thresholds = np.unique(np.concatenate([members, non_members]))
    true_positives = np.searchsorted(np.sort(members), thresholds, side="right")
    false_positives = np.searchsorted(np.sort(non_members), thresholds, side="right")
    gain = true_positives * non_members.size - false_positives * members.size
    best = int(np.argmax(gain))
    if gain[best] <= 0:  # no threshold beats calling nobody a member
        return MembershipAttack(
            auc=auc, advantage=0.0, threshold=-math.inf, members=int(members.size), non_members=int(non_members.size)
        )
    return MembershipAttack(
        auc=auc,
        advantage=float(gain[best]) / (members.size * non_members.size),
        threshold=float(thresholds[best]),
        members=int(members.size),
        non_members=int(non_members.size),
    )


@torch.no_grad()
def utterance_losses(model: Transducer, batches: Sequence[Batch]) -> dict[str, float]:
    """utterance id -> per-token transducer loss (NLL / tokens) of ``model`` in eval mode, as an attacker sees it.

    The model's mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        losses: dict[str, float] = {}
        for batch in batches:
            out = model(batch.feats, batch.feat_lens, batch.targets, batch.target_lens)
            per_token = out.loss_per_utt / batch.target_lens.clamp(min=1).to(out.loss_per_utt.dtype)
            losses.update({uid: float(loss) for uid, loss in zip(batch.ids, per_token.tolist(), strict=True)})
    finally:
        model.train(was_training)
    bad = [uid for uid, loss in losses.items() if not math.isfinite(loss)]
    if bad:
        raise FloatingPointError(f"non-finite loss for {len(bad)} utterance(s), e.g. {bad[:3]}")
    return losses
