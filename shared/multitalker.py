"""Two-talker recognition with ``SeparatorTransducer``: references with turn tokens, training, decoding, scoring.

The systems share everything here but their references (``kind``):

* ``sts`` (separator-transducer-segmenter, two channels): turns are routed to channels by heuristic error
  assignment (HEAT, Sklyar et al. 2021: in order of start time, each turn takes the first channel that is free),
  and each turn is ``<sot> words <eot>`` in its channel.
* ``sts-talker`` (the same model, routed by talker): each talker's turns in a channel of their own, the talker who
  speaks first on channel 0; a channel follows one voice instead of HEAT's "first free channel", which sends a
  talker's turns to either channel depending on whether they overlapped.
* ``mt-rnnt`` (the MT-RNN-T baseline of the issue, one channel): all turns serialized in order of start time,
  ``<sc>`` between consecutive turns.

Scoring (``score_sessions``), per session:

* **WER** over the reference streams (``routed_channels``: HEAT's channels for ``sts``, the talkers' for
  ``sts-talker``, the one serialized stream for ``mt-rnnt``), with the permutation of hypothesis channels that makes
  the fewest errors; turn tokens are not words. Every system is scored against the same reference words.
* **Turn counting**: the session is right when the number of turns found (two channels: ``<sot>`` emitted;
  ``mt-rnnt``: one more than the ``<sc>`` emitted, when any word was) equals the reference's.
* **Timing** (two channels): in each channel, the k-th ``<sot>`` / ``<eot>`` is matched with the k-th turn routed
  there; an emission at encoder frame f is available when the audio up to ``(4 f + 7) * 10 ms`` has arrived (the causal
  front end's receptive field), and its error is that time minus the turn's start / end of speech. End-of-turn
  **latency** is the ``<eot>`` error (signed: negative is before the talker stops). For ``mt-rnnt``, the k-th
  ``<sc>`` is matched with the start of turn k + 1.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import torch
from torch import Tensor

from shared.config import ModelConfig
from shared.data.audio import load_audio
from shared.data.features import GlobalCMVN, compute_fbank, spec_augment
from shared.data.mix import Session, Turn
from shared.data.tokenizer import Tokenizer
from shared.files import torch_save_atomic
from shared.models.checkpoint import CheckpointError, Frontend, build_model, read_payload, saveable_state
from shared.models.separator_transducer import SeparatorConfig, SeparatorTransducer, extended_vocabulary
from shared.models.transformer import ConvSubsampling

__all__ = [
    "KINDS",
    "SHIPPED_MULTITALKER",
    "SessionBatch",
    "decode_sessions",
    "heat_channels",
    "routed_channels",
    "load_multitalker",
    "make_session_batches",
    "references",
    "save_multitalker",
    "score_sessions",
    "session_features",
    "train_sessions",
]

KINDS = ("sts", "sts-talker", "mt-rnnt")
SHIPPED_MULTITALKER = "sts-2.pt"  # the separator-transducer-segmenter in shared/models/shipped/
_FORMAT = "chorus-multitalker-v1"
GRAD_CLIP_NORM = 5.0
OVERLAP_BUCKETS = ((0.0, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 1.0))


def channels_of(kind: str) -> int:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return 1 if kind == "mt-rnnt" else 2


def routed_channels(turns: Sequence[Turn], kind: str) -> list[list[Turn]]:
    """The reference streams of ``kind``: HEAT's two channels (``sts``), one channel per talker, the first to speak
    on channel 0 (``sts-talker``), or every turn in one stream (``mt-rnnt``); each in order of start time."""
    if channels_of(kind) == 1:
        return [sorted(turns, key=lambda t: t.start)]
    if kind == "sts":
        return heat_channels(turns, 2)
    ordered = sorted(turns, key=lambda t: t.start)
    first = ordered[0].talker if ordered else 0
    return [[t for t in ordered if t.talker == first], [t for t in ordered if t.talker != first]]


def heat_channels(turns: Sequence[Turn], channels: int) -> list[list[Turn]]:
    """Turns routed to ``channels`` channels: in order of start time, each to the first channel free by its start
    (the one that frees first when none is)."""
    free_at = [-math.inf] * channels
    routed: list[list[Turn]] = [[] for _ in range(channels)]
    for turn in sorted(turns, key=lambda t: t.start):
        free = [c for c in range(channels) if free_at[c] <= turn.start]
        c = free[0] if free else int(np.argmin(free_at))
        routed[c].append(turn)
        free_at[c] = turn.end
    return routed


def references(session: Session, tokenizer: Tokenizer, kind: str) -> list[list[int]]:
    """Per channel, the token ids the model must emit for ``session``."""
    return [[token for token, _ in channel] for channel in _anchored_references(session, tokenizer, kind)]


def _anchored_references(session: Session, tokenizer: Tokenizer, kind: str) -> list[list[tuple[int, float]]]:
    """Per channel, (token id, the encoder frame it is anchored to): a turn token's is the frame at which its event
    (the turn's first or last speech; for ``<sc>`` the next talker's first) becomes audible; a word's is NaN."""
    ids = extended_vocabulary(tokenizer.vocab_size)

    def words(turn: Turn) -> list[tuple[int, float]]:
        return [(piece, math.nan) for piece in tokenizer.encode(turn.text)]

    channels = routed_channels(session.turns, kind)
    if channels_of(kind) == 2:
        return [
            [
                pair
                for turn in channel
                for pair in [(ids["<sot>"], anchor_frame(turn.start)), *words(turn), (ids["<eot>"], anchor_frame(turn.end))]
            ]
            for channel in channels
        ]
    stream: list[tuple[int, float]] = []
    for i, turn in enumerate(channels[0]):
        stream += ([(ids["<sc>"], anchor_frame(turn.start))] if i else []) + words(turn)
    return [stream]


