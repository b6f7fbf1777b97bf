"""`chorus eval wer`: the word error rate of a checkpoint on a corpus, overall and per speaker attribute.

The checkpoint brings its own front end (tokenizer and CMVN, ``Checkpoint.frontend``), so any checkpoint scores on
any corpus ``load_corpus`` reads; the default is the shipped base model. WER pools word errors over utterances
(``shared.metrics``). Per-attribute WERs read the corpus' ``speakers.tsv`` (evaluation code only); on the synthetic
corpus the device fleet is derived from the accent (``shared.data.synth.ACCENTS``). For a compute-amortized model
the result also says what share of its sub-blocks ran over the decoded frames (``executed_share``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from shared.config import ModelConfig
from shared.data.corpora import CorpusError, load_corpus, read_speakers_tsv
from shared.data.dataset import FeatureCache
from shared.data.features import FRAME_RATE
from shared.metrics import ErrorCounts
from shared.models.amortized_transformer import AmortizedTransformerEncoder
from shared.models.checkpoint import CheckpointError, init_checkpoint_path, load_checkpoint
from shared.training import score

__all__ = ["EvalWerError", "default_checkpoint", "evaluate_wer", "speaker_attributes"]


class EvalWerError(ValueError):
    """The checkpoint or the corpus cannot be evaluated (the message names which, and why)."""


def default_checkpoint() -> Path:
    """The shipped base of the default model config."""
    path = init_checkpoint_path(ModelConfig(init_checkpoint="shipped"))
    assert path is not None
    return path


def speaker_attributes(corpus_root: Path) -> dict[str, dict[str, str]]:
    """``speakers.tsv`` rows, with ``speaker`` (its id, for per-speaker WER) and ``fleet`` (from the accent, where
    the corpus is the synthetic one) added."""
    from shared.data.synth import ACCENTS

    attributes = read_speakers_tsv(corpus_root)
    for speaker, row in attributes.items():
        row.setdefault("speaker", speaker)
        if "fleet" not in row and row.get("accent") in ACCENTS:
            row["fleet"] = ACCENTS[row["accent"]][1]
    return attributes


def evaluate_wer(
    checkpoint: Path, corpus: Path, *, by: Sequence[str] = (), beam: int = 1, limit: int = 0, lead_silence_s: float = 0.0
) -> dict[str, Any]:
    """WER of ``checkpoint`` on ``corpus``: ``{"wer", "words", "utterances", "by": {attribute: {value: wer}},
    "by_words": {attribute: {value: reference words}}, ...}``.

    ``by`` names ``speakers.tsv`` columns (plus ``fleet``); an attribute the corpus lacks is an error naming it.
    ``limit`` > 0 scores every k-th utterance so that at most ``limit`` are decoded. ``lead_silence_s`` puts that
    much of each recording's own noise floor before it (``prepend_silence``): a device starts listening before
    anyone speaks, and a model that only heard speech begin on cue fails there.
    """
    if not 0.0 <= lead_silence_s <= 10.0:
        raise EvalWerError(f"lead silence must lie in [0, 10] seconds, got {lead_silence_s}")
    try:
        ckpt = load_checkpoint(checkpoint)
    except CheckpointError as err:
        raise EvalWerError(str(err)) from err
    frontend = ckpt.frontend
    if frontend is None:
        raise EvalWerError(
            f"checkpoint {checkpoint} carries no tokenizer and CMVN (it was not written by "
            "`chorus train`); score it through the run that trained it"
        )
    corpus_path = Path(corpus).expanduser()
    if not corpus_path.is_dir():
        raise EvalWerError(f"corpus {corpus_path}: no such directory")
    attributes = speaker_attributes(corpus_path) if by else {}
    for name in by:
        if not any(name in row for row in attributes.values()):
            known = sorted({key for row in attributes.values() for key in row})
            raise EvalWerError(
                f"--by {name}: corpus {corpus_path} has no such speaker attribute "
                f"(speakers.tsv columns: {', '.join(known) or 'none, the file is absent'})"
            )
    try:
        loaded = load_corpus(corpus_path)
    except CorpusError as err:
        raise EvalWerError(str(err)) from err
    if not loaded.utterances:
        raise EvalWerError(f"corpus {corpus_path} has no readable utterance ({len(loaded.skipped)} skipped)")
    utterances = sorted(loaded.utterances, key=lambda u: u.id)
    if limit > 0:
        utterances = utterances[:: max(1, len(utterances) // limit)][:limit]

    model = ckpt.build().eval()
    amortized = model.encoder if isinstance(model.encoder, AmortizedTransformerEncoder) else None
    if amortized is not None:
        amortized.reset_gate_stats()
    features = FeatureCache(loaded, frontend.cmvn, max_items=len(utterances))
    start = time.monotonic()
    with torch.inference_mode():
        lead = round(FRAME_RATE * lead_silence_s)
        total, per_utt = score(model, utterances, features=features, tokenizer=frontend.tokenizer, beam=beam, lead_frames=lead)
    seconds = time.monotonic() - start
    if total.words == 0:
        raise EvalWerError(f"corpus {corpus_path}: none of its utterances could be decoded ({len(features.skipped)} skipped)")
    groups: dict[str, dict[str, ErrorCounts]] = {name: defaultdict(lambda: ErrorCounts(0, 0, 0)) for name in by}
    speaker_of = {u.id: u.speaker for u in utterances}
    for utt_id, counts in per_utt.items():
        row = attributes.get(speaker_of[utt_id], {})
        for name in by:
            if name in row:
                groups[name][row[name]] = groups[name][row[name]] + counts
    return {
        "checkpoint": str(checkpoint),
        "corpus": str(corpus_path),
        "beam": beam,
        "lead_silence_s": lead_silence_s,
        "wer": round(total.wer, 4),
        "words": total.words,
        "utterances": total.utterances,
        "skipped": len(loaded.skipped) + len(features.skipped),
        "decode_seconds": round(seconds, 1),
        "by": {name: {value: round(c.wer, 4) for value, c in sorted(values.items())} for name, values in groups.items()},
        "by_words": {name: {value: c.words for value, c in sorted(values.items())} for name, values in groups.items()},
        **({"executed_share": round(amortized.gate_stats().executed_share, 4)} if amortized is not None else {}),
    }
