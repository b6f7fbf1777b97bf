"""`chorus bench multitalker`: two overlapping talkers, separator-transducer-segmenter against MT-RNN-T.

Three systems start from the shipped single-talker base and are trained on the same two-talker sessions
(``chorus data mix`` of public speakers) for the same steps, then decode sessions of unseen speakers:

    mt-rnnt       one channel, turns serialized with ``<sc>`` (the baseline)
    sts           separator into two channels, ``<sot>``/``<eot>`` per turn (HEAT routing)
    sts+penalty   the same with the turn-token latency penalty (``plan.turn_penalty``)

(``plan.activity_weight``, ``--activity-weight``, adds the turn-activity loss of ``train_sessions`` to both two-channel
systems; the plans have none.)

Measured in this one process (see ``shared/multitalker.py`` for the definitions): WER (permutation-invariant over
channels), turn-counting accuracy, turn-start error and end-of-turn latency (median, p90), by overlap bucket; the
same on the test speakers' own utterances one talker at a time (what a device mostly hears; the other channel's words
are insertions); encoder + separator FLOPs per audio second actually executed (FlopCounterMode) while streaming
160 ms chunks, and batch-1 streaming RTF (one thread). Then, where the plan names validation speakers, each system
again with the decoding it does best with (``choose_decoding``: the turn-token bonus and the beam width with the fewest
errors on validation sessions of other speakers and on those speakers' utterances alone), which is how the issue's
targets compare the systems. One JSON object goes to stdout; the run directory keeps the models and report.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.data.mix import LEAD_S, Session, load_sessions, mix_sessions, single_talker_sessions
from shared.data.synth import synthesize
from shared.data.tokenizer import Tokenizer
from shared.files import write_text_atomic
from shared.models.checkpoint import Checkpoint, SHIPPED_DIR, load_checkpoint, shipped_manifest
from shared.models.flops import measure_flops
from shared.models.separator_transducer import SeparatorConfig, SeparatorTransducer
from shared.multitalker import (
    channels_of,
    decode_sessions,
    load_multitalker,
    make_session_batches,
    save_multitalker,
    score_sessions,
    session_features,
    train_sessions,
)

__all__ = [
    "ARMS",
    "FULL",
    "QUICK",
    "MultitalkerPlan",
    "choose_decoding",
    "evaluate",
    "evaluate_with_single_talker",
    "run_multitalker_bench",
]

BASE = "dense-6.pt"
CHUNK_FRAMES = 16  # 160 ms of features per streaming call
ARMS = {"sts+penalty": ("sts", True), "mt-rnnt": ("mt-rnnt", False), "sts": ("sts", False)}


@dataclass(frozen=True)
class MultitalkerPlan:
    train_corpus: str  # a `chorus data synth` corpus; "" synthesizes the quick one under the workdir
    test_corpus: str  # unseen speakers; "" as above
    train_sessions: int
    test_sessions: int
    turns: tuple[int, int]  # turns of a test session
    max_overlap: float
    steps: int
    peak_lr: float
    warmup: int
    turn_penalty: float  # lambda of the turn-token latency penalty, per encoder frame (40 ms) outside its slack
    batch_frames: int  # padded feature frames per batch (B x T)
    layers: int  # separator blocks per channel
    stream_sessions: int  # test sessions streamed for FLOPs and RTF
    init_run: str = ""  # runs/<id> of an earlier bench whose systems this one continues training ("": the base)
    recognition_layers: int = 0  # the base encoder's top blocks moved after the separator, tied across channels
    turn_reset: bool = False  # the predictor's context starts afresh after <eot> (SeparatorConfig.turn_reset)
    activity_weight: float = 0.0  # the two-channel systems' turn-activity loss (`train_sessions`); MT-RNN-T has none
    beam: int = 1  # search for the scored and streamed sessions: 1 greedy, more = modified beam search (`--beam`)
    train_turns: tuple[int, int] = (2, 3)  # turns of a training session; 1 adds sessions of a single talker
    train_lead: tuple[float, float] = LEAD_S  # silence before a training session's first turn (0: speech at once)
    train_mix_seed: int = 1  # `chorus data mix --seed` of the training sessions (the test sessions': 99)
    # Validation speakers (none of the training or test ones) on which each system's decoding is chosen: their
    # sessions (`chorus data mix --seed 97`) and their utterances alone. 0 sessions: no choice is made.
    val_corpus: str = ""  # a `chorus data synth` corpus; "" synthesizes the quick one under the workdir
    val_sessions: int = 0
    val_turns: tuple[int, int] = (2, 4)
    # The grids searched, in this order (ties go to the earlier value): the bonus added to a turn's start token
    # (<sot>, or MT-RNN-T's <sc>) with none on <eot>, greedy; then <eot>'s (STS only); then the beam width.
    start_bonuses: tuple[float, ...] = (0.0,)
    end_bonuses: tuple[float, ...] = (0.0,)
    beams: tuple[int, ...] = (1,)


# CI-sized: tiny corpora, a few steps from the shipped base; the numbers prove the pipeline only.
QUICK = MultitalkerPlan(
    train_corpus="",
    test_corpus="",
    train_sessions=8,
    test_sessions=4,
    turns=(2, 3),
    max_overlap=0.4,
    steps=2,
    peak_lr=5e-4,
    warmup=1,
    turn_penalty=0.1,
    batch_frames=3000,
    layers=1,
    stream_sessions=1,
    turn_reset=True,
    val_sessions=4,
    start_bonuses=(0.0, 1.0),
    end_bonuses=(0.0, 1.0),
    beams=(1, 2),
)
# The README's table: sessions of the base's training corpus and of the unseen eval corpus (see README).
FULL = MultitalkerPlan(
    train_corpus="data/synth-seed1-600x20",  # the first 600 of the base's 1,200 training speakers
    test_corpus="data/eval-seed99",
    train_sessions=6000,
    test_sessions=300,
    turns=(2, 3),
    max_overlap=0.4,
    steps=800,
    peak_lr=5e-4,
    warmup=30,
    turn_penalty=0.1,
    batch_frames=4000,
    layers=2,
    stream_sessions=10,
    turn_reset=True,
    train_turns=(1, 3),  # a third of the training sessions one talker alone, as a device mostly hears
    train_lead=(0.0, 0.5),  # some start speaking with the audio
    train_mix_seed=3,
    val_corpus="data/synth-seed97-200x6",  # 200 other speakers, 6 utterances each
    val_sessions=200,
    start_bonuses=(0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0),
    end_bonuses=(-1.0, 0.0, 1.0, 2.0),
    beams=(1, 4, 8, 16),
)


def _corpora(plan: MultitalkerPlan, workdir: Path) -> tuple[Path, Path, Path | None]:
    """The training, test and validation corpora (None: no validation); the quick ones are synthesized."""
    if plan.train_corpus and plan.test_corpus:
        val = workdir / plan.val_corpus if plan.val_sessions and plan.val_corpus else None
        return workdir / plan.train_corpus, workdir / plan.test_corpus, val
    data = workdir / "data"
    train = synthesize(data / "mt-quick-train", speakers=4, utterances=4, seed=11, progress=False)
    test = synthesize(data / "mt-quick-test", speakers=3, utterances=3, seed=12, progress=False)
    val = synthesize(data / "mt-quick-val", speakers=3, utterances=3, seed=13, progress=False) if plan.val_sessions else None
    return train, test, val


def _stream_cost(model: SeparatorTransducer, sessions: list[Session], features: dict[str, Any], beam: int) -> dict[str, float]:
    """Encoder + separator FLOPs per audio second, and batch-1 streaming RTF (encoder, separator, and the search:
    greedy, or beam search of width ``beam`` carried across chunks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        audio = sum(features[s.id].shape[0] for s in sessions) / 100.0
        flops = 0
        for session in sessions:
            feats = torch.from_numpy(features[session.id])[None]

            def encode(feats: torch.Tensor = feats) -> None:
                state = model.init_stream(1).separator
                for chunk in feats.split(CHUNK_FRAMES, dim=1):
                    _, state = model.infer(chunk, state)

            with torch.no_grad():
                flops += measure_flops(encode)
        began = time.perf_counter()
        for session in sessions:
            state = model.init_stream(1)
            for chunk in torch.from_numpy(features[session.id])[None].split(CHUNK_FRAMES, dim=1):
                state = model.stream(chunk, state, beam=beam)
        wall = time.perf_counter() - began
    finally:
        torch.set_num_threads(threads)
    return {"encoder_gflops_per_audio_second": flops / audio / 1e9, "batch1_streaming_rtf": wall / audio}


def run_multitalker_bench(
    plan: MultitalkerPlan, *, run_dir: Path, workdir: Path, reuse: bool = True, train_device: str = "cpu"
) -> dict[str, Any]:
    """Mix (or reuse) the sessions, train (or reuse) the three systems on ``train_device``, measure them on the CPU;
    returns the JSON result."""
    run_dir.mkdir(parents=True, exist_ok=True)
    train_corpus, test_corpus, val_corpus = _corpora(plan, workdir)
    for corpus in (train_corpus, test_corpus, val_corpus):
        if corpus is not None and not corpus.is_dir():
            raise FileNotFoundError(f"corpus {corpus} does not exist (see the README's multi-talker section)")
    data = workdir / "data"
    # The training mix's folder keeps its old name for the old sessions (2-3 turns, default lead, seed 1).
    (low, high), (lead_low, lead_high) = plan.train_turns, plan.train_lead
    old = plan.train_turns == (2, 3) and plan.train_lead == LEAD_S and plan.train_mix_seed == 1
    variant = "" if old else f"-turns{low}-{high}-lead{lead_low:g}-{lead_high:g}-seed{plan.train_mix_seed}"
    train_dir = mix_sessions(
        train_corpus,
        data / f"mix-{train_corpus.name}-{plan.train_sessions}{variant}",
        sessions=plan.train_sessions,
        seed=plan.train_mix_seed,
        turns=plan.train_turns,
        max_overlap=plan.max_overlap,
        lead=plan.train_lead,
    )
    test_dir = mix_sessions(
        test_corpus,
        data / f"mix-{test_corpus.name}-{plan.test_sessions}",
        sessions=plan.test_sessions,
        seed=99,
        turns=plan.turns,
        max_overlap=plan.max_overlap,
    )
    base_path = SHIPPED_DIR / BASE
    base: Checkpoint = load_checkpoint(base_path)
    frontend = base.frontend
    if frontend is None:
        raise ValueError(f"{base_path} carries no front end")
    train_set, test_set = load_sessions(train_dir), load_sessions(test_dir)
    single_set = single_talker_sessions(test_corpus)  # the test speakers alone: what the base's single-talker WER is on
    features = session_features(train_set + test_set + single_set, frontend.cmvn)
    stream_set = test_set[: plan.stream_sessions]
    val_sets: list[list[Session]] = []
    val_features: dict[str, Any] = {}  # apart from ``features``: utterance ids repeat across corpora
    if val_corpus is not None:
        val_dir = mix_sessions(
            val_corpus,
            data / f"mix-{val_corpus.name}-{plan.val_sessions}",
            sessions=plan.val_sessions,
            seed=97,
            turns=plan.val_turns,
            max_overlap=plan.max_overlap,
        )
        val_sets = [load_sessions(val_dir), single_talker_sessions(val_corpus)]
        val_features = session_features(val_sets[0] + val_sets[1], frontend.cmvn)
    result: dict[str, Any] = {
        "plan": asdict(plan),
        "sessions": {"train": str(train_dir), "test": str(test_dir), "train_count": len(train_set), "test_count": len(test_set)},
        "base": {"file": BASE, "single_talker_wer": shipped_manifest().get(BASE, {}).get("eval", {}).get("wer")},
        "arms": {},
    }
    for arm, (kind, penalized) in ARMS.items():
        path = run_dir / f"{arm}.pt"
        if reuse and path.is_file():
            model, _, _, meta = load_multitalker(path)
            training = meta["training"]
        else:
            torch.manual_seed(0)
            earlier: dict[str, Any] = {}
            if plan.init_run:  # continue the same system of an earlier run (a warm restart of the schedule)
                model, _, _, meta = load_multitalker(workdir / plan.init_run / f"{arm}.pt")
                earlier = meta["training"]
            else:
                model = SeparatorTransducer.from_transducer(
                    base.build(),
                    SeparatorConfig(
                        channels=channels_of(kind),
                        layers=plan.layers,
                        recognition_layers=plan.recognition_layers,
                        turn_reset=plan.turn_reset,
                    ),
                )
            batches = make_session_batches(
                train_set, features, frontend.tokenizer, kind, max_frames=plan.batch_frames, shuffle=True, seed=len(earlier)
            )
            activity = plan.activity_weight if channels_of(kind) == 2 else 0.0  # MT-RNN-T has no turns to route
            model.to(train_device)
            began = time.perf_counter()
            log = train_sessions(
                model,
                batches,
                steps=plan.steps,
                peak_lr=plan.peak_lr,
                warmup=plan.warmup,
                turn_penalty=plan.turn_penalty if penalized else 0.0,
                seed=0,
                log_every=max(1, plan.steps // 10),
                activity_weight=activity,
            )
            model.cpu()
            stage = {
                "steps": plan.steps,
                "seconds": round(time.perf_counter() - began, 1),
                "activity_weight": activity,
                "loss_curve": log,
            }
            stages = [*earlier.get("stages", [earlier] if earlier else []), stage]
            training = {
                "steps": sum(x["steps"] for x in stages),
                "seconds": round(sum(x["seconds"] for x in stages), 1),
                "stages": stages,
            }
            save_multitalker(path, model, base.model_config, kind, frontend=frontend, training=training, plan=asdict(plan))
        result["arms"][arm] = {
            "kind": kind,
            "turn_penalty": plan.turn_penalty if penalized else 0.0,
            "training": training,
            **evaluate_with_single_talker(
                model, kind, test_set, single_set, features, frontend.tokenizer, batch_frames=plan.batch_frames, beam=plan.beam
            ),
        }
        result["arms"][arm].update(_stream_cost(model.eval(), stream_set, features, plan.beam))
        if val_sets:
            chosen = choose_decoding(model, kind, val_sets, val_features, frontend.tokenizer, plan)
            model.config = replace(model.config, turn_bonus=tuple(chosen["turn_bonus"]))  # the model is not saved again
            result["arms"][arm]["validated"] = chosen | evaluate_with_single_talker(
                model,
                kind,
                test_set,
                single_set,
                features,
                frontend.tokenizer,
                batch_frames=plan.batch_frames,
                beam=chosen["beam"],
            )
    arms, single_wer = result["arms"], result["base"]["single_talker_wer"]
    result["comparison"] = _compare(arms, single_wer)
    if val_sets:  # the targets' comparison: each system with the decoding chosen on validation data
        result["comparison"]["validated"] = _compare({a: row["validated"] for a, row in arms.items()}, single_wer)
    write_text_atomic(run_dir / "result.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(run_dir / "report.md", report(result))
    return result


def _paired_interval(errors: list[int], baseline: list[int], resamples: int = 2000) -> list[float] | None:
    """95% interval of sum(errors) / sum(baseline) - 1 over sessions resampled with replacement (the same sessions
    for both systems: a paired bootstrap of the test set's sampling, not of training's)."""
    a, b = np.asarray(errors, dtype=float), np.asarray(baseline, dtype=float)
    if not b.sum():
        return None
    idx = np.random.default_rng(0).integers(0, len(b), size=(resamples, len(b)))
    ratios = a[idx].sum(axis=1) / np.maximum(b[idx].sum(axis=1), 1.0) - 1.0
    return [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]


def _compare(arms: dict[str, dict[str, Any]], single_talker_wer: float | None) -> dict[str, Any]:
    """STS + penalty against MT-RNN-T and STS without the penalty: the issue's targets."""
    sts, mt = arms["sts+penalty"], arms["mt-rnnt"]
    mt_wer, close = mt["all"]["wer"], sts["overlap<=20%"]["wer"]
    return {
        "sts+penalty_vs_mt-rnnt_relative_wer": (sts["all"]["wer"] - mt_wer) / mt_wer if mt_wer else None,
        "sts+penalty_vs_mt-rnnt_relative_wer_95ci": _paired_interval(sts["session_errors"], mt["session_errors"]),
        "sts+penalty_vs_mt-rnnt_turn_counting_abs": sts["all"]["turn_counting_accuracy"] - mt["all"]["turn_counting_accuracy"],
        "eot_latency_median_ms": {a: arms[a]["all"]["end_of_turn_latency_ms"]["median"] for a in ("sts", "sts+penalty")},
        "single_talker_wer": {a: row["single_talker"]["wer"] for a, row in arms.items()},
        "overlap<=20%_wer_over_single_talker_wer": close / single_talker_wer if single_talker_wer and close is not None else None,
    }


def choose_decoding(
    model: SeparatorTransducer,
    kind: str,
    sets: list[list[Session]],
    features: dict[str, Any],
    tokenizer: Tokenizer,
    plan: MultitalkerPlan,
) -> dict[str, Any]:
    """The turn bonus and beam width with the fewest word errors over ``sets`` (validation sessions, and the
    validation speakers' utterances alone, so a bonus that invents turns on one talker costs what it does): the
    start bonus first (greedy, no end bonus), then the end bonus (STS only: MT-RNN-T has no ``<eot>``), then the
    beam, each over the plan's grid. Returns the choice and every setting tried with its errors; ``model`` is left
    as it came."""
    untuned = model.config
    tried: dict[tuple[float, float, int], int] = {}
    words = 0

    def errors(start: float, end: float, beam: int) -> int:
        nonlocal words
        if (start, end, beam) not in tried:
            model.config = replace(untuned, turn_bonus=(start, end))
            decode = dict(batch_frames=plan.batch_frames, beam=beam)
            scores = [evaluate(model, kind, s, features, tokenizer, **decode)["all"] for s in sets]
            tried[start, end, beam] = round(sum(a["wer"] * a["words"] for a in scores if a["words"]))
            words = sum(a["words"] for a in scores)
        return tried[start, end, beam]

    try:
        start = min(plan.start_bonuses, key=lambda b: errors(b, 0.0, 1))
        end = min(plan.end_bonuses, key=lambda b: errors(start, b, 1)) if channels_of(kind) > 1 else 0.0
        beam = min(plan.beams, key=lambda w: errors(start, end, w))
    finally:
        model.config = untuned
    return {
        "turn_bonus": [start, end],
        "beam": beam,
        "val_errors": tried[start, end, beam],
        "val_words": words,
        "tried": [{"turn_bonus": [a, b], "beam": w, "errors": n} for (a, b, w), n in tried.items()],
    }


def evaluate(
    model: SeparatorTransducer,
    kind: str,
    sessions: list[Session],
    features: dict[str, Any],
    tokenizer: Tokenizer,
    *,
    batch_frames: int,
    beam: int = 1,
) -> dict[str, Any]:
    """``score_sessions`` of ``model``'s decoding of ``sessions``: greedy, or modified beam search with ``beam``."""
    batches = make_session_batches(sessions, features, tokenizer, kind, max_frames=batch_frames, shuffle=False, seed=0)
    return score_sessions(sessions, decode_sessions(model, batches, beam=beam), tokenizer, kind)


def evaluate_with_single_talker(
    model: SeparatorTransducer,
    kind: str,
    sessions: list[Session],
    alone: list[Session],
    features: dict[str, Any],
    tokenizer: Tokenizer,
    *,
    batch_frames: int,
    beam: int = 1,
) -> dict[str, Any]:
    """``evaluate`` of ``sessions``, with the summary of the same speakers' utterances ``alone`` (one-turn sessions)
    under ``single_talker``: how every system and shipped file is scored."""
    scores = evaluate(model, kind, sessions, features, tokenizer, batch_frames=batch_frames, beam=beam)
    single = evaluate(model, kind, alone, features, tokenizer, batch_frames=batch_frames, beam=beam)["all"]
    return scores | {"single_talker": single}


def _fmt(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def report(result: dict[str, Any]) -> str:
    """Markdown: one row per system and overlap bucket."""
    lines = [
        "# Multi-talker benchmark",
        "",
        f"Sessions: {result['sessions']['train_count']} for training, {result['sessions']['test_count']} for testing; "
        f"single-talker WER of the base on the test speakers' corpus: {_fmt(result['base']['single_talker_wer'])}; "
        + ("greedy search." if result["plan"]["beam"] == 1 else f"modified beam search, beam {result['plan']['beam']}."),
        "",
        "| system | overlap | sessions | WER | turn counting | "
        "turn start error, median ms | end-of-turn latency, median / p90 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, row in result["arms"].items():
        for bucket, scores in [("all", row["all"]), *row["by_overlap"].items()]:
            lat = scores["end_of_turn_latency_ms"]
            lines.append(
                f"| {arm} | {bucket} | {scores['sessions']} | {_fmt(scores['wer'])} | {_fmt(scores['turn_counting_accuracy'])} | "
                f"{_fmt(scores['turn_start_abs_error_ms']['median'], digits=0)} | "
                f"{_fmt(lat['median'], digits=0)} / {_fmt(lat['p90'], digits=0)} |"
            )
    lines += [
        "",
        f"The same systems on the test speakers' own utterances, one talker each ({_fmt(result['base']['single_talker_wer'])} "
        "for the base): the other channel's words count as insertions.",
        "",
        "| system | utterances | single-talker WER | one turn found |",
        "|---|---|---|---|",
    ]
    for arm, row in result["arms"].items():
        one = row["single_talker"]
        lines.append(f"| {arm} | {one['sessions']} | {_fmt(one['wer'])} | {_fmt(one['turn_counting_accuracy'])} |")
    lines += ["", "| system | encoder GFLOPs / audio s | batch-1 RTF | training steps | training s |", "|---|---|---|---|---|"]
    for arm, row in result["arms"].items():
        lines.append(
            f"| {arm} | {row['encoder_gflops_per_audio_second']:.3f} | {row['batch1_streaming_rtf']:.3f} | "
            f"{row['training']['steps']} | {row['training']['seconds']} |"
        )
    validated = {arm: row["validated"] for arm, row in result["arms"].items() if "validated" in row}
    if validated:
        plan = result["plan"]
        lines += [
            "",
            f"Each system with the turn bonus and search chosen on validation data ({plan['val_sessions']} sessions of "
            f"other speakers, `{plan['val_corpus'] or 'the quick corpus'}`, and their utterances alone; fewest errors "
            "over both); the issue's targets compare these rows.",
            "",
            "| system | turn bonus (start, end) | beam | validation errors / words | WER | <= 20% overlap | turn counting | "
            "end-of-turn latency, median / p90 ms | single-talker WER |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for arm, row in validated.items():
            lat = row["all"]["end_of_turn_latency_ms"]
            lines.append(
                f"| {arm} | {row['turn_bonus'][0]:g}, {row['turn_bonus'][1]:g} | {row['beam']} | "
                f"{row['val_errors']} / {row['val_words']} | {_fmt(row['all']['wer'])} | "
                f"{_fmt(row['overlap<=20%']['wer'])} | {_fmt(row['all']['turn_counting_accuracy'])} | "
                f"{_fmt(lat['median'], digits=0)} / {_fmt(lat['p90'], digits=0)} | {_fmt(row['single_talker']['wer'])} |"
            )
    lines += ["", "```json", json.dumps(result["comparison"], indent=2), "```", ""]
    return "\n".join(lines)
