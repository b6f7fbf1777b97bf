"""`chorus bench compute`: what each streaming model costs and how well it recognizes, side by side.

For each model — the dense causal Transformer, the sliding-window baseline, ConvRNN-T, and the
compute-amortized Transformer at several compute-loss weights (lambda) — the benchmark trains (or reuses) it
on the public speakers, decodes held-out speakers it never saw, and measures in this one process:
    wer                              greedy search, held-out speakers (jiwer, pooled counts)
    encoder_gflops_per_audio_second  FLOPs actually executed (torch FlopCounterMode) by the encoder while
                                     streaming batch-1 chunks of 160 ms, per second of audio
    batch1_streaming_rtf             wall time of batch-1 streaming (encoder + greedy search) / audio time,
                                     one thread, best of `repeats` interleaved passes
    relative_*_vs_dense              ratios to the dense model measured in the same run
The amortized models start from the trained dense model (its weights; fresh arbitrators whose gates start
mostly on) and are fine-tuned with loss = transducer + lambda * expected compute, which traces the
WER-compute curve. One JSON object goes to stdout; the run directory keeps the checkpoints and a report.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from shared.config import ModelConfig, RunConfig
from shared.data.corpora import Utterance
from shared.data.dataset import FeatureCache
from shared.data.prepare import prepare
from shared.models.amortized_transformer import AmortizedTransformerEncoder
from shared.models.checkpoint import load_checkpoint
from shared.models.encoder import StreamingEncoder
from shared.models.flops import measure_flops
from shared.models.transducer import Transducer
from shared.training import score
from simulations.train import TrainPlan, train_central

__all__ = ["BenchPlan", "QUICK", "FULL", "train_models", "run_compute_bench"]

CHUNK_FRAMES = 16  # 160 ms of features per streaming call: a typical on-device chunk
DENSE_CONTINUED = "transformer-continued"  # the dense model fine-tuned as long as the amortized ones


@dataclass(frozen=True)
class BenchPlan:
    overrides: dict[str, Any]  # run-config overrides (corpus and model sizes)
    steps: int  # central training steps of each base model
    amortized_steps: int  # fine-tuning steps of each amortized model, from the trained dense one
    lambdas: tuple[float, ...]
    eval_utterances: int  # held-out utterances for WER
    stream_utterances: int  # held-out utterances for FLOPs and wall time
    repeats: int  # interleaved timing passes (the best one counts)


# CI-sized: a tiny corpus and model, minutes in all. The numbers only prove the pipeline runs.
QUICK = BenchPlan(
    overrides={
        "synth.speakers": 10,
        "synth.utterances": 8,
        "synth.seed": 5,
        "split.public-speakers": 6,
        "split.heldout-speakers": 3,
        "model.d-model": 64,
        "model.num-layers": 2,
        "model.num-heads": 2,
        "model.ffn-dim": 256,
        "model.vocab-size": 128,
        "model.init-checkpoint": "",
        "train.batch-frames": 3000,
    },
    steps=24,
    amortized_steps=8,
    lambdas=(0.05, 0.2, 0.5, 1.0),
    eval_utterances=12,
    stream_utterances=3,
    repeats=1,
)
# The README's table: the default corpus (24 public / 16 held-out speakers), 8 blocks (2.34 M parameters),
# ~53 utterances per step. Its models were trained with `--train-device cuda` (3 base models side by side in
# 3.5 min on one H200, then the 5 fine-tuned ones); on 2 CPU cores the training alone takes many hours.
FULL = BenchPlan(
    overrides={"model.num-layers": 8, "model.init-checkpoint": "", "train.batch-frames": 16000},
    steps=3200,
    amortized_steps=2500,
    lambdas=(0.1, 0.3, 1.0, 3.0),
    eval_utterances=320,
    stream_utterances=16,
    repeats=3,
)


def _params(model: torch.nn.Module | StreamingEncoder) -> int:
    return sum(p.numel() for p in model.parameters())


def _stream(model: Transducer, feats: torch.Tensor) -> None:
    state = model.init_stream(batch_size=1)
    for start in range(0, feats.shape[0], CHUNK_FRAMES):
        state = model.stream(feats[None, start : start + CHUNK_FRAMES], state)


def _encoder_stream(model: Transducer, feats: torch.Tensor) -> None:
    state = model.encoder.init_state(batch_size=1)
    for start in range(0, feats.shape[0], CHUNK_FRAMES):
        _, state = model.encoder.infer(feats[None, start : start + CHUNK_FRAMES], state)


def _measure(
    models: dict[str, Transducer], utterances: list[Utterance], features: FeatureCache, repeats: int
) -> dict[str, dict[str, float]]:
    """FLOPs and batch-1 streaming wall time of every model on the same utterances, interleaved."""
    feats = [torch.from_numpy(f.copy()) for f in (features.features(u) for u in utterances) if f is not None]
    audio_seconds = sum(f.shape[0] for f in feats) * 0.01  # 10 ms feature shift
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a device decodes on one core; also keeps the comparison fair
    try:
        out: dict[str, dict[str, float]] = {}
        for name, model in models.items():
            model.eval()
            if isinstance(model.encoder, AmortizedTransformerEncoder):
                model.encoder.reset_gate_stats()
            with torch.no_grad():
                flops = sum(measure_flops(_encoder_stream, model, f) for f in feats)
            out[name] = {"encoder_gflops_per_audio_second": flops / audio_seconds / 1e9}
            if isinstance(model.encoder, AmortizedTransformerEncoder):
                out[name]["executed_share"] = model.encoder.gate_stats().executed_share
        best = {name: float("inf") for name in models}
        with torch.no_grad():
            for _ in range(repeats):
                for name, model in models.items():
                    start = time.perf_counter()
                    for f in feats:
                        _stream(model, f)
                    best[name] = min(best[name], time.perf_counter() - start)
        for name in models:
            out[name]["batch1_streaming_rtf"] = best[name] / audio_seconds
        return out
    finally:
        torch.set_num_threads(threads)


def _base_config(plan: BenchPlan, workdir: Path) -> RunConfig:
    return RunConfig.from_flat({**RunConfig().to_flat(), **plan.overrides, "workdir": str(workdir)})


def train_models(
    plan: BenchPlan,
    *,
    workdir: Path,
    bench_id: str,
    reuse: bool = True,
    progress: bool = True,
    device: str = "cpu",
    only: frozenset[str] | None = None,
) -> dict[str, Path]:
    """Train (or reuse) every model of the benchmark; name -> best checkpoint.

    The amortized models start from the trained dense one, so they train after it. ``only`` trains a subset
    (e.g. one model per process on a GPU); ``device`` is where training runs (the measurements are always on
    the CPU, in ``run_compute_bench``).
    """
    base = _base_config(plan, workdir)
    root = base.workdir_path / "runs" / bench_id
    train_plan = TrainPlan(
        steps=plan.steps,
        eval_every=plan.steps,
        ckpt_every=max(1, plan.steps // 8),
        warmup=max(1, min(300, plan.steps // 10)),
        eval_utterances=plan.eval_utterances,
        device=device,
    )
    fine_tune = replace(
        train_plan,
        steps=plan.amortized_steps,
        warmup=1,
        peak_lr=train_plan.peak_lr / 4,
        eval_every=plan.amortized_steps,
        ckpt_every=max(1, plan.amortized_steps // 4),
    )

    def trained(name: str, model_cfg: ModelConfig, compute_weight: float, tplan: TrainPlan) -> Path:
        run_dir = root / name
        best = run_dir / "checkpoints" / "best.pt"
        if (reuse and best.exists()) or (only is not None and name not in only):
            return best
        cfg = replace(base, model=model_cfg, train=replace(base.train, compute_weight=compute_weight))
        return train_central(cfg, tplan, run_dir=run_dir, resume=reuse, progress=progress)

    checkpoints = {
        name: trained(name, replace(base.model, name=name), 0.0, train_plan)
        for name in ("transformer", "sliding-window", "convrnnt")
    }
    # The amortized models train `amortized_steps` more than the dense one; so does this dense reference, with
    # the same fine-tuning plan and no arbitrators, so that their WERs compare equal amounts of training.
    continued = replace(base.model, name="transformer", init_checkpoint=str(checkpoints["transformer"]))
    checkpoints[DENSE_CONTINUED] = trained(DENSE_CONTINUED, continued, 0.0, fine_tune)
    for lam in plan.lambdas:
        amortized = replace(base.model, name="amortized", init_checkpoint=str(checkpoints["transformer"]))
        checkpoints[f"amortized-lambda{lam:g}"] = trained(f"amortized-lambda{lam:g}", amortized, lam, fine_tune)
    return checkpoints


def run_compute_bench(
    plan: BenchPlan, *, workdir: Path, bench_id: str, reuse: bool = True, progress: bool = True, train_device: str = "cpu"
) -> dict[str, Any]:
    started = time.monotonic()
    base = _base_config(plan, workdir)
    prepared = prepare(base, progress=progress)
    root = base.workdir_path / "runs" / bench_id
    checkpoints = train_models(plan, workdir=workdir, bench_id=bench_id, reuse=reuse, progress=progress, device=train_device)

    models = {name: load_checkpoint(path).build() for name, path in checkpoints.items()}
    by_speaker = prepared.corpus.by_speaker()
    heldout = [u for s in prepared.split.heldout for u in by_speaker.get(s, [])]
    heldout = heldout[:: max(1, len(heldout) // plan.eval_utterances)][: plan.eval_utterances]
    features = FeatureCache(prepared.corpus, prepared.cmvn, max_items=len(heldout))
    results: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        counts, _ = score(model, heldout, features=features, tokenizer=prepared.tokenizer)
        results[name] = {
            "params": _params(model),
            "encoder_params": _params(model.encoder),
            "wer": counts.wer,
            "words": counts.words,
        }
    stream_utts = heldout[:: max(1, len(heldout) // plan.stream_utterances)][: plan.stream_utterances]
    for name, measured in _measure(models, stream_utts, features, plan.repeats).items():
        results[name].update(measured)
    dense = results["transformer"]
    for name, row in results.items():
        # WER against the dense model with as many training steps: the base one for the other base models,
        # the continued one for the amortized models (fine-tuned from it) and for itself.
        reference = results[DENSE_CONTINUED] if name.startswith(("amortized", DENSE_CONTINUED)) else dense
        row["relative_flops_vs_dense"] = row["encoder_gflops_per_audio_second"] / dense["encoder_gflops_per_audio_second"]
        row["relative_wall_vs_dense"] = row["batch1_streaming_rtf"] / dense["batch1_streaming_rtf"]
        row["relative_wer_vs_dense"] = row["wer"] / reference["wer"] if reference["wer"] > 0 else float("nan")

    curve = [
        {
            "lambda": lam,
            **{
                k: results[f"amortized-lambda{lam:g}"][k]
                for k in ("wer", "relative_wer_vs_dense", "relative_flops_vs_dense", "relative_wall_vs_dense", "executed_share")
            },
        }
        for lam in plan.lambdas
    ]
    # The headline amortized model: the cheapest one within +3% relative WER of dense (the paper's operating
    # point), else the most accurate one.
    within = [c for c in curve if c["wer"] <= results[DENSE_CONTINUED]["wer"] * 1.03]
    chosen = min(within, key=lambda c: c["relative_flops_vs_dense"]) if within else min(curve, key=lambda c: c["wer"])
    summary = {
        "models": {
            "transformer": dense,
            DENSE_CONTINUED: results[DENSE_CONTINUED],
            "sliding-window": results["sliding-window"],
            "convrnnt": results["convrnnt"],
            "amortized": {**results[f"amortized-lambda{chosen['lambda']:g}"], "lambda": chosen["lambda"]},
        },
        "amortized_curve": curve,
        "all_models": results,
        "settings": {
            "plan": {k: v for k, v in asdict(plan).items()},
            "chunk_ms": CHUNK_FRAMES * 10,
            "heldout_utterances": len(heldout),
            "stream_utterances": len(stream_utts),
            "threads_for_timing": 1,
            "torch": torch.__version__,
        },
        "duration_s": round(time.monotonic() - started, 1),
        "run_dir": str(root),
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "bench.json").write_text(json.dumps(summary, indent=1) + "\n")
    _report(root, summary)
    return summary


def _report(root: Path, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["all_models"]
    lines = [
        "# Compute benchmark",
        "",
        f"Duration: {summary['duration_s']} s. Settings: `{json.dumps(summary['settings'])}`",
        "",
        "| model | params | WER | rel. WER | encoder GFLOPs / audio s | rel. FLOPs | batch-1 RTF | rel. wall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['params']:,} | {r['wer']:.4f} | {r['relative_wer_vs_dense']:.3f} | "
            f"{r['encoder_gflops_per_audio_second']:.3f} | {r['relative_flops_vs_dense']:.3f} | "
            f"{r['batch1_streaming_rtf']:.4f} | {r['relative_wall_vs_dense']:.3f} |"
        )
    fig, ax = plt.subplots(figsize=(5.5, 4))
    curve = summary["amortized_curve"]
    ax.plot([c["relative_flops_vs_dense"] for c in curve], [c["wer"] for c in curve], "o-", label="amortized (lambda)")
    for c in curve:
        ax.annotate(f"{c['lambda']:g}", (c["relative_flops_vs_dense"], c["wer"]))
    for name, marker in (("transformer", "s"), ("sliding-window", "^"), ("convrnnt", "D")):
        ax.plot([rows[name]["relative_flops_vs_dense"]], [rows[name]["wer"]], marker, label=name)
    ax.set(xlabel="encoder FLOPs relative to dense", ylabel="held-out WER", title="WER vs compute")
    ax.legend()
    fig.tight_layout()
    fig.savefig(root / "wer_vs_compute.png", dpi=100)
    plt.close(fig)
    lines += ["", "![WER vs compute](wer_vs_compute.png)", ""]
    (root / "report.md").write_text("\n".join(lines))


def main(*, quick: bool, workdir: Path, bench_id: str, reuse: bool, as_json: bool, train_device: str = "cpu") -> None:
    plan = QUICK if quick else FULL
    with contextlib.redirect_stdout(sys.stderr):  # progress to stderr: stdout carries only the result
        summary = run_compute_bench(
            plan, workdir=workdir, bench_id=bench_id, reuse=reuse, progress=sys.stderr.isatty(), train_device=train_device
        )
    if as_json:
        json.dump(summary, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print((Path(summary["run_dir"]) / "report.md").read_text())
