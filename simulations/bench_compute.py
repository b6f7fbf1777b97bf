"""`chorus bench compute`: what each streaming model costs and how well it recognizes, side by side.

Every model starts from the shipped dense base (``shared/models/shipped/``): the dense causal Transformer as
shipped; the same fine-tuned further (`transformer-continued`, the equal-training reference); the sliding-window
baseline (the dense weights with an 8-frame attention window, fine-tuned as long); and the compute-amortized
Transformer at several compute-loss weights (lambda: the dense blocks plus fresh arbitrators, fine-tuned with
loss = transducer + lambda * expected compute), which traces the WER-compute curve. ConvRNN-T is measured as
shipped, against the dense base as shipped (another base: its encoder learned from random weights against the
dense base's predictor and joiner). ``--shipped`` measures only the shipped bases as they are (dense, amortized,
ConvRNN-T), with no training: the compute table of what ships, in minutes. Measured in this one process, on
unseen speakers of a test corpus:
    wer                              greedy search (``evaluate_wer``: jiwer, pooled counts), also per accent/fleet;
                                     with ``--beam N`` each model again as ``<model>+beam<N>`` (modified beam search)
    encoder_gflops_per_audio_second  FLOPs actually executed (torch FlopCounterMode) by the encoder while
                                     streaming batch-1 chunks (``--chunk-ms``, 160 by default), per second of audio
    batch1_streaming_rtf             wall time of batch-1 streaming (encoder + the row's search) / audio time,
                                     one thread, best of `repeats` interleaved passes
    relative_*_vs_dense              ratios to the dense model measured in the same run; wall time: the median
                                     over passes of the model's time / the dense model's in the same pass
                                     (``relative_wall_range``: their min and max), so a machine that slows for a
                                     while slows both sides of a ratio; ``relative_wer_vs_dense_same_search``:
                                     WER against the reference dense model under the row's own search
    *_lead_silence                   WER, FLOPs and executed share again with ``lead_silence_s`` of each test
                                     recording's own noise floor before it: a device's recording, which starts
                                     before anyone speaks (the gates may skip what is not speech)
One JSON object goes to stdout; the run directory keeps the checkpoints and a report.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from shared.config import RunConfig
from shared.data.corpora import Utterance, load_corpus
from shared.data.dataset import FeatureCache
from shared.data.features import FRAME_RATE, prepend_silence
from shared.data.synth import synthesize
from shared.models.amortized_transformer import AmortizedTransformerEncoder
from shared.models.checkpoint import SHIPPED, init_checkpoint_path, load_checkpoint
from shared.models.encoder import StreamingEncoder
from shared.models.flops import measure_flops
from shared.models.transducer import Transducer
from simulations.eval_wer import evaluate_wer
from simulations.train import TrainPlan, train_central

__all__ = ["BenchPlan", "QUICK", "FULL", "train_models", "run_compute_bench"]

CHUNK_MS = 160  # audio per streaming call by default: a typical on-device chunk
DENSE = "transformer"  # the shipped dense base, as shipped
DENSE_CONTINUED = "transformer-continued"  # the dense base fine-tuned as long as the other models
CONVRNNT = "convrnnt"  # measured as shipped
AMORTIZED = "amortized"  # the headline amortized model (a lambda of the curve), or the shipped one


@dataclass(frozen=True)
class BenchPlan:
    overrides: dict[str, Any]  # run-config overrides: the fine-tuning corpus (public speakers) and batches
    test_corpus: str  # unseen speakers: a corpus directory under the workdir; "" synthesizes a tiny one
    steps: int  # fine-tuning steps of every model that starts from the shipped dense base
    peak_lr: float
    arbitrator_lr: float  # the amortized models' fresh arbitrators learn at the from-scratch rate
    warmup: int
    lambdas: tuple[float, ...]
    eval_utterances: int  # test utterances for WER (every k-th, at most this many)
    stream_utterances: int  # of those, streamed for FLOPs and wall time
    repeats: int  # interleaved timing passes, each in another model order (RTF: the best; ratios: the median)
    lead_silence_s: float  # measured again with this much noise floor before each test utterance; 0: not
    # Every model measured a second time decoding by modified beam search of this width (streamed chunk by chunk:
    # WER and wall time; a row "<model>+beam<N>"); 1: greedy search only, what a device runs by default.
    beam: int = 1
    chunk_ms: int = CHUNK_MS  # audio per streaming call (FLOPs and wall time): a multiple of the 10 ms frame shift


# CI-sized: a tiny corpus, a few steps; the numbers only prove the pipeline runs.
QUICK = BenchPlan(
    overrides={
        "synth.speakers": 10,
        "synth.utterances": 8,
        "synth.seed": 5,
        "split.public-speakers": 6,
        "split.heldout-speakers": 3,
        "train.batch-frames": 3000,
    },
    test_corpus="",
    steps=4,
    peak_lr=5e-4,
    arbitrator_lr=2e-3,
    warmup=1,
    lambdas=(0.3, 1.0),
    eval_utterances=8,
    stream_utterances=2,
    repeats=2,
    lead_silence_s=0.5,
)
# The README's table: fine-tuned on 550 public speakers of the base's own training pool (seed 1: nothing new to
# learn but the gates), measured on the unseen speakers the shipped manifest's WER is measured on.
FULL = BenchPlan(
    overrides={
        "synth.speakers": 600,
        "synth.utterances": 20,
        "synth.seed": 1,
        "split.public-speakers": 550,
        "split.heldout-speakers": 40,
        "model.dropout": 0.0,
        "train.batch-frames": 4000,
    },
    test_corpus="data/eval-seed99",
    steps=1500,
    peak_lr=3e-4,
    arbitrator_lr=2e-3,
    warmup=100,
    lambdas=(0.1, 0.3, 1.0),
    eval_utterances=400,
    stream_utterances=16,
    repeats=5,
    lead_silence_s=1.0,
)


def _params(model: torch.nn.Module | StreamingEncoder) -> int:
    return sum(p.numel() for p in model.parameters())


def _stream(model: Transducer, feats: torch.Tensor, chunk: int, beam: int = 1) -> None:
    state = model.init_stream(batch_size=1)
    for start in range(0, feats.shape[0], chunk):
        state = model.stream(feats[None, start : start + chunk], state, beam=beam)


def _encoder_stream(model: Transducer, feats: torch.Tensor, chunk: int) -> None:
    state = model.encoder.init_state(batch_size=1)
    for start in range(0, feats.shape[0], chunk):
        _, state = model.encoder.infer(feats[None, start : start + chunk], state)


def _flops(model: Transducer, feats: list[torch.Tensor], chunk: int, suffix: str = "") -> dict[str, float]:
    """Encoder GFLOPs per audio second streaming ``feats``, and an amortized encoder's executed share."""
    audio_seconds = sum(f.shape[0] for f in feats) / FRAME_RATE
    if isinstance(model.encoder, AmortizedTransformerEncoder):
        model.encoder.reset_gate_stats()
    with torch.no_grad():
        flops = sum(measure_flops(_encoder_stream, model, f, chunk) for f in feats)
    out = {f"encoder_gflops_per_audio_second{suffix}": flops / audio_seconds / 1e9}
    if isinstance(model.encoder, AmortizedTransformerEncoder):
        out[f"executed_share{suffix}"] = model.encoder.gate_stats().executed_share
    return out


