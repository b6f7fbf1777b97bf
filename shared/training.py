"""The training step and the scoring loop that central pretraining, devices and the server all share.

Plain PyTorch, no Flower: a device's local fine-tuning, `chorus train` and the server's held-out evaluation
call these same functions, so a model is trained and scored the same way wherever it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import Tensor, nn

from shared.config import TrainConfig
from shared.data.corpora import Utterance
from shared.data.dataset import Batch, FeatureCache, concatenate_neighbours, make_batches
from shared.data.features import augment, prepend_silence
from shared.data.tokenizer import Tokenizer
from shared.metrics import ErrorCounts, error_counts
from shared.models.transducer import Transducer

__all__ = ["Reweighter", "StepStats", "mean_loss", "train_recipe", "train_steps", "transcribe", "score"]

# Transducer gradients spike early in training; clipping keeps a few local steps from wrecking a good model.
GRAD_CLIP_NORM = 5.0
MAX_PAUSE_FRAMES = 100  # the longest pause between joined utterances (concat_prob): 1 s


@dataclass(frozen=True)
class StepStats:
    loss: float  # mean per-token transducer loss over the steps taken
    steps: int
    utterances: int  # utterance visits (with repeats) that produced gradients
    compute_cost: float  # mean expected encoder compute share (1.0 for dense encoders)
    penalty: float = 0.0  # mean value of the ``penalty`` hook (e.g. EWC) over the steps taken; 0 without one


class Reweighter(Protocol):
    """Per-utterance loss weights for ``train_steps`` (e.g. ``shared.fairness.arw.AdversarialReweighter``).

    Called once per step with the (unaugmented) batch and the (B,) per-utterance transducer NLL; returns (B,)
    weights (used detached). It may update its own state, e.g. take an adversary step, inside the call.
    """

    def __call__(self, batch: Batch, losses: Tensor) -> Tensor: ...


def on_device(batch: Batch, device: torch.device) -> Batch:
    """The batch's tensors on ``device`` (the model's); a no-op on the CPU."""
    if device.type == "cpu":
        return batch
    return replace(
        batch,
        feats=batch.feats.to(device),
        feat_lens=batch.feat_lens.to(device),
        targets=batch.targets.to(device),
        target_lens=batch.target_lens.to(device),
    )


def cycle(batches: Sequence[Batch]) -> Iterator[Batch]:
    if not batches:
        raise ValueError("no training batches: every utterance was skipped or the device has no data")
    while True:
        yield from batches


def train_recipe(train: TrainConfig, seed: int) -> dict[str, Any]:
    """``train_steps``' augmentation and objective keywords as the run config's ``train.*`` sets them, SpecAugment
    seeded by ``seed``: every trainer of a run config (device, central, the central bound) trains alike."""
    return {
        "spec_augment_seed": seed if train.spec_augment else None,
        "lead_silence_frames": train.lead_silence_frames,
        "lead_silence_prob": train.lead_silence_prob,
        "concat_prob": train.concat_prob,
        "compute_weight": train.compute_weight,
        "ctc_weight": train.ctc_weight,
        "fastemit_lambda": train.fastemit_lambda,
    }


def train_steps(
    model: Transducer,
    batches: Sequence[Batch],
    *,
    steps: int,
    optimizer: torch.optim.Optimizer,
    spec_augment_seed: int | None = 0,
    lead_silence_frames: int = 0,
    lead_silence_prob: float = 1.0,
    concat_prob: float = 0.0,
    compute_weight: float = 0.0,
    ctc_weight: float = 0.0,
    fastemit_lambda: float = 0.0,
    penalty: Callable[[nn.Module], Tensor] | None = None,
    reweighter: Reweighter | None = None,
) -> StepStats:
    """``steps`` optimizer steps cycling over ``batches``; SpecAugment unless ``spec_augment_seed`` is None, and
    with it: each utterance followed by its batch neighbour with probability ``concat_prob``
    (``concatenate_neighbours``, pauses up to 1 s), then, with probability ``lead_silence_prob``,
    U{0..``lead_silence_frames``} frames of its noise floor before it (``prepend_silence``).

    Objective per batch, with L_i the transducer NLL of utterance i and N the batch's target tokens:

        sum_i w_i * (L_i + ctc_weight * C_i) / N  +  compute_weight * expected compute share  +  penalty(model)

    * C_i is the auxiliary CTC loss of utterance i (``Transducer.forward(ctc=True)``) and ``fastemit_lambda``
      FastEmit's gradient scale on label emissions; both make emissions peaky enough for greedy search.

    * w_i = 1 without a ``reweighter``, so the first term is the per-token loss (its scale does not depend on
      batch composition); with one, w = ``reweighter(batch, L)`` (detached), e.g. ARL weights.
    * the compute term is Xie et al.'s compute-cost loss (only the amortized encoder's cost depends on weights).
    * ``penalty`` is any regularizer of the parameters, e.g. ``shared.fairness.ewc.EWCPenalty``. Under plain SGD a
      penalty with a ``proximal_step(model, lr)`` (EWC's) is not differentiated but applied after each step,
      implicitly: its explicit gradient step diverges where lr x curvature > 2.

    ``StepStats.loss`` is always the unweighted per-token loss, comparable with and without the hooks.
    """
    model.train()
    device = next(model.parameters()).device
    # SpecAugment masks are drawn on the CPU, so a seed gives the same masks whichever device trains.
    generator = torch.Generator().manual_seed(spec_augment_seed) if spec_augment_seed is not None else None
    total_loss, total_cost, total_penalty, visits = 0.0, 0.0, 0.0, 0
    plain_sgd = type(optimizer) is torch.optim.SGD and not optimizer.defaults.get("momentum")
    proximal = getattr(penalty, "proximal_step", None) if plain_sgd else None
    source = cycle(batches)
    for _ in range(steps):
        batch = next(source)
        augmented = batch
        if generator is not None:
            if concat_prob > 0:
                augmented = concatenate_neighbours(augmented, prob=concat_prob, max_pause=MAX_PAUSE_FRAMES, generator=generator)
            feats, feat_lens = augment(
                augmented.feats,
                augmented.feat_lens,
                lead_frames=lead_silence_frames,
                lead_prob=lead_silence_prob,
                generator=generator,
            )
            augmented = replace(augmented, feats=feats, feat_lens=feat_lens)
        moved = on_device(augmented, device)  # the reweighter sees ``batch``, unaugmented
        out = model(
            moved.feats, moved.feat_lens, moved.targets, moved.target_lens, fastemit_lambda=fastemit_lambda, ctc=ctc_weight > 0
        )
        tokens = moved.target_lens.sum().clamp(min=1)
        loss = out.loss_per_utt.sum() / tokens
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"non-finite transducer loss {loss.item()} on batch {batch.ids[:3]}...")
        per_utt = out.loss_per_utt
        if out.ctc_loss_per_utt is not None:
            per_utt = per_utt + ctc_weight * out.ctc_loss_per_utt
        objective = per_utt.sum() / tokens
        if reweighter is not None:
            weights = reweighter(batch, out.loss_per_utt).detach().to(out.loss_per_utt)
            if weights.shape != out.loss_per_utt.shape:
                raise ValueError(
                    f"reweighter returned weights of shape {tuple(weights.shape)} for a batch of {len(batch.ids)} utterances"
                )
            objective = (weights * per_utt).sum() / tokens
        objective = objective + compute_weight * out.compute_cost
        if penalty is not None:
            with torch.set_grad_enabled(proximal is None):  # taken implicitly: its value is only reported
                penalty_value = penalty(model)
            if proximal is None:
                objective = objective + penalty_value
            total_penalty += float(penalty_value.detach())
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        optimizer.step()
        if proximal is not None:
            proximal(model, optimizer.param_groups[0]["lr"])
        total_loss += loss.item()
        total_cost += float(out.compute_cost.detach())
        visits += len(batch.ids)
    return StepStats(
        loss=total_loss / max(steps, 1),
        steps=steps,
        utterances=visits,
        compute_cost=total_cost / max(steps, 1),
        penalty=total_penalty / max(steps, 1),
    )


@torch.no_grad()
def mean_loss(model: Transducer, batches: Sequence[Batch]) -> float:
    """The per-token transducer loss of ``model`` over ``batches``, in eval mode and without augmentation: how well
    the model fits these utterances (Power-of-Choice ranks devices by it)."""
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for batch in batches:
        moved = on_device(batch, device)
        total += float(model(moved.feats, moved.feat_lens, moved.targets, moved.target_lens).loss_per_utt.sum())
        tokens += int(batch.target_lens.sum())
    if tokens == 0:
        raise ValueError("no target tokens: every utterance was skipped or there is no data")
    return total / tokens


@torch.no_grad()
def transcribe(model: Transducer, batches: Sequence[Batch], tokenizer: Tokenizer, *, beam: int = 1) -> dict[str, str]:
    """utterance id -> hypothesis text (greedy search for beam=1, beam search otherwise)."""
    model.eval()
    device = next(model.parameters()).device
    hyps: dict[str, str] = {}
    for batch in batches:
        batch = on_device(batch, device)
        if beam == 1:
            tokens = model.greedy_search(batch.feats, batch.feat_lens)
        else:
            tokens = model.beam_search(batch.feats, batch.feat_lens, beam=beam)
        hyps.update({uid: tokenizer.decode(t) for uid, t in zip(batch.ids, tokens)})
    return hyps


def score(
    model: Transducer,
    utterances: Sequence[Utterance],
    *,
    features: FeatureCache,
    tokenizer: Tokenizer,
    beam: int = 1,
    batch_frames: int = 8000,
    lead_frames: int = 0,
) -> tuple[ErrorCounts, dict[str, ErrorCounts]]:
    """Decode ``utterances`` and count word errors: (all together, per utterance id). With ``lead_frames``, each
    utterance is decoded with that many frames of its noise floor before it (``prepend_silence``, fixed seed)."""
    batches = make_batches(utterances, features=features, tokenizer=tokenizer, max_frames=batch_frames, shuffle=False, seed=0)
    if lead_frames > 0:
        generator = torch.Generator().manual_seed(0)
        padded = [
            prepend_silence(b.feats, b.feat_lens, torch.full_like(b.feat_lens, lead_frames), generator=generator) for b in batches
        ]
        batches = [replace(b, feats=feats, feat_lens=lens) for b, (feats, lens) in zip(batches, padded, strict=True)]
    hyps = transcribe(model, batches, tokenizer, beam=beam)
    per_utt = {u.id: error_counts([u.text], [hyps[u.id]]) for u in utterances if u.id in hyps}
    total = ErrorCounts(0, 0, 0)
    for counts in per_utt.values():
        total = total + counts
    return total, per_utt
