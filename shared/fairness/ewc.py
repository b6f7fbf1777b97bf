"""Elastic weight consolidation (EWC) against forgetting while fine-tuning on the worst cohorts (Trinh et al.).

Trinh et al. (arXiv 2207.07850) fine-tune an ASR model on its worst geographic regions with an EWC penalty so
that the other regions are not forgotten. The penalty anchors every parameter theta to its value theta*
before fine-tuning, in proportion to that parameter's diagonal Fisher information F:

    penalty(theta) = lam * sum_i F_i * (theta_i - theta*_i)^2

We estimate F with the common diagonal empirical Fisher: the mean over minibatches of the squared gradient of
the minibatch's per-token transducer loss (the loss ``train_steps`` minimizes). Squared minibatch gradients
are not the per-example Fisher (they are smaller by about the batch size in their noise part), but the
difference is a per-model scale that ``lam`` absorbs; they cost one backward pass per batch and need no
per-sample gradients. (The factor 1/2 of Kirkpatrick et al.'s form is folded into ``lam`` too.)

Federated use: each device returns ``fisher_sums`` on its own data (sums of squared gradients and the number
of batches, which SecAgg+ can add), and the server divides the summed sums by the summed count
(``fisher_from_sums``). The anchor is the global model that fine-tuning starts from.

Legend: every tensor of a Fisher dict or an anchor dict has the shape of the model parameter of the same
name (``model.named_parameters()``).

Example:
    >>> model = torch.nn.Linear(3, 1)
    >>> batches = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(2)]
    >>> mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
    >>> sums = fisher_sums(model, batches, loss_fn=mse)
    >>> sums.count, sorted(sums.sums)
    (2, ['bias', 'weight'])
    >>> penalty = EWCPenalty.from_model(model, fisher_from_sums(sums.sums, sums.count), lam=10.0)
    >>> float(penalty(model).detach())
    0.0
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from shared.data.dataset import Batch

__all__ = ["EWCPenalty", "FisherSums", "add_fisher_sums", "fisher_from_sums", "fisher_sums", "transducer_loss"]


def transducer_loss(model: nn.Module, batch: Batch) -> Tensor:
    """The per-token transducer loss of one batch: summed NLL / target tokens (as in ``train_steps``)."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    out = model(batch.feats, batch.feat_lens, batch.targets, batch.target_lens)
    return out.loss_per_utt.sum() / batch.target_lens.sum().clamp(min=1)


@dataclass(frozen=True)
class FisherSums:
    """Summed squared minibatch gradients and how many minibatches they cover.

    Attributes:
        sums: parameter name -> sum over minibatches of grad^2 (float32, on the CPU).
        count: number of minibatches summed.
    """

    sums: dict[str, Tensor]
    count: int


def fisher_sums(
    model: nn.Module, batches: Iterable[Any], *, loss_fn: Callable[[nn.Module, Any], Tensor] = transducer_loss
) -> FisherSums:
    """Sum of squared gradients of ``loss_fn(model, batch)`` over ``batches``, for every trainable parameter.

    The model runs in eval mode (no dropout: the Fisher of the model itself, not of a dropout sample; the
    previous mode is restored), gradients are taken with ``torch.autograd.grad`` so ``.grad`` fields are left
    untouched, and a parameter the loss does not reach gets zeros.

    Args:
        model: e.g. a ``Transducer``.
        batches: what ``loss_fn`` takes (``Batch`` for the default).
        loss_fn: (model, batch) -> scalar loss; default ``transducer_loss``.

    Returns:
        ``FisherSums``; the Fisher estimate is ``fisher_from_sums(result.sums, result.count)``.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    sums = {name: torch.zeros(p.shape, dtype=torch.float32) for name, p in named}
    count = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            loss = loss_fn(model, batch)
            if loss.dim() != 0 or not torch.isfinite(loss):
                raise ValueError(f"loss_fn must return a finite scalar, got {loss.detach()} (shape {tuple(loss.shape)})")
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            for (name, _), grad in zip(named, grads, strict=True):
                if grad is not None:
                    sums[name] += grad.detach().float().cpu().square()
            count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("fisher_sums needs at least one batch")
    return FisherSums(sums=sums, count=count)


def add_fisher_sums(parts: Sequence[FisherSums]) -> FisherSums:
    """The sum of several devices' ``FisherSums`` (what the server gets from SecAgg+)."""
    if not parts:
        raise ValueError("add_fisher_sums needs at least one part")
    names = set(parts[0].sums)
    for i, part in enumerate(parts[1:], start=1):
        if set(part.sums) != names:
            raise ValueError(f"part {i} has parameters {sorted(set(part.sums) ^ names)[:5]} that part 0 does not share")
    return FisherSums(
        sums={name: sum((part.sums[name] for part in parts), torch.zeros_like(parts[0].sums[name])) for name in parts[0].sums},
        count=sum(part.count for part in parts),
    )


