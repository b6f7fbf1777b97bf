"""`chorus model ship`: turn a trained checkpoint into a shipped base model with its manifest entry.

The shipped file is the checkpoint's weights in float16 with its front end (tokenizer and CMVN), under
``shared/models/shipped/`` (package data, so every install starts from it). Its manifest entry records what a user
needs to trust and reproduce it: sha256, size, architecture, the exact training command, the training corpus and
seed, training steps, time and hardware, and the WER of the *shipped* (float16) file on an evaluation corpus of
unseen speakers, overall and per accent, fleet, age group and gender, and overall with a second of silence before
each utterance.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.files import write_text_atomic
from shared.models.checkpoint import SHIPPED_DIR, architecture, load_checkpoint, save_checkpoint, sha256_of, shipped_manifest
from simulations.eval_wer import evaluate_wer

__all__ = ["ship", "ship_multitalker", "ship_verifiers"]

# Attributes the manifest breaks WER down by (synthetic corpus' speakers.tsv, plus the fleet).
BY = ("accent", "fleet", "age_group", "gender", "channel_rate")
# The manifest also states the WER with this much of each recording's noise floor before it: a device starts
# listening before anyone speaks (``chorus eval wer --lead-silence``).
LEAD_SILENCE_S = 1.0


def _training_record(run_dir: Path) -> dict[str, Any]:
    """Steps, wall time and settings of the `chorus train` run that wrote the checkpoint (when its files exist)."""
    record: dict[str, Any] = {}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        record["train_seconds"] = round(sum(float(r.get("seconds", 0.0)) for r in rows), 1)
        record["learning_curve"] = [
            {
                "step": r["step"],
                "train_loss": round(r["train_loss"], 4),
                **({"heldout_wer": r["heldout_wer"]} if "heldout_wer" in r else {}),
            }
            for r in rows
            if "heldout_wer" in r
        ]
    config = run_dir / "config.json"
    if config.is_file():
        record["run_config"] = json.loads(config.read_text())
    return record


def _file_facts(out: Path, model: nn.Module, *, command: str, hardware: str) -> dict[str, Any]:
    """What every manifest entry records of a shipped file: checksum, size, parameters, dtype, how it was made."""
    return {
        "sha256": sha256_of(out),
        "bytes": out.stat().st_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float16",
        "command": command,
        "hardware": hardware,
    }


def _add_to_manifest(entries: dict[str, dict[str, Any]]) -> None:
    """``entries`` ({file name: entry}) into ``shared/models/shipped/manifest.json``, replacing older ones."""
    manifest = shipped_manifest() | entries
    write_text_atomic(SHIPPED_DIR / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def ship(
    checkpoint: Path,
    *,
    name: str,
    command: str,
    hardware: str,
    eval_corpus: Path,
    eval_command: str,
    built_on: str = "",
) -> dict[str, Any]:
    """Write ``shared/models/shipped/<name>.pt`` and its entry in ``manifest.json``; returns the entry.

    ``built_on`` names the model a fine-tuned checkpoint started from (e.g. the shipped file it replaces, with its
    sha256 and the commit that has it), so the manifest says what its ``command`` ran on.
    """
    ckpt = load_checkpoint(checkpoint)
    frontend = ckpt.frontend
    if frontend is None:
        raise ValueError(f"checkpoint {checkpoint} carries no tokenizer and CMVN: only `chorus train` checkpoints ship")
    model = ckpt.build()
    out = SHIPPED_DIR / f"{name}.pt"
    step = ckpt.meta.get("step")
    save_checkpoint(
        out,
        model,
        ckpt.model_config,
        frontend=frontend,
        dtype=torch.float16,
        step=step,
        source_heldout_wer=ckpt.meta.get("heldout_wer"),
    )
    evaluation = evaluate_wer(out, eval_corpus, by=BY)
    late = evaluate_wer(out, eval_corpus, lead_silence_s=LEAD_SILENCE_S)
    entry = {
        "model_config": architecture(ckpt.model_config),
        **_file_facts(out, model, command=command, hardware=hardware),
        "step": step,
        **_training_record(checkpoint.parent.parent),
        "eval": {
            "command": eval_command,
            "corpus": Path(eval_corpus).name,
            "beam": evaluation["beam"],
            "wer": evaluation["wer"],
            "wer_lead_silence": {"seconds": LEAD_SILENCE_S, "wer": late["wer"]},
            "words": evaluation["words"],
            "utterances": evaluation["utterances"],
            "by": evaluation["by"],
            "by_words": evaluation["by_words"],
            **({"executed_share": evaluation["executed_share"]} if "executed_share" in evaluation else {}),
        },
    }
    if built_on:
        entry["built_on"] = built_on
    withheld = entry.get("run_config", {}).get("plan.withhold")
    if withheld:  # a launch base: trained without some markets, never the default "shipped" base
        entry["withheld"] = withheld
    _add_to_manifest({out.name: entry})
    return entry


def ship_verifiers(trained: Path, *, command: str, hardware: str, eval_corpus: Path, eval_command: str) -> dict[str, Any]:
    """Ship the verifiers ``chorus model train-verifier`` wrote to ``trained`` (one per arm, float16 with their
    CMVN and threshold) with manifest entries: sha256, size, the commands, training record and the EER of the
    shipped files on ``eval_corpus``, overall and per cohort. Returns {file name: entry}."""
    import shutil

    from shared.models.speaker_embedding import load_verifier, shipped_verifier
    from simulations.eval_verification import ARMS, FULL, evaluate_verification

    record = json.loads((trained / "training.json").read_text())
    files = {arm: trained / f"{arm}.pt" for arm in ARMS}
    result = evaluate_verification(eval_corpus, files, FULL, trained / "eval")
    entries = {}
    for arm, source in files.items():
        out = shipped_verifier(arm)
        shutil.copyfile(source, out)
        verifier = load_verifier(out)
        figures = result["arms"][arm]
        entries[out.name] = {
            "kind": "speaker-verifier",
            "arm": arm,
            **_file_facts(out, verifier.embedder, command=command, hardware=hardware),
            "config": dataclasses.asdict(verifier.embedder.config),
            "threshold": verifier.threshold,
            "target_far": verifier.target_far,
            "training": {k: v for k, v in record.items() if k != "arms"} | {"arm": record["arms"][arm]},
            "eval": {
                "command": eval_command,
                "corpus": Path(eval_corpus).name,
                "speakers": result["speakers"],
                "trials": result["trials"],
                "target_trials": result["target_trials"],
            }
            | {k: figures[k] for k in ("eer", "eer_ci95", "min_dcf", "threshold", "by", "gap", "spread") if k in figures},
        }
    _add_to_manifest(entries)
    return entries


def ship_multitalker(
    run_dir: Path, *, arm: str, command: str, hardware: str, turn_bonus: tuple[float, float] | None = None
) -> dict[str, Any]:
    """Ship the ``arm`` model of a ``chorus bench multitalker`` run as ``shared/models/shipped/sts-2.pt`` (float16,
    with its front end and its decoding: ``turn_bonus``, by default the one the run chose on validation data, else
    none, and the beam chosen there, which the device then runs) and its manifest entry: sha256, size, the commands,
    the training record and the scores of the *shipped* file on the run's test sessions (unseen speakers) and on
    those speakers' utterances one talker at a time, greedy and, where the run chose a wider beam, with it too.
    Returns the entry."""
    from shared.data.mix import load_sessions, single_talker_sessions
    from shared.multitalker import SHIPPED_MULTITALKER, load_multitalker, save_multitalker, session_features
    from simulations.bench_multitalker import evaluate_with_single_talker

    result = json.loads((run_dir / "result.json").read_text())
    model, kind, frontend, meta = load_multitalker(run_dir / f"{arm}.pt")
    validated = result["arms"].get(arm, {}).get("validated", {})
    if turn_bonus is None:
        turn_bonus = tuple(validated.get("turn_bonus", (0.0, 0.0)))
    model.config = dataclasses.replace(model.config, turn_bonus=turn_bonus)
    beam = int(validated.get("beam", 1))  # the search chosen on validation data: what `chorus device transcribe` runs
    out = SHIPPED_DIR / SHIPPED_MULTITALKER
    base = load_checkpoint(SHIPPED_DIR / result["base"]["file"])
    save_multitalker(
        out, model, base.model_config, kind, frontend=frontend, dtype=torch.float16, training=meta["training"], beam=beam
    )
    shipped, _, _, _ = load_multitalker(out)
    test_dir = Path(result["sessions"]["test"])
    sessions = load_sessions(test_dir)
    alone = single_talker_sessions(json.loads((test_dir / "mix.json").read_text())["corpus"])  # the test speakers, one at a time
    features = session_features(sessions + alone, frontend.cmvn)
    batch_frames = result["plan"]["batch_frames"]
    scores = evaluate_with_single_talker(shipped, kind, sessions, alone, features, frontend.tokenizer, batch_frames=batch_frames)
    if beam > 1:
        scores["beam"] = {"beam": beam} | evaluate_with_single_talker(
            shipped, kind, sessions, alone, features, frontend.tokenizer, batch_frames=batch_frames, beam=beam
        )
    for search in (scores, scores.get("beam", {})):  # per-session errors serve paired comparisons in a run, not a manifest
        search.pop("session_errors", None)
    entry = {
        "kind": "multitalker",
        "arm": arm,
        "system": kind,
        "base": result["base"]["file"],
        "base_model_config": architecture(base.model_config),
        "separator": dataclasses.asdict(shipped.config),
        **_file_facts(out, shipped, command=command, hardware=hardware),
        "training": meta["training"] | {"plan": result["plan"], "train_sessions": result["sessions"]["train_count"]},
        "eval": {"sessions": result["sessions"]["test_count"], **scores},
    }
    if validated:  # how the run chose the decoding: on validation speakers, not the test ones
        entry["decoding_chosen_on"] = {"corpus": result["plan"]["val_corpus"], "sessions": result["plan"]["val_sessions"]} | {
            k: validated[k] for k in ("turn_bonus", "beam", "val_errors", "val_words")
        }
    _add_to_manifest({out.name: entry})
    return entry
