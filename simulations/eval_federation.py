"""`chorus eval federation`: the scenario federation exists for, a market the vendor has no data from.

A *launch base* is the recognizer trained on a public pool without some markets (``chorus train --withhold
accent=...``: the legacy fleet's three accents by default). Devices of every market then fine-tune it with FedAvg
through ``chorus simulate`` (Flower's simulation engine, Ray): ``per_round`` of ``devices`` each round, sampled
uniformly or chosen by Power-of-Choice (``strategy.selection``: the highest loss among candidates).
Each round's global model is kept (``eval.keep-round-models``) and measured here, per market (accent), on

    devices    every device's own local-eval utterances (sampled that round or not), decoded as a device does
    held-out   the held-out speakers of each market: speakers no device and no base model ever trained on

Round 0 is the launch base. Beside the rounds, the *central bound*: the launch base fine-tuned on one machine
on the same devices' training utterances pooled (``NewMarketPlan.central_steps``), measured on the same sets: what
FedAvg could at best reach with the devices' data, so that a miss can be told apart as federation's or the data's.
*Personalization* (Shor et al.'s setting, the target's reference): each of the first ``personal_devices`` devices
fine-tunes the launch base, and the last round's global model, on its own training utterances alone
(``fine_tune``, nothing sent); its own local-eval utterances are decoded with each model as received, as
personalized, and as ``personalize`` keeps it (personalized only where a check on set-aside training utterances
says it helps). The summary compares round 0 with the last round for the new markets (withheld from the base) and the served
ones, against the targets: new markets' WER falls >= 25% relative (goal 35%: Shor et al. 2019 personalizing to
accented speech; FedNST -22.5% federated) while served markets get no worse than +2%.

The devices' local recipe (learning rate, local steps, EWC strength) is chosen first by a small sweep
(``Sweep``): each candidate federates the launch base for a few rounds on its own fresh speakers (another synth
seed, so the recipe is not picked on the speakers it is reported on), and the one with the lowest new-market
device WER whose served markets' held-out WER rose no more than the +2% target wins (none within it: the one that
forgot least). The sweep's table is in the report; ``--no-sweep`` keeps the plan's recipe (and ``--set``'s).

Plans: ``QUICK`` is CI-sized (a tiny model trained 40 steps here as its own launch base, 10 devices, 2 rounds,
no sweep): its numbers prove the pipeline only. ``FULL``: 200 devices of a fresh 320-speaker corpus (seed 11, 45
training and 15 eval utterances a device), 30 per round chosen by Power-of-Choice among 60 candidates, 5 rounds, from
the launch base ``--checkpoint`` (default: the shipped ``launch-6.pt``), a 1,200-step central bound and 48-step
personalization of 60 devices, decoded and checked with beam search (width 8; the rounds with greedy search).
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from shared.config import TINY_MODEL, RunConfig, search_name
from shared.console import progress_to_stderr
from shared.data.corpora import Utterance, read_speakers_tsv
from shared.data.dataset import FeatureCache, make_batches
from shared.data.prepare import Prepared, PrepareError, corpus_dir, plan_split, prepare
from shared.metrics import ErrorCounts
from shared.models.checkpoint import build_model, initial_model, load_checkpoint, save_checkpoint
from shared.models.transducer import Transducer
from shared.training import score, train_recipe, train_steps

if TYPE_CHECKING:
    from client.data import DeviceData

__all__ = ["FULL", "LEGACY", "QUICK", "NewMarketPlan", "main", "run_federation_eval", "shipped_launch_base", "speaker_accents"]

LEGACY = ("en-029", "en-gb-scotland", "en-gb-x-gbcwmd")  # the legacy fleet's markets (shared/data/synth.py)
TARGETS = {"new_markets_relative": -0.25, "new_markets_goal": -0.35, "served_markets_relative": 0.02}
LAUNCH_BASE = "launch-6.pt"  # the shipped launch base (shared/models/shipped/)
# a local recipe, as reported
RECIPE_KEYS = ("train.optimizer", "train.lr", "train.local-steps", "fairness.ewc-lambda", "strategy.name")


@dataclass(frozen=True)
class Sweep:
    """Candidate local recipes, tried on a corpus of their own before the measured federation."""

    recipes: tuple[dict[str, Any], ...]  # run-config keys of each candidate (over the plan's overrides)
    corpus: dict[str, Any]  # the sweep corpus' keys over the plan's (another synth seed: fresh speakers)
    devices: int
    per_round: int
    rounds: int


@dataclass(frozen=True)
class NewMarketPlan:
    name: str  # quick | full
    overrides: dict[str, Any]  # run-config keys: corpus, split, model, the devices' local recipe
    withheld: tuple[str, ...]  # accents the launch base never heard: the new markets
    devices: int
    per_round: int
    rounds: int
    base_steps: int  # > 0: train the launch base here (QUICK); 0: --checkpoint or the shipped one
    sweep: Sweep | None = None  # the local-recipe sweep run first (None: the plan's recipe)
    # The central bound: the launch base fine-tuned centrally on the devices' own training utterances pooled (the
    # same data, no federation: what FedAvg could at best reach with it), ``central_steps`` AdamW steps at
    # ``central_lr`` (0 steps: not run).
    central_steps: int = 0
    central_lr: float = 3e-4
    # Personalization (Shor et al.'s setting): each device fine-tunes a model on its own training utterances alone,
    # ``personal_steps`` AdamW steps at ``personal_lr``, and keeps it (always, or where a check says it helps);
    # measured from the launch base and from the last round's global model on the first ``personal_devices``
    # devices' own local-eval utterances (0 steps: not run; 0 devices: all of them).
    personal_steps: int = 0
    personal_lr: float = 3e-4
    personal_devices: int = 0
    # the search the personalizing devices decode and check with (1: greedy, the rounds' ``eval.beam``; more: modified
    # beam search of that width, as `chorus device personalize --beam` and `transcribe --beam` run it)
    personal_beam: int = 1

    def with_overrides(
        self,
        overrides: dict[str, Any],
        *,
        devices: int | None = None,
        per_round: int | None = None,
        rounds: int | None = None,
        sweep: bool = True,
    ) -> NewMarketPlan:
        """The plan with extra run-config keys (``--set``, checked against the run config at once), other
        ``devices`` / ``per_round`` / ``rounds`` (None keeps the plan's), and without its sweep (``sweep=False``)."""
        merged = {**self.overrides, **overrides}
        RunConfig.from_flat(merged)  # ConfigError naming an unknown key or a bad value
        for recipe in self.sweep.recipes if self.sweep and sweep else ():
            RunConfig.from_flat({**merged, **recipe})
        plan = replace(
            self,
            overrides=merged,
            devices=self.devices if devices is None else devices,
            per_round=self.per_round if per_round is None else per_round,
            rounds=self.rounds if rounds is None else rounds,
            sweep=self.sweep if sweep else None,
        )
        if not 1 <= plan.per_round <= plan.devices or plan.rounds < 1:
            raise ValueError(f"need 1 <= per-round ({plan.per_round}) <= devices ({plan.devices}) and rounds >= 1")
        return plan


QUICK = NewMarketPlan(
    name="quick",
    overrides={
        **TINY_MODEL,
        "synth.speakers": 24,
        "synth.utterances": 8,
        "synth.seed": 2,
        "split.public-speakers": 8,
        "split.heldout-speakers": 4,
        "train.local-steps": 3,
        "train.lr": 1e-3,
        "train.batch-frames": 3000,
        "eval.heldout-utterances": 8,
        # the full plan's selection, at its ratio of candidates to devices trained
        "strategy.selection": "power-of-choice",
        "strategy.candidates": 8,
    },
    withheld=LEGACY,
    devices=10,
    per_round=4,
    rounds=2,
    base_steps=40,
    central_steps=10,
    central_lr=1e-3,
    personal_steps=2,
    personal_lr=1e-3,
    # No sweep: each candidate is a Flower simulation of its own (start-up is most of --quick's time); the choice
    # among candidates is unit-tested, and ``FULL`` sweeps.
    sweep=None,
)
# 320 fresh speakers (seed 11: none of them is in the launch base's seed-1 pool): 200 devices, 80 held-out
# speakers (10 per market on average), 40 public ones the run does not use (the base brings its own front end).
FULL = NewMarketPlan(
    name="full",
    overrides={
        "synth.speakers": 320,
        # 60 utterances a speaker: 45 to train on and 15 to evaluate on each device (with 15 and 5 neither
        # federation nor personalization moved the new markets far: README)
        "synth.utterances": 60,
        "synth.seed": 11,
        "split.public-speakers": 40,
        "split.heldout-speakers": 80,
        "train.local-steps": 8,
        "train.lr": 3e-4,
        # No lead-in silence: the launch base never trained with it, and devices fine-tune a base under its own
        # recipe (as they take its dropout); with it uniform FedAvg forgot the served markets (README).
        "train.lead-silence-s": 0.0,
        # Power-of-Choice: each round the 30 of 60 candidates with the highest loss train (README: within the
        # served markets' bound where every device as a candidate was not)
        "strategy.selection": "power-of-choice",
        "strategy.candidates": 60,
        "eval.heldout-utterances": 200,
    },
    withheld=LEGACY,
    devices=200,
    per_round=30,
    rounds=5,
    base_steps=0,
    central_steps=1200,
    central_lr=3e-4,
    personal_steps=48,
    personal_lr=3e-4,
    personal_devices=60,
    # beam search helps personalized models more than the models they start from (README); per-utterance beam search
    # over every round's 7,800 utterances would cost hours, so the rounds stay greedy
    personal_beam=8,
    # Seven recipes, each 2 rounds of 20 of 60 devices of 160 fresh seed-12 speakers (40 of them held out). SGD
    # steps scale with a device's gradient, 3-4x larger on the new markets' devices than on the served ones'.
    sweep=Sweep(
        recipes=(
            {"train.lr": 1e-4, "train.local-steps": 8},
            {"train.lr": 3e-4, "train.local-steps": 8},
            {"train.lr": 3e-4, "train.local-steps": 24},
            {"train.lr": 1e-3, "train.local-steps": 8},
            {"train.lr": 3e-4, "train.local-steps": 24, "fairness.enabled": True, "fairness.ewc-lambda": 10.0},
            {"train.optimizer": "sgd", "train.lr": 0.1, "train.local-steps": 8},
            {"train.optimizer": "sgd", "train.lr": 0.3, "train.local-steps": 8},
        ),
        corpus={"synth.speakers": 160, "synth.seed": 12, "split.heldout-speakers": 40, "strategy.candidates": 40},
        devices=60,
        per_round=20,
        rounds=2,
    ),
)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def shipped_launch_base() -> Path:
    """The shipped launch base; FileNotFoundError naming what to pass instead while none ships."""
    from shared.models.checkpoint import SHIPPED_DIR

    shipped = SHIPPED_DIR / LAUNCH_BASE
    if not shipped.is_file():
        raise FileNotFoundError(
            f"no launch base: {shipped} is not shipped yet; pass --checkpoint (a `chorus train --withhold "
            f"accent={','.join(LEGACY)}` checkpoint)"
        )
    return shipped


def _launch_base(cfg: RunConfig, plan: NewMarketPlan, out: Path, checkpoint: Path | None) -> Path:
    """The checkpoint federation starts from: ``checkpoint`` (given, or the shipped launch base), or (QUICK) one
    trained here on the public speakers without the withheld markets."""
    if checkpoint is not None:
        return checkpoint
    from simulations.train import base_model

    withhold = f"accent={','.join(plan.withheld)}"
    return base_model(cfg, plan.base_steps, out / "launch-base", eval_utterances=cfg.eval.heldout_utterances, withhold=withhold)


def _finished(run_dir: Path, cfg: RunConfig) -> bool:
    """An earlier federation of exactly this config kept all its round models (an interrupted evaluation restarts
    from the measurements)."""
    from server.workflow import same_run_config

    return same_run_config(run_dir, cfg) and (run_dir / "checkpoints" / f"round-{cfg.num_server_rounds}.pt").is_file()


def speaker_accents(corpus_root: Path) -> dict[str, str]:
    """speaker id -> accent (a market), from the corpus' speakers.tsv ("?" where a row has none)."""
    return {speaker: row.get("accent", "?") for speaker, row in read_speakers_tsv(corpus_root).items()}


def _by_market(
    model: Transducer,
    utterances: Sequence[Utterance],
    features: FeatureCache,
    prepared: Prepared,
    accent: dict[str, str],
    beam: int,
) -> dict[str, ErrorCounts]:
    """accent -> ErrorCounts of ``model`` over ``utterances`` (greedy or beam, as the devices decode)."""
    with torch.inference_mode():
        _, per_utt = score(model, utterances, features=features, tokenizer=prepared.tokenizer, beam=beam)
    speaker_of = {u.id: u.speaker for u in utterances}
    markets: dict[str, ErrorCounts] = defaultdict(lambda: ErrorCounts(0, 0, 0))
    for utt_id, counts in per_utt.items():
        markets[accent[speaker_of[utt_id]]] += counts
    return dict(markets)


def _pooled(markets: dict[str, ErrorCounts], names: Sequence[str]) -> ErrorCounts:
    total = ErrorCounts(0, 0, 0)
    for name in names:
        total += markets.get(name, ErrorCounts(0, 0, 0))
    return total


def _wer(counts: ErrorCounts) -> float | None:
    return round(counts.wer, 4) if counts.words else None


def _table(markets: dict[str, ErrorCounts]) -> dict[str, dict[str, float | int | None]]:
    """market -> its WER and words, as the JSON and the report show them."""
    return {m: {"wer": _wer(c), "words": c.words} for m, c in sorted(markets.items())}


def _change(before: ErrorCounts, after: ErrorCounts) -> dict[str, float | int | None]:
    rel = (after.wer - before.wer) / before.wer if before.words and before.wer > 0 else None
    return {
        "before": _wer(before),
        "after": _wer(after),
        "relative": None if rel is None else round(rel, 4),
        "words": before.words,
    }


def _central(
    cfg: RunConfig, plan: NewMarketPlan, train: Sequence[Utterance], features: FeatureCache, prepared: Prepared, path: Path
) -> Transducer:
    """The central bound's model: the launch base (``cfg.model.init-checkpoint``) fine-tuned on ``train``, the
    devices' training utterances pooled, with the devices' objective (SpecAugment, CTC, FastEmit) and a constant
    AdamW rate; reused from ``path`` when an earlier call of the same config and data wrote it."""
    key = {"config": cfg.to_flat(), "steps": plan.central_steps, "lr": plan.central_lr, "utterances": len(train)}
    if path.is_file():
        kept = load_checkpoint(path)
        if kept.meta.get("central") == key:
            return kept.build()
    batches = make_batches(
        train,
        features=features,
        tokenizer=prepared.tokenizer,
        max_frames=cfg.train.batch_frames,
        shuffle=True,
        seed=cfg.train.seed,
    )
    torch.manual_seed(cfg.train.seed)
    model = initial_model(cfg.model)
    train_steps(
        model,
        batches,
        steps=plan.central_steps,
        optimizer=torch.optim.AdamW(model.parameters(), lr=plan.central_lr),
        **train_recipe(cfg.train, cfg.train.seed),
    )
    save_checkpoint(path, model, cfg.model, central=key)
    return model


def _personalized(
    cfg: RunConfig, state: dict[str, torch.Tensor], devices: Sequence[DeviceData], markets: Sequence[str]
) -> tuple[dict[str, ErrorCounts], dict[str, ErrorCounts], dict[str, ErrorCounts], int]:
    """(as received, personalized, checked, devices that kept theirs), per market: each device's own local-eval
    utterances decoded with ``state``, with ``state`` fine-tuned on the device's own training utterances by
    ``fine_tune`` (``cfg.train``'s local recipe; nothing of it sent), and with the model ``personalize`` keeps:
    the fine-tuned one where ``check_personalization`` found it better on set-aside training utterances, else
    ``state``."""
    from client.train import check_personalization, device_errors, fine_tune

    model = build_model(cfg.model)

    def decode(weights: dict[str, torch.Tensor], data: DeviceData) -> ErrorCounts:
        return device_errors(model, weights, data.eval, data, beam=cfg.eval.beam)

    received: dict[str, ErrorCounts] = defaultdict(lambda: ErrorCounts(0, 0, 0))
    personal: dict[str, ErrorCounts] = defaultdict(lambda: ErrorCounts(0, 0, 0))
    checked: dict[str, ErrorCounts] = defaultdict(lambda: ErrorCounts(0, 0, 0))
    kept = 0
    for pid, (data, market) in enumerate(zip(devices, markets)):
        as_received = decode(state, data)
        # personalize(), unrolled: its fine-tuning on all training utterances is this one, same seed
        fine_tuned = decode(fine_tune(cfg, state, data, server_round=0, partition_id=pid).state_dict, data)
        keep = check_personalization(cfg, state, data, partition_id=pid).keep
        received[market] += as_received
        personal[market] += fine_tuned
        checked[market] += fine_tuned if keep else as_received
        kept += keep
    return dict(received), dict(personal), dict(checked), kept


def _federate(
    flat: dict[str, Any],
    plan: NewMarketPlan,
    base: Path,
    *,
    run_id: str,
    devices: int,
    per_round: int,
    rounds: int,
    central: bool = False,
    personalize: bool = False,
) -> dict[str, Any]:
    """Federate ``base`` through ``chorus simulate`` and measure every round's global model per market on the
    devices' own local-eval utterances and the held-out speakers; reuses a finished run of the same config.
    ``central``: measure the plan's central bound on the same devices beside it; ``personalize``: the plan's
    personalization, from the launch base and from the last round's model."""
    central = central and plan.central_steps > 0
    personalize = personalize and plan.personal_steps > 0
    from client.data import device_data
    from simulations.simulate import available_cores, sampling_overrides, simulate

    start = time.monotonic()
    parallel = min(available_cores(), per_round)
    cfg = RunConfig.from_flat(
        {
            **flat,
            **sampling_overrides(devices, per_round, parallel=parallel),
            "num-server-rounds": rounds,
            "eval.keep-round-models": True,
            "model.init-checkpoint": str(base.resolve()),
            "run-id": run_id,
        }
    )
    _enough_devices(cfg, devices)
    prepared = prepare(cfg, progress=False)
    run_dir = cfg.workdir_path / "runs" / cfg.run_id
    if _finished(run_dir, cfg):
        _note(f"{run_id}: reusing {run_dir} (same config, all rounds done)")
    else:
        run_dir = simulate(cfg, num_supernodes=devices, progress=False, parallel=parallel)
    _note(f"{run_id}: {rounds} rounds done at {time.monotonic() - start:.0f} s")

    accent = speaker_accents(prepared.corpus.root)
    by_speaker = prepared.corpus.by_speaker()
    local = [device_data(cfg, pid) for pid in range(devices)]
    sets = {
        "devices": [u for data in local for u in data.eval],
        "heldout": [u for s in prepared.split.heldout for u in by_speaker.get(s, [])],
    }
    train = [u for data in local for u in data.train] if central else []
    features = FeatureCache(prepared.corpus, prepared.cmvn, max_items=sum(len(v) for v in sets.values()) + len(train))
    features.warm([u for utts in sets.values() for u in utts] + train)
    measured: list[dict[str, Any]] = []
    for r in range(rounds + 1):
        model = load_checkpoint(run_dir / "checkpoints" / f"round-{r}.pt").build().eval()
        row: dict[str, Any] = {"round": r}
        for name, utts in sets.items():
            markets = _by_market(model, utts, features, prepared, accent, cfg.eval.beam)
            row[name] = _table(markets)
            row[f"{name}_counts"] = markets
        measured.append(row)
        _note(f"{run_id}: round {r} measured at {time.monotonic() - start:.0f} s")

    bound: dict[str, Any] | None = None
    if central:
        began = time.monotonic()
        model = _central(cfg, plan, train, features, prepared, run_dir / "checkpoints" / "central.pt").eval()
        bound = {"steps": plan.central_steps, "lr": plan.central_lr, "utterances": len(train)}
        for name, utts in sets.items():
            markets = _by_market(model, utts, features, prepared, accent, cfg.eval.beam)
            bound[name] = _table(markets)
            bound[f"{name}_counts"] = markets
        bound["seconds"] = round(time.monotonic() - began, 1)
        _note(f"{run_id}: the central bound ({plan.central_steps} steps) measured at {time.monotonic() - start:.0f} s")

    seen = sorted({m for row in measured for name in sets for m in row[name]})
    new = [m for m in seen if m in plan.withheld]
    served = [m for m in seen if m not in plan.withheld]

    def compare(before: dict[str, ErrorCounts], after: dict[str, ErrorCounts]) -> dict[str, Any]:
        groups = (("new_markets", new), ("served_markets", served))
        return {group: _change(_pooled(before, members), _pooled(after, members)) for group, members in groups}

    def summarize(after: dict[str, Any]) -> dict[str, Any]:
        return {name: compare(measured[0][f"{name}_counts"], after[f"{name}_counts"]) for name in sets}

    personal: dict[str, Any] | None = None
    if personalize:
        began = time.monotonic()
        count = min(devices, plan.personal_devices or devices)
        recipe = {
            "train.local-steps": plan.personal_steps,
            "train.lr": plan.personal_lr,
            "train.optimizer": "adamw",
            "eval.beam": plan.personal_beam,
        }
        personal_cfg = RunConfig.from_flat({**cfg.to_flat(), **recipe})
        owners = [accent[prepared.speaker_for_partition(pid)] for pid in range(count)]
        counts: dict[str, dict[str, ErrorCounts]] = {}
        kept: dict[str, int] = {}
        for start_name, r in (("launch_base", 0), ("federated", rounds)):
            state = load_checkpoint(run_dir / "checkpoints" / f"round-{r}.pt").state_dict
            (
                counts[start_name],
                counts[f"{start_name}_personalized"],
                counts[f"{start_name}_checked"],
                kept[start_name],
            ) = _personalized(personal_cfg, state, local[:count], owners)
        personal = {
            "steps": plan.personal_steps,
            "lr": plan.personal_lr,
            "beam": plan.personal_beam,
            "devices": count,
            "kept": kept,
            "wer": {row: _table(markets) for row, markets in counts.items()},
            "summary": {row: compare(counts["launch_base"], markets) for row, markets in counts.items()},
            "seconds": round(time.monotonic() - began, 1),
        }
        _note(f"{run_id}: personalization of {count} devices measured at {time.monotonic() - start:.0f} s")

    summary = summarize(measured[-1])
    if bound is not None:
        bound["summary"] = summarize(bound)
        for name in sets:
            del bound[f"{name}_counts"]
    for row in measured:
        for name in sets:
            del row[f"{name}_counts"]
    return {
        "new_markets": new,
        "served_markets": served,
        "local_recipe": {k: cfg.to_flat()[k] for k in RECIPE_KEYS},
        "selection": {"name": cfg.strategy.selection, "candidates": cfg.strategy.candidates},
        "beam": cfg.eval.beam,
        "run_dir": str(run_dir),
        "per_round_wer": measured,
        "summary": summary,
        "central": bound,
        "personalization": personal,
        "seconds": round(time.monotonic() - start, 1),
    }


def _choose(rows: Sequence[dict[str, Any]]) -> int:
    """The sweep's winner: the lowest new-market device WER after the sweep's rounds among the recipes whose
    served markets' held-out WER rose no more than the target; if none kept to it, the one that forgot least."""

    def served(row: dict[str, Any]) -> float:
        rel = row["summary"]["heldout"]["served_markets"]["relative"]
        return 0.0 if rel is None else rel

    def new_after(row: dict[str, Any]) -> float:
        after = row["summary"]["devices"]["new_markets"]["after"]
        return float("inf") if after is None else after

    kept = [i for i, row in enumerate(rows) if served(row) <= TARGETS["served_markets_relative"]]
    if kept:
        return min(kept, key=lambda i: (new_after(rows[i]), i))
    return min(range(len(rows)), key=lambda i: (served(rows[i]), i))


def _sweep(flat: dict[str, Any], plan: NewMarketPlan, base: Path, out: Path) -> dict[str, Any]:
    """Federate ``base`` with each candidate recipe on the sweep's own speakers; the table and the chosen recipe."""
    assert plan.sweep is not None
    sweep = plan.sweep
    rows = []
    for i, recipe in enumerate(sweep.recipes):
        result = _federate(
            {**flat, **sweep.corpus, **recipe},
            plan,
            base,
            run_id=f"{out.name}/sweep-{i}",
            devices=sweep.devices,
            per_round=sweep.per_round,
            rounds=sweep.rounds,
        )
        rows.append({"recipe": recipe, **{k: result[k] for k in ("local_recipe", "summary", "run_dir", "seconds")}})
    chosen = _choose(rows)
    return {**asdict(sweep), "rows": rows, "chosen": chosen}


def _enough_devices(cfg: RunConfig, devices: int) -> None:
    """More devices than the corpus' split has fail here, before anything is synthesized or trained."""
    federated = len(plan_split(cfg)[0].federated)
    if devices > federated:
        raise PrepareError(f"--devices {devices} exceeds the {federated} federated speakers of {corpus_dir(cfg)}")


def run_federation_eval(plan: NewMarketPlan, *, workdir: Path, out: Path, checkpoint: Path | None = None) -> dict[str, Any]:
    """Train or take the launch base, sweep the local recipe, federate, measure every round per market; returns
    the JSON summary."""
    start = time.monotonic()
    flat: dict[str, Any] = {**RunConfig().to_flat(), **plan.overrides, "workdir": str(workdir)}
    _enough_devices(RunConfig.from_flat(flat), plan.devices)
    if checkpoint is None and plan.base_steps == 0:
        checkpoint = shipped_launch_base()
    # The base model's architecture wins over the plan's, its dropout too: devices fine-tune it under the
    # regularization it was trained with (a ``--checkpoint`` may have trained at another dropout than the default).
    if checkpoint is not None:
        model_config = asdict(load_checkpoint(checkpoint).model_config)
        flat.update({f"model.{k.replace('_', '-')}": v for k, v in model_config.items() if k != "init_checkpoint"})
    base = _launch_base(RunConfig.from_flat(flat), plan, out, checkpoint)
    _note(f"federation ({plan.name}): launch base {base} at {time.monotonic() - start:.0f} s")
    sweep = None
    if plan.sweep is not None:
        sweep = _sweep(flat, plan, base, out)
        flat.update(sweep["rows"][sweep["chosen"]]["recipe"])
        _note(f"federation ({plan.name}): the sweep chose {sweep['rows'][sweep['chosen']]['recipe']}")
    result = _federate(
        flat,
        plan,
        base,
        run_id=f"{out.name}/federation",
        devices=plan.devices,
        per_round=plan.per_round,
        rounds=plan.rounds,
        central=True,
        personalize=True,
    )
    return {
        "plan": plan.name,
        "launch_base": str(base),
        "withheld": list(plan.withheld),
        "devices": plan.devices,
        "per_round": plan.per_round,
        "rounds": plan.rounds,
        **result,
        "sweep": sweep,
        "targets": TARGETS,
        "seconds": round(time.monotonic() - start, 1),
    }


def _plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    rounds = [row["round"] for row in result["per_round_wer"]]
    for ax, name, title in zip(axes, ("devices", "heldout"), ("devices' own utterances", "held-out speakers")):
        for market in result["new_markets"] + result["served_markets"]:
            wers = [row[name].get(market, {}).get("wer") for row in result["per_round_wer"]]
            style = "--" if market in result["new_markets"] else "-"
            ax.plot(rounds, [w if w is not None else float("nan") for w in wers], style, marker="o", label=market)
        ax.set_title(title)
        ax.set_xlabel("round (0 = launch base)")
        ax.set_xticks(rounds)
    axes[0].set_ylabel("WER (greedy)")
    axes[1].legend(fontsize=7, title="dashed: new markets")
    fig.suptitle(f"chorus eval federation ({result['plan']}): WER per market per round")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _after(change: dict[str, Any]) -> str:
    """A ``_change``'s WER after, with its relative change: "0.425 (-24.5%)"."""
    if change["after"] is None:
        return "-"
    return f"{change['after']} (" + ("n/a" if change["relative"] is None else f"{100 * change['relative']:+.1f}%") + ")"


def _cell(markets: dict[str, Any], market: str) -> str:
    wer = markets.get(market, {}).get("wer")
    return "-" if wer is None else f"{wer:.3f}"


def _who_trains(selection: dict[str, Any]) -> str:
    if selection["name"] == "uniform":
        return "a uniform sample"
    asked = "every device" if selection["candidates"] == 0 else f"{selection['candidates']} candidates"
    return f"Power-of-Choice (the highest training loss among {asked})"


def write_report(result: dict[str, Any], out: Path) -> Path:
    """report.md: the summary against the targets and the per-market table, beside the plot."""
    lines = [
        f"# chorus eval federation ({result['plan']})",
        "",
        f"Launch base `{result['launch_base']}` (never heard: {', '.join(result['withheld'])}); "
        f"{result['devices']} devices, {result['per_round']} per round, {result['rounds']} rounds, local recipe "
        f"{result['local_recipe']}; who trains: {_who_trains(result['selection'])}; the rounds and the central bound "
        f"decoded with {search_name(result['beam'])}.",
        "",
        "| measured on | markets | WER before | WER after | relative | words | target |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name in ("devices", "heldout"):
        for group, target in (("new_markets", "<= -25%"), ("served_markets", "<= +2%")):
            s = result["summary"][name][group]
            rel = "n/a" if s["relative"] is None else f"{100 * s['relative']:+.1f}%"
            lines.append(
                f"| {name} | {group.replace('_', ' ')} | {s['before']} | {s['after']} | {rel} | {s['words']} | {target} |"
            )
    bound = result.get("central")
    if bound:
        lines += [
            "",
            f"The central bound: the launch base fine-tuned on one machine on the same devices' training utterances "
            f"pooled ({bound['utterances']} utterances, {bound['steps']} AdamW steps at {bound['lr']}; the devices' "
            "eval utterances and the held-out speakers never trained): what FedAvg could at best reach with this data.",
            "",
            "| measured on | markets | launch base | federated (last round) | central bound |",
            "|---|---|---:|---:|---:|",
        ]
        for name in ("devices", "heldout"):
            for group in ("new_markets", "served_markets"):
                fed, cen = result["summary"][name][group], bound["summary"][name][group]
                after = [_after(x) for x in (fed, cen)]
                lines.append(f"| {name} | {group.replace('_', ' ')} | {fed['before']} | " + " | ".join(after) + " |")
    personal = result.get("personalization")
    if personal:
        lines += [
            "",
            f"Personalization: each of the first {personal['devices']} devices fine-tuned a model on its own training "
            f"utterances alone ({personal['steps']} AdamW steps at {personal['lr']}); its own local-eval utterances, "
            f"decoded with {search_name(personal['beam'])}, with the model as received, as personalized, and as checked "
            "(personalized only where that beat "
            "the received model on a third of its training utterances set aside: kept by "
            f"{personal['kept']['launch_base']} devices from the launch base, {personal['kept']['federated']} from the "
            "federated model); relative to the launch base as received, on the same devices:",
            "",
            "| model on the device | new markets | served markets |",
            "|---|---:|---:|",
        ]
        names = {
            "launch_base": "launch base",
            "launch_base_personalized": "launch base, personalized",
            "launch_base_checked": "launch base, personalized where it helps",
            "federated": "federated (last round)",
            "federated_personalized": "federated, personalized",
            "federated_checked": "federated, personalized where it helps",
        }
        for row, name in names.items():
            cells = personal["summary"][row]
            text = [_after(c) for c in (cells["new_markets"], cells["served_markets"])]
            lines.append(f"| {name} | " + " | ".join(text) + " |")
    sweep = result.get("sweep")
    if sweep:
        lines += [
            "",
            f"The local recipe, chosen by a sweep: each candidate federated the launch base {sweep['rounds']} rounds, "
            f"{sweep['per_round']} of {sweep['devices']} devices per round, on speakers of their own ({sweep['corpus']}); "
            "the lowest new-market device WER whose served markets' held-out WER rose <= +2% wins.",
            "",
            "| recipe | new markets, devices | new markets, held-out | served markets, held-out | seconds |",
            "|---|---:|---:|---:|---:|",
        ]
        for i, row in enumerate(sweep["rows"]):
            cells = [
                row["summary"][name][group]
                for name, group in (("devices", "new_markets"), ("heldout", "new_markets"), ("heldout", "served_markets"))
            ]
            text = [
                "-" if c["relative"] is None else f"{c['before']} -> {c['after']} ({100 * c['relative']:+.1f}%)" for c in cells
            ]
            mark = " **(chosen)**" if i == sweep["chosen"] else ""
            lines.append(f"| {row['local_recipe']}{mark} | " + " | ".join(text) + f" | {row['seconds']} |")
    lines += ["", "WER per market per round (devices / held-out):", ""]
    rounds = result["per_round_wer"]
    lines.append("| market | " + " | ".join(f"round {row['round']}" for row in rounds) + " |")
    lines.append("|---|" + "---:|" * len(rounds))
    for market in result["new_markets"] + result["served_markets"]:
        cells = [f"{_cell(row['devices'], market)} / {_cell(row['heldout'], market)}" for row in rounds]
        star = " (new)" if market in result["new_markets"] else ""
        lines.append(f"| {market}{star} | " + " | ".join(cells) + " |")
    lines += ["", "![WER per market per round](federation.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(plan: NewMarketPlan, *, workdir: Path, eval_id: str, checkpoint: Path | None = None, as_json: bool = False) -> None:
    out = workdir / "runs" / eval_id
    out.mkdir(parents=True, exist_ok=True)
    with progress_to_stderr():
        result = run_federation_eval(plan, workdir=workdir, out=out, checkpoint=checkpoint)
        result["plot"] = str(_plot(result, out / "federation.png"))
        result["report"] = str(write_report(result, out))
    (out / "federation.json").write_text(json.dumps(result, indent=1) + "\n")
    if as_json:
        print(json.dumps(result))
    else:
        print(Path(result["report"]).read_text())