@dataclass(frozen=True)
class SessionBatch:
    ids: list[str]
    feats: Tensor  # (B, T, F)
    feat_lens: Tensor  # (B,)
    targets: Tensor  # (C, B, U)
    target_lens: Tensor  # (C, B)
    turn_frames: Tensor  # (C, B, U) the encoder frame each turn token is anchored to; NaN for words and padding


def session_features(sessions: Sequence[Session], cmvn: GlobalCMVN) -> dict[str, np.ndarray]:
    """session id -> (T, F) normalized fbank of its audio."""
    return {s.id: cmvn.apply(compute_fbank(load_audio(s.audio, resample=True))).astype(np.float32) for s in sessions}


def make_session_batches(
    sessions: Sequence[Session],
    features: dict[str, np.ndarray],
    tokenizer: Tokenizer,
    kind: str,
    *,
    max_frames: int,
    shuffle: bool,
    seed: int,
) -> list[SessionBatch]:
    """Batches of sessions of similar length, at most ``max_frames`` padded feature frames each (B x T)."""
    order = sorted(sessions, key=lambda s: features[s.id].shape[0])
    groups: list[list[Session]] = [[]]
    for session in order:
        longest = features[session.id].shape[0]
        if groups[-1] and longest * (len(groups[-1]) + 1) > max_frames:
            groups.append([])
        groups[-1].append(session)
    batches = [_collate(g, features, tokenizer, kind) for g in groups if g]
    if shuffle:
        np.random.default_rng(seed).shuffle(batches)
    return batches


