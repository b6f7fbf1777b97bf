"""`chorus train`: central pretraining on the public speakers, the model that federation starts from.

Checkpoints every ``ckpt_every`` steps hold the model, the optimizer, the step and the RNG states, so
``--resume`` after a crash continues exactly where the last checkpoint left off. The held-out speakers score
the model every ``eval_every`` steps; the best one is kept as ``best.pt``. With ``average`` = N the weights of
the last N checkpoints are kept too (``step<S>.pt``) and the run ends by writing their mean, ``averaged.pt``
(checkpoint averaging over the cosine schedule's low-learning-rate tail, as icefall decodes with ``--avg``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from server.report import MetricsLog
from shared.config import RunConfig
from shared.data.corpora import parse_speaker_filter, speakers_matching
from shared.data.dataset import FeatureCache, make_batches
from shared.data.prepare import Prepared, prepare
from shared.models.amortized_transformer import is_arbitrator
from shared.models.checkpoint import Frontend, average_checkpoints, initial_model, load_checkpoint, load_state, save_checkpoint
from shared.models.transducer import Transducer
from shared.training import score, train_recipe, train_steps

__all__ = ["TrainPlan", "base_model", "train_central"]


@dataclass(frozen=True)
class TrainPlan:
    steps: int = 3000
    peak_lr: float = 2e-3
    warmup: int = 300  # transducers diverge without a warm-up at this learning rate
    eval_every: int = 500
    ckpt_every: int = 250
    eval_utterances: int = 200
    speakers: str = "public"  # public | train (public + federated: an upper bound, data a vendor never has)
    device: str = "cpu"  # e.g. "cuda": the same recipe, faster; checkpoints are saved on the CPU either way
    average: int = 0  # > 0: keep the last N checkpoints' weights and write their mean as averaged.pt
    # Peak lr of an amortized model's arbitrators (0: peak_lr). Arbitrators fresh on a trained dense base need a
    # from-scratch rate to learn to skip, while the blocks they gate fine-tune gently at peak_lr.
    arbitrator_lr: float = 0.0
    # "ATTRIBUTE=V1,V2": leave out the training speakers whose speakers.tsv ATTRIBUTE is one of the values, e.g.
    # "accent=en-029,en-gb-scotland,en-gb-x-gbcwmd" (the legacy fleet's markets): a public pool without them.
    withhold: str = ""
    # > 0: a wall-clock budget in minutes for the whole call (data preparation included). After its first
    # checkpoint the run measures its pace and shortens ``steps`` so that the whole cosine schedule ends in time.
    max_minutes: float = 0.0

    def __post_init__(self) -> None:
        if self.max_minutes < 0:
            raise ValueError(f"max_minutes={self.max_minutes} must be >= 0")
        if self.withhold:
            try:
                parse_speaker_filter(self.withhold)
            except ValueError as err:
                raise ValueError(f"withhold={err}") from None


def _lr_at(step: int, plan: TrainPlan) -> float:
    if step < plan.warmup:
        return plan.peak_lr * (step + 1) / plan.warmup
    progress = (step - plan.warmup) / max(1, plan.steps - plan.warmup)
    return plan.peak_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def base_model(
    cfg: RunConfig,
    steps: int,
    run_dir: Path,
    *,
    eval_utterances: int,
    withhold: str = "",
    reuse: bool = True,
    progress: bool = False,
) -> Path:
    """An evaluation's own base model when it is given none: ``steps`` steps of central training (a fifth of them,
    at most 300, warm-up; scored once, at the end), or the ``best.pt`` an earlier call left in ``run_dir``."""
    best = run_dir / "checkpoints" / "best.pt"
    if reuse and best.exists():
        return best
    plan = TrainPlan(
        steps=steps,
        warmup=max(1, min(300, steps // 5)),
        eval_every=steps,
        ckpt_every=steps,
        eval_utterances=eval_utterances,
        withhold=withhold,
    )
    return train_central(cfg, plan, run_dir=run_dir, progress=progress)


def _fit_budget(plan: TrainPlan, step: int, seconds_per_step: float, seconds_left: float) -> TrainPlan:
    """``plan`` with ``steps`` cut to what ``seconds_left`` affords at ``seconds_per_step``, a tenth kept for
    held-out scoring and the last checkpoints; a whole number of checkpoints, never fewer than ``step``."""
    affordable = step + int(0.9 * max(0.0, seconds_left) / seconds_per_step)
    steps = max(step, min(plan.steps, affordable // plan.ckpt_every * plan.ckpt_every))
    if steps < plan.steps:
        print(f"max_minutes={plan.max_minutes}: {seconds_per_step:.3f} s a step, so {steps} steps", flush=True)
    return replace(plan, steps=steps)


def _train_speakers(prepared: Prepared, which: str, withhold: str) -> tuple[str, ...]:
    if which == "public":
        speakers = prepared.split.public
    elif which == "train":
        speakers = prepared.split.public + prepared.split.federated
    else:
        raise ValueError(f"speakers={which!r}: choose public or train")
    if not withhold:
        return speakers
    try:
        withheld = speakers_matching(prepared.corpus.root, withhold)
    except ValueError as err:
        raise ValueError(f"withhold={err}") from None
    return tuple(s for s in speakers if s not in withheld)


def train_central(cfg: RunConfig, plan: TrainPlan, *, run_dir: Path, resume: bool = False, progress: bool = True) -> Path:
    """Train ``plan.steps`` steps; returns the path of the best checkpoint (by held-out WER)."""
    called = time.monotonic()
    prepared = prepare(cfg, progress=progress)
    by_speaker = prepared.corpus.by_speaker()
    train_utts = [u for s in _train_speakers(prepared, plan.speakers, plan.withhold) for u in by_speaker.get(s, [])]
    heldout = [u for s in prepared.split.heldout for u in by_speaker.get(s, [])]
    heldout = heldout[:: max(1, len(heldout) // plan.eval_utterances)][: plan.eval_utterances]
    features = FeatureCache(prepared.corpus, prepared.cmvn, max_items=len(train_utts) + len(heldout))
    features.warm(train_utts + heldout)
    frontend = Frontend(tokenizer=prepared.tokenizer, cmvn=prepared.cmvn)
    ckpt_dir = run_dir / "checkpoints"
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    (run_dir / "config.json").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(
        json.dumps({**cfg.to_flat(), **{f"plan.{k}": v for k, v in plan.__dict__.items()}}, indent=1)
    )

    torch.manual_seed(cfg.train.seed)
    try:
        device = torch.device(plan.device)
        model: Transducer = initial_model(cfg.model).to(device)
    except (RuntimeError, AssertionError) as err:  # e.g. "cuda" on a machine without a GPU
        raise ValueError(f"device={plan.device!r} is not usable here: {err}") from err
    arbitrators = [p for name, p in model.named_parameters() if is_arbitrator(name)]
    others = [p for name, p in model.named_parameters() if not is_arbitrator(name)]
    scales = [1.0, (plan.arbitrator_lr or plan.peak_lr) / plan.peak_lr]  # each group's lr relative to the schedule
    groups = [{"params": others}] + ([{"params": arbitrators}] if arbitrators else [])
    optimizer = torch.optim.AdamW(groups, lr=plan.peak_lr, weight_decay=1e-3)
    step, best_wer = 0, float("inf")
    if resume and (ckpt_dir / "last.pt").exists():
        ckpt = load_checkpoint(ckpt_dir / "last.pt", expect=cfg.model)
        load_state(model, ckpt.state_dict, source=str(ckpt_dir / "last.pt"))
        optimizer.load_state_dict(ckpt.meta["optimizer"])
        torch.set_rng_state(ckpt.meta["rng"])
        step, best_wer = int(ckpt.meta["step"]), float(ckpt.meta["best_wer"])
        kept = [r for r in metrics.records() if r["step"] <= step]
        metrics.path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    else:
        metrics.path.unlink(missing_ok=True)

    epoch = step // max(1, plan.ckpt_every)
    began, first_step = time.monotonic(), step
    columns = [
        TextColumn("[bold]central training"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    ]
    with Progress(*columns, disable=not (progress and sys.stdout.isatty())) as bar:
        task = bar.add_task("train", total=plan.steps, completed=step, status="")
        while step < plan.steps:
            # Reshuffle at every checkpoint boundary, seeded by it, so a resumed run sees the same batches.
            batches = make_batches(
                train_utts,
                features=features,
                tokenizer=prepared.tokenizer,
                max_frames=cfg.train.batch_frames,
                shuffle=True,
                seed=cfg.train.seed + epoch,
            )
            chunk = min(plan.ckpt_every - step % plan.ckpt_every, plan.steps - step)
            start = time.monotonic()
            losses = []
            for _ in range(chunk):
                for group, scale in zip(optimizer.param_groups, scales):
                    group["lr"] = _lr_at(step, plan) * scale
                stats = train_steps(
                    model,
                    [batches[step % len(batches)]],
                    steps=1,
                    optimizer=optimizer,
                    **train_recipe(cfg.train, step),
                )
                losses.append(stats.loss)
                step += 1
                bar.update(task, completed=step, status=f"loss {stats.loss:.3f}")
            record: dict[str, float | int | None] = {
                "step": step,
                "train_loss": sum(losses) / len(losses),
                "lr": _lr_at(step - 1, plan),
                "seconds": round(time.monotonic() - start, 2),
            }
            if step % plan.eval_every == 0 or step == plan.steps:
                counts, _ = score(model, heldout, features=features, tokenizer=prepared.tokenizer)
                record["heldout_wer"] = counts.wer
                if counts.wer < best_wer:
                    best_wer = counts.wer
                    save_checkpoint(ckpt_dir / "best.pt", model, cfg.model, frontend=frontend, step=step, heldout_wer=counts.wer)
                bar.update(task, status=f"loss {record['train_loss']:.3f}  held-out WER {counts.wer:.3f}")
            metrics.append(record)
            if progress and not sys.stdout.isatty():  # no live bar in a log file: one line per checkpoint
                print(json.dumps(record, sort_keys=True), flush=True)
            epoch += 1
            save_checkpoint(
                ckpt_dir / "last.pt",
                model,
                cfg.model,
                frontend=frontend,
                step=step,
                best_wer=best_wer,
                optimizer=optimizer.state_dict(),
                rng=torch.get_rng_state(),
            )
            if plan.average > 0:
                _keep_for_average(ckpt_dir, model, cfg, frontend, step, plan.average)
            if plan.max_minutes > 0 and step - first_step == chunk:  # the first chunk of this process sets the pace
                now = time.monotonic()
                plan = _fit_budget(plan, step, (now - began) / chunk, plan.max_minutes * 60 - (now - called))
                bar.update(task, total=plan.steps)
    if plan.average > 0:
        steps_kept = _averaged_steps(ckpt_dir)
        averaged = average_checkpoints(steps_kept)
        path = save_checkpoint(
            ckpt_dir / "averaged.pt",
            averaged.build(),
            cfg.model,
            frontend=frontend,
            step=step,
            averaged=[p.name for p in steps_kept],
        )
        if progress:
            names = ", ".join(p.name for p in steps_kept)
            print(f"averaged {len(steps_kept)} checkpoints ({names}) into {path}", flush=True)
    best = ckpt_dir / "best.pt"
    return best if best.exists() else ckpt_dir / "last.pt"


def _averaged_steps(ckpt_dir: Path) -> list[Path]:
    """The ``step<S>.pt`` files a run keeps for averaging, oldest first."""
    return sorted(ckpt_dir.glob("step*.pt"), key=lambda p: int(p.stem.removeprefix("step")))


def _keep_for_average(ckpt_dir: Path, model: Transducer, cfg: RunConfig, frontend: Frontend, step: int, keep: int) -> None:
    """Write this checkpoint's weights as ``step<S>.pt`` and drop all but the newest ``keep``."""
    save_checkpoint(ckpt_dir / f"step{step}.pt", model, cfg.model, frontend=frontend, step=step)
    for old in _averaged_steps(ckpt_dir)[:-keep]:
        old.unlink()