def fisher_from_sums(sums: Mapping[str, Tensor], count: float) -> dict[str, Tensor]:
    """The diagonal empirical Fisher: summed squared gradients / number of minibatches.

    Args:
        sums: name -> summed squared gradients (summed over devices as well).
        count: total minibatches behind ``sums`` (> 0).
    """
    if not count > 0:
        raise ValueError(f"count must be positive, got {count}")
    negative = [name for name, value in sums.items() if bool((value < 0).any())]
    if negative:  # noise added for privacy can do this; clip it before building a penalty
        raise ValueError(f"Fisher sums of {negative[:5]} have negative entries: clamp noisy sums at 0 first")
    return {name: value / count for name, value in sums.items()}


class EWCPenalty:
    """``lam * sum_i F_i * (theta_i - theta*_i)^2`` over the parameters named in ``fisher``.

    Call it on the model being fine-tuned to get a scalar tensor to add to the loss (``train_steps``'s
    ``penalty`` hook). Its gradient with respect to theta_i is ``2 * lam * F_i * (theta_i - theta*_i)``.
    """

    def __init__(self, anchor_params: Mapping[str, Tensor], fisher: Mapping[str, Tensor], lam: float) -> None:
        """
        Args:
            anchor_params: name -> theta* (e.g. the global model before fine-tuning); every Fisher name needs one.
            fisher: name -> F, same shapes (parameters without an entry are not anchored).
            lam: the penalty weight (>= 0).
        """
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        missing = sorted(set(fisher) - set(anchor_params))
        if missing:
            raise ValueError(f"Fisher entries {missing[:5]} have no anchor parameter")
        wrong = [
            f"{name}: anchor {tuple(anchor_params[name].shape)} vs Fisher {tuple(f.shape)}"
            for name, f in fisher.items()
            if anchor_params[name].shape != f.shape
        ]
        if wrong:
            raise ValueError(f"anchor and Fisher shapes differ: {wrong[:5]}")
        self.lam = float(lam)
        self.anchor = {name: anchor_params[name].detach().clone() for name in fisher}
        self.fisher = {name: f.detach().clone() for name, f in fisher.items()}

    @classmethod
    def from_model(cls, model: nn.Module, fisher: Mapping[str, Tensor], lam: float) -> EWCPenalty:
        """Anchor at ``model``'s current parameters."""
        return cls(dict(model.named_parameters()), fisher, lam)

    def __call__(self, model: nn.Module) -> Tensor:
        params = dict(model.named_parameters())
        missing = sorted(set(self.fisher) - set(params))
        if missing:
            raise ValueError(f"{type(model).__name__} has no parameters {missing[:5]} that the penalty anchors")
        reference = next(iter(params.values()))
        total = reference.new_zeros(())
        for name, fisher in self.fisher.items():
            theta = params[name]
            if theta.shape != fisher.shape:
                raise ValueError(f"parameter {name} has shape {tuple(theta.shape)}, the penalty expects {tuple(fisher.shape)}")
            if fisher.device != theta.device:  # move once, on first use on a new device
                self.fisher[name] = fisher = fisher.to(theta.device)
                self.anchor[name] = self.anchor[name].to(theta.device)
            total = total + (fisher * (theta - self.anchor[name]).square()).sum()
        return self.lam * total

    @torch.no_grad()
    def proximal_step(self, model: nn.Module, lr: float) -> None:
        """The penalty's part of a plain SGD step at ``lr``, taken implicitly: theta_i <- theta*_i + (theta_i -
        theta*_i) / (1 + 2 lr lam F_i), the exact minimizer of ``|theta' - theta|^2 / (2 lr) + penalty(theta')``.

        An explicit step multiplies theta_i - theta*_i by 1 - 2 lr lam F_i, which overshoots the anchor when
        lr lam F_i > 1 and diverges when it exceeds 2: at SGD's lr 0.1 and lam 10 that is every coordinate with
        F_i > 1, 16% of the shipped base's normalized Fisher (README: fairness). The implicit step shrinks every
        coordinate toward its anchor, however large lr lam F_i.
        """
        params = dict(model.named_parameters())
        for name, fisher in self.fisher.items():
            theta, anchor = params[name], self.anchor[name]
            theta.copy_(anchor + (theta - anchor) / (1.0 + 2.0 * lr * self.lam * fisher.to(theta.device)))