def _collate(group: list[Session], features: dict[str, np.ndarray], tokenizer: Tokenizer, kind: str) -> SessionBatch:
    feats = [torch.from_numpy(features[s.id]) for s in group]
    refs = [_anchored_references(s, tokenizer, kind) for s in group]
    channels = channels_of(kind)
    longest = max(1, max(len(r[c]) for r in refs for c in range(channels)))
    targets = torch.zeros(channels, len(group), longest, dtype=torch.long)
    target_lens = torch.zeros(channels, len(group), dtype=torch.long)
    turn_frames = torch.full((channels, len(group), longest), math.nan)
    for b, ref in enumerate(refs):
        for c in range(channels):
            if ref[c]:
                tokens, anchors = zip(*ref[c], strict=True)
                targets[c, b, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                turn_frames[c, b, : len(anchors)] = torch.tensor(anchors)
            target_lens[c, b] = len(ref[c])
    return SessionBatch(
        ids=[s.id for s in group],
        feats=torch.nn.utils.rnn.pad_sequence(feats, batch_first=True),
        feat_lens=torch.tensor([f.shape[0] for f in feats]),
        targets=targets,
        target_lens=target_lens,
        turn_frames=turn_frames,
    )


def train_sessions(
    model: SeparatorTransducer,
    batches: Sequence[SessionBatch],
    *,
    steps: int,
    peak_lr: float,
    warmup: int,
    turn_penalty: float,
    seed: int,
    log_every: int = 0,
    activity_weight: float = 0.0,
) -> list[dict[str, float]]:
    """``steps`` AdamW steps cycling over ``batches`` (SpecAugment, warm-up then cosine decay to 5% of
    ``peak_lr``); objective: the channels' transducer loss per target token, with the turn-token latency penalty
    ``turn_penalty`` (``SeparatorTransducer.forward``), plus ``activity_weight`` x the **turn-activity loss**: a
    linear head on each channel's frames predicts, frame by frame, whether a turn of that channel is under way
    (``SeparatorTransducer.turn_activity``), binary cross-entropy averaged over the valid frames. It tells the
    separator at every frame which channel a talker belongs to, where the transducer loss says it only through
    the words; the head is for training and is dropped with it. Trains on whatever device ``model`` is on.
    Returns the loss every ``log_every`` steps (never when 0); with the head, also its loss alone."""
    if not batches:
        raise ValueError("no training sessions")
    if activity_weight < 0:
        raise ValueError(f"activity_weight must be >= 0, got {activity_weight}")
    device = next(model.parameters()).device
    head = torch.nn.Linear(int(model.transducer.encoder.output_dim), 1).to(device) if activity_weight else None
    parameters = [*model.parameters(), *(head.parameters() if head is not None else ())]
    optimizer = torch.optim.AdamW(parameters, lr=peak_lr, weight_decay=1e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    log: list[dict[str, float]] = []
    running, running_activity, began = 0.0, 0.0, time.perf_counter()
    for step in range(steps):
        if step < warmup:
            lr = peak_lr * (step + 1) / warmup
        else:
            progress = (step - warmup) / max(1, steps - warmup)
            lr = peak_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = batches[step % len(batches)]
        feats = spec_augment(batch.feats, batch.feat_lens, generator=generator)  # masks drawn on the CPU: any device
        targets, turn_frames = batch.targets.to(device), batch.turn_frames.to(device)
        frames, lengths = model.channel_frames(feats.to(device), batch.feat_lens.to(device))
        losses = model.frames_loss(
            frames, lengths, targets, batch.target_lens.to(device), turn_frames=turn_frames, turn_penalty=turn_penalty
        )
        loss = losses.sum() / batch.target_lens.sum().clamp(min=1)
        activity = loss.new_zeros(())
        if head is not None:
            valid = (torch.arange(frames.shape[1], device=device) < lengths[:, None]).to(frames.dtype)  # (C * B, T')
            truth = model.turn_activity(targets, turn_frames, frames.shape[1])
            bce = torch.nn.functional.binary_cross_entropy_with_logits(head(frames).squeeze(-1), truth, reduction="none")
            activity = (bce * valid).sum() / valid.sum().clamp(min=1)
        total = loss + activity_weight * activity
        if not math.isfinite(total.item()):
            raise FloatingPointError(f"non-finite loss {total.item()} at step {step} on sessions {batch.ids[:3]}")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(parameters, GRAD_CLIP_NORM)
        optimizer.step()
        running += loss.item()
        running_activity += activity.item()
        if log_every and (step + 1) % log_every == 0:
            entry = {"step": step + 1, "loss": running / log_every, "seconds": time.perf_counter() - began}
            if head is not None:
                entry["activity_loss"] = running_activity / log_every
            log.append(entry)
            running, running_activity = 0.0, 0.0
    return log


@torch.no_grad()
def decode_sessions(
    model: SeparatorTransducer, batches: Sequence[SessionBatch], *, beam: int = 1
) -> dict[str, list[tuple[list[int], list[int]]]]:
    """session id -> per channel (token ids, encoder frame of each), by greedy search (``beam`` 1) or modified
    beam search."""
    model.eval()
    out: dict[str, list[tuple[list[int], list[int]]]] = {}
    for batch in batches:
        decoded = (
            model.greedy_search(batch.feats, batch.feat_lens)
            if beam == 1
            else model.beam_search(batch.feats, batch.feat_lens, beam=beam)
        )
        out.update(zip(batch.ids, decoded, strict=True))
    return out


def emission_seconds(frame: int) -> float:
    """When the audio an encoder frame needs has all arrived: the end of its receptive field."""
    return (ConvSubsampling.factor * frame + ConvSubsampling.receptive_field) / 100.0


def anchor_frame(seconds: float) -> float:
    """The inverse of ``emission_seconds``: the (fractional) encoder frame whose receptive field ends at ``seconds``."""
    return (100.0 * seconds - ConvSubsampling.receptive_field) / ConvSubsampling.factor


def _words(tokens: Sequence[int], tokenizer: Tokenizer) -> list[str]:
    pieces = [t for t in tokens if t < tokenizer.vocab_size]
    return tokenizer.decode(pieces).split() if pieces else []


def _errors(reference: list[str], hypothesis: list[str]) -> int:
    if not reference:
        return len(hypothesis)
    if not hypothesis:
        return len(reference)
    out = jiwer.process_words(" ".join(reference), " ".join(hypothesis))
    return int(out.substitutions + out.deletions + out.insertions)


def score_sessions(
    sessions: Sequence[Session],
    hypotheses: dict[str, list[tuple[list[int], list[int]]]],
    tokenizer: Tokenizer,
    kind: str,
) -> dict[str, Any]:
    """WER, turn counting and timing over ``sessions`` (see the module docstring), overall and by overlap bucket,
    and each session's word errors."""
    ids = extended_vocabulary(tokenizer.vocab_size)
    rows: list[dict[str, Any]] = []
    for session in sessions:
        channels = routed_channels(session.turns, kind)
        refs = [[w for turn in channel for w in turn.text.split()] for channel in channels]
        hyps = hypotheses[session.id]
        words = [_words(tokens, tokenizer) for tokens, _ in hyps]
        errors, best = min(
            (sum(_errors(refs[c], words[p[c]]) for c in range(len(refs))), p) for p in itertools.permutations(range(len(hyps)))
        )
        starts: list[float] = []
        ends: list[float] = []
        if channels_of(kind) == 2:
            found = sum(tokens.count(ids["<sot>"]) for tokens, _ in hyps)
            for c, channel in enumerate(channels):
                tokens, frames = hyps[best[c]]
                sot = [emission_seconds(f) for t, f in zip(tokens, frames, strict=True) if t == ids["<sot>"]]
                eot = [emission_seconds(f) for t, f in zip(tokens, frames, strict=True) if t == ids["<eot>"]]
                starts += [s - turn.start for s, turn in zip(sot, channel, strict=False)]
                ends += [e - turn.end for e, turn in zip(eot, channel, strict=False)]
        else:
            tokens, frames = hyps[0]
            found = (tokens.count(ids["<sc>"]) + 1) if _words(tokens, tokenizer) else 0
            sc = [emission_seconds(f) for t, f in zip(tokens, frames, strict=True) if t == ids["<sc>"]]
            starts += [s - turn.start for s, turn in zip(sc, channels[0][1:], strict=False)]
        rows.append(
            {
                "overlap": session.overlap,
                "errors": errors,
                "words": sum(len(r) for r in refs),
                "turns_right": found == len(session.turns),
                "start_errors": starts,
                "end_errors": ends,
            }
        )

    def summary(selected: list[dict[str, Any]]) -> dict[str, Any]:
        words = sum(r["words"] for r in selected)
        starts = [abs(x) for r in selected for x in r["start_errors"]]
        ends = [x for r in selected for x in r["end_errors"]]
        return {
            "sessions": len(selected),
            "words": words,
            "wer": sum(r["errors"] for r in selected) / words if words else None,
            "turn_counting_accuracy": sum(r["turns_right"] for r in selected) / len(selected) if selected else None,
            "turn_start_abs_error_ms": {
                "median": 1000 * float(np.median(starts)) if starts else None,
                "matched": len(starts),
            },
            "end_of_turn_latency_ms": {
                "median": 1000 * float(np.median(ends)) if ends else None,
                "p90": 1000 * float(np.percentile(ends, 90)) if ends else None,
                "matched": len(ends),
            },
        }

    by_overlap = {
        f"{int(100 * low)}-{int(100 * min(high, 0.4))}%": summary([r for r in rows if low <= r["overlap"] < high])
        for low, high in OVERLAP_BUCKETS
    }
    return {
        "all": summary(rows),
        "overlap<=20%": summary([r for r in rows if r["overlap"] <= 0.2]),
        "by_overlap": by_overlap,
        "session_errors": [r["errors"] for r in rows],  # in the order of ``sessions``: for paired comparisons
    }


def save_multitalker(
    path: Path | str,
    model: SeparatorTransducer,
    base_config: ModelConfig,
    kind: str,
    *,
    frontend: Frontend,
    dtype: torch.dtype | None = None,
    **meta: Any,
) -> Path:
    """Atomically write a multi-talker model: weights, the base's model config, the separator config, the kind
    and the front end (tokenizer, CMVN)."""
    state = saveable_state(model, Path(path), dtype)
    payload = {
        "format": _FORMAT,
        "kind": kind,
        "model_config": dataclasses.asdict(base_config),
        "separator": dataclasses.asdict(model.config),
        "state_dict": state,
        "meta": {**meta, "frontend": frontend.to_meta()},
    }
    return torch_save_atomic(path, payload)


def load_multitalker(path: Path | str) -> tuple[SeparatorTransducer, str, Frontend, dict[str, Any]]:
    """(model in eval mode, kind, front end, meta) of a ``save_multitalker`` file; CheckpointError naming the file
    when it is missing or not one."""
    path = Path(path)
    payload = read_payload(path, "multi-talker model")
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not a {_FORMAT} file (a single-talker checkpoint needs --talkers 1)")
    base = build_model(ModelConfig(**payload["model_config"]))
    model = SeparatorTransducer.from_transducer(base, SeparatorConfig(**payload["separator"]))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()})
    frontend = Frontend.from_meta(payload["meta"]["frontend"], source=str(path))
    return model.eval(), str(payload["kind"]), frontend, payload["meta"]