def _with_lead(feats: list[torch.Tensor], seconds: float) -> list[torch.Tensor]:
    """Each ``(T, F)`` utterance after ``seconds`` of its own noise floor (fixed draws: the same for every model)."""
    generator = torch.Generator().manual_seed(0)
    lead = torch.tensor([round(FRAME_RATE * seconds)])
    return [prepend_silence(f[None], torch.tensor([f.shape[0]]), lead, generator=generator)[0][0] for f in feats]


def _measure(
    models: dict[str, tuple[Transducer, int]],
    utterances: list[Utterance],
    features: FeatureCache,
    repeats: int,
    lead_silence_s: float,
    chunk: int,
) -> dict[str, dict[str, Any]]:
    """FLOPs (also with ``lead_silence_s`` of noise floor first, if > 0) and batch-1 streaming wall time of every
    (model, beam width) in chunks of ``chunk`` feature frames, on the same utterances, interleaved."""
    feats = [torch.from_numpy(f.copy()) for f in (features.features(u) for u in utterances) if f is not None]
    late = _with_lead(feats, lead_silence_s) if lead_silence_s > 0 else []
    audio_seconds = sum(f.shape[0] for f in feats) / FRAME_RATE
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a device decodes on one core; also keeps the comparison fair
    try:
        out: dict[str, dict[str, Any]] = {}
        counted: dict[int, dict[str, float]] = {}  # the encoder's FLOPs do not depend on the search: once per model
        for name, (model, _) in models.items():
            if id(model) not in counted:
                model.eval()
                counted[id(model)] = _flops(model, feats, chunk) | (_flops(model, late, chunk, "_lead_silence") if late else {})
            out[name] = dict(counted[id(model)])
        names = list(models)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        with torch.no_grad():
            for rep in range(repeats):
                for name in names[rep % len(names) :] + names[: rep % len(names)]:  # each pass starts elsewhere
                    model, beam = models[name]
                    start = time.perf_counter()
                    for f in feats:
                        _stream(model, f, chunk, beam)
                    seconds[name].append(time.perf_counter() - start)
        for name in names:
            out[name]["batch1_streaming_rtf"] = min(seconds[name]) / audio_seconds
            out[name]["pass_seconds"] = seconds[name]
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
    """Fine-tune (or reuse) every trained model of the benchmark from the shipped dense base; name -> checkpoint.

    ``only`` trains a subset (e.g. one model per process); ``device`` is where training runs (the measurements
    are always on the CPU, in ``run_compute_bench``).
    """
    base = _base_config(plan, workdir)
    dense = init_checkpoint_path(base.model)
    if dense is None or load_checkpoint(dense).model_config.name != DENSE:
        raise ValueError(f"model.init-checkpoint={base.model.init_checkpoint!r}: the benchmark starts from a dense base")
    root = base.workdir_path / "runs" / bench_id
    fine_tune = TrainPlan(
        steps=plan.steps,
        peak_lr=plan.peak_lr,
        arbitrator_lr=plan.arbitrator_lr,
        warmup=plan.warmup,
        eval_every=max(1, plan.steps // 3),
        ckpt_every=max(1, plan.steps // 6),
        eval_utterances=200,
        device=device,
    )

    def trained(name: str, model_name: str, compute_weight: float) -> Path:
        run_dir = root / name
        last = run_dir / "checkpoints" / "last.pt"
        if (reuse and last.exists() and load_checkpoint(last).meta.get("step") == plan.steps) or (
            only is not None and name not in only
        ):
            return last
        cfg = replace(
            base,
            model=replace(base.model, name=model_name, init_checkpoint=str(dense)),
            train=replace(base.train, compute_weight=compute_weight),
        )
        train_central(cfg, fine_tune, run_dir=run_dir, resume=reuse, progress=progress)
        return last

    checkpoints = {DENSE: dense, DENSE_CONTINUED: trained(DENSE_CONTINUED, DENSE, 0.0)}
    checkpoints["sliding-window"] = trained("sliding-window", "sliding-window", 0.0)
    for lam in plan.lambdas:
        checkpoints[f"amortized-lambda{lam:g}"] = trained(f"amortized-lambda{lam:g}", "amortized", lam)
    return checkpoints


def _test_corpus(plan: BenchPlan, workdir: Path) -> Path:
    if plan.test_corpus:
        path = workdir / plan.test_corpus
        if not path.is_dir():
            raise ValueError(f"test corpus {path}: no such directory (make it with `chorus data synth ... --out {path}`)")
        return path
    return synthesize(workdir / "data" / "bench-compute-quick-test", speakers=3, utterances=4, seed=12, progress=False)


def _shipped(base: RunConfig, name: str) -> Path:
    path = init_checkpoint_path(replace(base.model, name=name, init_checkpoint=SHIPPED))
    assert path is not None  # "shipped" resolves to a file or raises
    return path


def run_compute_bench(
    plan: BenchPlan,
    *,
    workdir: Path,
    bench_id: str,
    reuse: bool = True,
    progress: bool = True,
    train_device: str = "cpu",
    shipped: bool = False,
) -> dict[str, Any]:
    """Train (or reuse) the plan's models and measure them with the shipped ConvRNN-T; with ``shipped``, measure
    only the shipped bases as they are (dense, amortized, ConvRNN-T: no training, minutes instead of an hour)."""
    started = time.monotonic()
    base = _base_config(plan, workdir)
    root = base.workdir_path / "runs" / bench_id
    test_corpus = _test_corpus(plan, workdir)
    if shipped:
        checkpoints = {DENSE: _shipped(base, DENSE), AMORTIZED: _shipped(base, AMORTIZED)}
    else:
        checkpoints = train_models(plan, workdir=workdir, bench_id=bench_id, reuse=reuse, progress=progress, device=train_device)
    checkpoints[CONVRNNT] = _shipped(base, CONVRNNT)  # its own base, as shipped

    loaded = {name: load_checkpoint(path) for name, path in checkpoints.items()}
    results: dict[str, dict[str, Any]] = {}
    models: dict[str, tuple[Transducer, int]] = {}
    greedy_of: dict[str, str] = {}  # a row -> the row of the same model under greedy search
    for name, path in checkpoints.items():
        model = loaded[name].build()
        for beam in (1, plan.beam) if plan.beam > 1 else (1,):
            arm = name if beam == 1 else f"{name}+beam{beam}"
            models[arm], greedy_of[arm] = (model, beam), name
            scored = evaluate_wer(path, test_corpus, by=("accent", "fleet"), beam=beam, limit=plan.eval_utterances)
            results[arm] = {
                "params": _params(model),
                "encoder_params": _params(model.encoder),
                "beam": beam,
                "wer": scored["wer"],
                "words": scored["words"],
                "by": scored["by"],
            }
            if plan.lead_silence_s > 0 and beam == 1:
                late = evaluate_wer(path, test_corpus, limit=plan.eval_utterances, lead_silence_s=plan.lead_silence_s)
                results[arm]["wer_lead_silence"] = late["wer"]

    frontend = loaded[DENSE].frontend
    assert frontend is not None  # a shipped base carries its front end
    corpus = load_corpus(test_corpus)
    utterances = sorted(corpus.utterances, key=lambda u: u.id)
    stream_utts = utterances[:: max(1, len(utterances) // plan.stream_utterances)][: plan.stream_utterances]
    features = FeatureCache(corpus, frontend.cmvn, max_items=len(stream_utts))
    for name, measured in _measure(
        models, stream_utts, features, plan.repeats, plan.lead_silence_s, plan.chunk_ms * FRAME_RATE // 1000
    ).items():
        results[name].update(measured)
    dense = results[DENSE]
    for name, row in results.items():
        # WER against a dense model under greedy search: the shipped one for itself and for every model measured
        # as shipped, the continued one (as many training steps) for every fine-tuned model; and against that
        # dense model under the row's own search (what the compute targets compare).
        reference_name = DENSE if shipped or greedy_of[name] in (DENSE, CONVRNNT) else DENSE_CONTINUED
        reference = results[reference_name]["wer"]
        same_search = results[reference_name if row["beam"] == 1 else f"{reference_name}+beam{row['beam']}"]["wer"]
        row["relative_flops_vs_dense"] = row["encoder_gflops_per_audio_second"] / dense["encoder_gflops_per_audio_second"]
        ratios = sorted(t / d for t, d in zip(row["pass_seconds"], dense["pass_seconds"]))
        row["relative_wall_vs_dense"] = statistics.median(ratios)
        row["relative_wall_range"] = [ratios[0], ratios[-1]]
        row["relative_wer_vs_dense"] = row["wer"] / reference if reference > 0 else float("nan")
        row["relative_wer_vs_dense_same_search"] = row["wer"] / same_search if same_search > 0 else float("nan")
        if "encoder_gflops_per_audio_second_lead_silence" in row:
            row["relative_flops_vs_dense_lead_silence"] = (
                row["encoder_gflops_per_audio_second_lead_silence"] / dense["encoder_gflops_per_audio_second_lead_silence"]
            )

    summary = {"models": results, "amortized_curve": []} if shipped else _trained_summary(plan, results)
    summary |= {
        "all_models": results,
        "checkpoints": {name: str(path) for name, path in checkpoints.items()},
        "settings": {
            "plan": {k: v for k, v in asdict(plan).items()},
            "shipped": shipped,
            "test_corpus": str(test_corpus),
            "chunk_ms": plan.chunk_ms,
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


def _trained_summary(plan: BenchPlan, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline rows of a run that trained the plan's models, and the amortized models' WER-compute curve."""
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
    return {
        "models": {
            DENSE: results[DENSE],
            DENSE_CONTINUED: results[DENSE_CONTINUED],
            "sliding-window": results["sliding-window"],
            CONVRNNT: results[CONVRNNT],
            AMORTIZED: {**results[f"amortized-lambda{chosen['lambda']:g}"], "lambda": chosen["lambda"]},
        },
        "amortized_curve": curve,
    }


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
        "| model | params | WER | rel. WER | rel. WER, same search | encoder GFLOPs / audio s | rel. FLOPs | executed share "
        "| batch-1 RTF | rel. wall, median (range) of passes "
        "| WER, lead-in | rel. FLOPs, lead-in | executed share, lead-in |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        return "" if row.get(key) is None else format(row[key], fmt)

    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['params']:,} | {cell(r, 'wer', '.4f')} | {cell(r, 'relative_wer_vs_dense', '.3f')} | "
            f"{cell(r, 'relative_wer_vs_dense_same_search', '.3f')} | "
            f"{r['encoder_gflops_per_audio_second']:.3f} | {r['relative_flops_vs_dense']:.3f} | "
            f"{cell(r, 'executed_share', '.1%')} | {cell(r, 'batch1_streaming_rtf', '.4f')} | "
            f"{cell(r, 'relative_wall_vs_dense', '.3f')} ({r['relative_wall_range'][0]:.2f}-{r['relative_wall_range'][1]:.2f}) | "
            f"{cell(r, 'wer_lead_silence', '.4f')} | "
            f"{cell(r, 'relative_flops_vs_dense_lead_silence', '.3f')} | {cell(r, 'executed_share_lead_silence', '.1%')} |"
        )
    lead = summary["settings"]["plan"]["lead_silence_s"]
    lines += ["", f"Lead-in: {lead:g} s of each test recording's own noise floor before the speech (0: not measured)."]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    curve = summary["amortized_curve"]
    ax.plot([c["relative_flops_vs_dense"] for c in curve], [c["wer"] for c in curve], "o-", label="amortized (lambda)")
    for c in curve:
        ax.annotate(f"{c['lambda']:g}", (c["relative_flops_vs_dense"], c["wer"]))
    for name, marker in ((DENSE, "s"), (DENSE_CONTINUED, "x"), ("sliding-window", "^"), (CONVRNNT, "D"), (AMORTIZED, "o")):
        if name not in rows:
            continue
        ax.plot([rows[name]["relative_flops_vs_dense"]], [rows[name]["wer"]], marker, label=name)
    ax.set(xlabel="encoder FLOPs relative to dense", ylabel="held-out WER", title="WER vs compute")
    ax.legend()
    fig.tight_layout()
    fig.savefig(root / "wer_vs_compute.png", dpi=100)
    plt.close(fig)
    lines += ["", "![WER vs compute](wer_vs_compute.png)", ""]
    (root / "report.md").write_text("\n".join(lines))


def main(
    *,
    quick: bool,
    workdir: Path,
    bench_id: str,
    reuse: bool,
    as_json: bool,
    train_device: str = "cpu",
    shipped: bool = False,
    beam: int = 1,
    chunk_ms: int = CHUNK_MS,
) -> None:
    plan = replace(QUICK if quick else FULL, beam=beam, chunk_ms=chunk_ms)
    with contextlib.redirect_stdout(sys.stderr):  # progress to stderr: stdout carries only the result
        summary = run_compute_bench(
            plan,
            workdir=workdir,
            bench_id=bench_id,
            reuse=reuse,
            progress=sys.stderr.isatty(),
            train_device=train_device,
            shipped=shipped,
        )
    if as_json:
        json.dump(summary, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print((Path(summary["run_dir"]) / "report.md").read_text())
