"""`chorus bench robustness`: attacks x defenses x share of malicious devices, measured side by side.

Each cell is a whole federated run (``server.workflow.run_federation``: the real strategies, the server's reply
validation, held-out scoring) whose devices are the real ClientApp in this process
(``simulations/harness.py``); the first ``ceil(share x devices)`` partitions are malicious and answer train
messages with an attack instead of their honest update. Every defense also runs once with no attacker, so its
cost is measured beside the attacked runs. The held-out WER after the last round is the figure; a cell is
compared with the clean FedAvg run of the same plan.

Attacks (what a malicious device's train reply carries, ``U`` its honest update, ``G`` the global model):
    nan        every weight NaN (a broken device)
    scaled     G + 1000 U (a boosted update)
    sign-flip  G - U (gradient ascent on its own data)
    noise      G + Gaussian noise with the norm of U (garbage that passes a norm check)
    shuffled   an honest update computed on its own utterances with their transcripts shuffled (data poisoning)

Defenses (``strategy.*``): ``fedavg`` (the default: every reply validated, updates above 10x the round's median
norm rejected), ``fedavg-no-norm-bound`` (validation without the norm bound), ``fedmedian``,
``fedtrimmedavg``, ``krum``, ``multikrum`` and ``bulyan`` (told f, the number of malicious devices, as their
papers assume), and ``norm-clipping`` (server-side clipping of each update to ``central-dp.clipping-norm``,
Flower's fixed-clipping wrapper with no noise, in place of the norm bound's rejection). Bulyan needs 4f + 3
replies a round; where there are fewer it keeps the global model (Flower's implementation), which the table
shows as no change.

Each finished cell is written to ``runs/<bench-id>/cells/<run-id>.json`` with the run config it measured; a bench
run again with the same id takes a cell from there when its config is the same, so a killed bench resumes at the
cell it was in, and two processes given disjoint ``--defenses`` (or ``--attacks``) fill one table together: the
full bench run afterwards measures only what is missing.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

import client.client_app as client_app
from client.data import DeviceData, node_data
from client.train import fine_tune
from server.workflow import run_federation
from shared.config import TINY_RUN, RunConfig
from shared.data.prepare import prepare
from shared.files import write_text_atomic
from shared.records import array_record, config_record, scalar
from simulations.harness import InProcessGrid, server_identity

__all__ = ["ATTACKS", "DEFENSES", "FULL", "QUICK", "RobustnessPlan", "main", "run_bench"]

ATTACKS = ("nan", "scaled", "sign-flip", "noise", "shuffled")
DEFENSES: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedavg-no-norm-bound": {"strategy.update-norm-factor": 0.0},
    "fedmedian": {"strategy.name": "fedmedian"},
    "fedtrimmedavg": {"strategy.name": "fedtrimmedavg"},
    "krum": {"strategy.name": "krum"},
    "multikrum": {"strategy.name": "multikrum"},
    "bulyan": {"strategy.name": "bulyan"},
    "norm-clipping": {
        "strategy.update-norm-factor": 0.0,
        "strategy.central-dp": "server",
        "central-dp.noise-multiplier": 0.0,
    },
}


@dataclass(frozen=True)
class RobustnessPlan:
    name: str  # quick | full
    overrides: dict[str, Any]  # run-config keys of every run (corpus, model, training)
    rounds: int
    shares: tuple[float, ...]  # shares of malicious devices
    attacks: tuple[str, ...]
    defenses: tuple[str, ...]

    def with_changes(
        self,
        *,
        attacks: str | None = None,
        defenses: str | None = None,
        shares: str | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> RobustnessPlan:
        """The plan with a subset of attacks / defenses, other shares of malicious devices (comma-separated) and
        extra run-config keys (``--set``); raises ValueError naming an unknown attack, defense or key, or a share
        outside (0, 1)."""
        plan = self
        if shares:
            try:
                chosen_shares = tuple(float(x) for x in shares.split(",") if x.strip())
            except ValueError:
                raise ValueError(f"--shares: {shares!r} is not a comma-separated list of numbers") from None
            if bad := [x for x in chosen_shares if not 0.0 < x < 1.0]:
                raise ValueError(f"--shares: {', '.join(map(str, bad))} not in (0, 1)")
            plan = replace(plan, shares=chosen_shares)
        if attacks:
            chosen = tuple(a.strip() for a in attacks.split(",") if a.strip())
            if unknown := [a for a in chosen if a not in ATTACKS]:
                raise ValueError(f"--attacks: {', '.join(unknown)} not among {', '.join(ATTACKS)}")
            plan = replace(plan, attacks=chosen)
        if defenses:
            chosen = tuple(d.strip() for d in defenses.split(",") if d.strip())
            if unknown := [d for d in chosen if d not in DEFENSES]:
                raise ValueError(f"--defenses: {', '.join(unknown)} not among {', '.join(DEFENSES)}")
            plan = replace(plan, defenses=chosen)
        if overrides:
            plan = replace(plan, overrides={**plan.overrides, **overrides})
        RunConfig.from_flat(plan.overrides)  # ConfigError naming an unknown key or a bad value
        return plan


# CI-sized: a tiny model on 10 devices; its numbers prove the pipeline only (the model is untrained). One robust
# aggregator (Krum) stands for the rest and one malformed update (NaN) for the ones validation drops (the scaled
# update's rejection is tested in-process, tests/test_trust.py): each cell is a federation of its own.
QUICK = RobustnessPlan(
    name="quick",
    overrides={**TINY_RUN, "synth.speakers": 14},
    rounds=1,
    shares=(0.2,),
    attacks=("nan", "sign-flip"),
    defenses=("fedavg", "krum"),
)
# The documented setting: the default corpus (20 devices) from the shipped base, 2 rounds.
# train.lr: the local rate the README's table was measured at (the default then).
FULL = RobustnessPlan(
    name="full", overrides={"train.lr": 1e-3}, rounds=2, shares=(0.1, 0.2), attacks=ATTACKS, defenses=tuple(DEFENSES)
)


# -- malicious devices -------------------------------------------------------------------------------------------


def _shuffled(data: DeviceData, seed: int) -> DeviceData:
    """The device's training utterances with their transcripts shuffled among them (the audio stays)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.train), generator=generator).tolist()
    texts = [data.train[i].text for i in order]
    return replace(data, train=[replace(u, text=t) for u, t in zip(data.train, texts, strict=True)])


class Attacker:
    """The ClientApp of a federation in which the devices in ``malicious`` (node ids) run ``attack``."""

    def __init__(self, attack: str, malicious: set[int]) -> None:
        if attack not in ATTACKS:
            raise ValueError(f"attack {attack!r} is not one of {', '.join(ATTACKS)}")
        self.attack, self.malicious = attack, malicious

    def __call__(self, msg: Message, context: Context) -> Message:
        if context.node_id not in self.malicious or msg.metadata.message_type != "train":
            return client_app.app(msg, context)
        sent = array_record(msg.content, "arrays").to_torch_state_dict()
        if self.attack == "shuffled":
            cfg = RunConfig.from_flat(context.run_config)
            data = _shuffled(node_data(cfg, context.node_config), seed=context.node_id)
            server_round = int(scalar(config_record(msg.content, "config"), "server-round"))
            update = fine_tune(cfg, sent, data, server_round=server_round, partition_id=context.node_id - 1)
            return Message(
                RecordDict({"arrays": ArrayRecord(update.state_dict), "metrics": MetricRecord(update.metrics())}), reply_to=msg
            )
        honest = client_app.app(msg, context)
        if honest.has_error():
            return honest
        state = array_record(honest.content, "arrays").to_torch_state_dict()
        delta = {k: state[k] - sent[k] for k in sent}
        if self.attack == "nan":
            attacked = {k: torch.full_like(v, math.nan) for k, v in sent.items()}
        elif self.attack == "scaled":
            attacked = {k: sent[k] + 1000.0 * delta[k] for k in sent}
        elif self.attack == "sign-flip":
            attacked = {k: sent[k] - delta[k] for k in sent}
        else:  # noise with the honest update's norm
            generator = torch.Generator().manual_seed(context.node_id)
            noise = {k: torch.randn(v.shape, generator=generator) for k, v in sent.items()}
            scale = _norm(delta) / max(_norm(noise), 1e-12)
            attacked = {k: sent[k] + scale * noise[k] for k in sent}
        content = honest.content
        content["arrays"] = ArrayRecord(attacked)
        return honest


def _norm(state: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in state.values()))


# -- the bench ---------------------------------------------------------------------------------------------------


def _cell(cells: Path, cfg_flat: dict[str, Any], *, attack: str | None, malicious: int, run_id: str) -> dict[str, Any]:
    """The cell's result from ``cells/<run_id>.json`` when it was measured with this config, else a fresh run."""
    path = cells / f"{run_id}.json"
    config = json.loads(json.dumps({**cfg_flat, "attack": attack, "malicious": malicious}, sort_keys=True))
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("config") == config:
            return {**stored["result"], "cached": True}
    result = _run(cfg_flat, attack=attack, malicious=malicious, run_id=run_id)
    write_text_atomic(path, json.dumps({"config": config, "result": result}, indent=1))
    return {**result, "cached": False}


def _run(cfg_flat: dict[str, Any], *, attack: str | None, malicious: int, run_id: str) -> dict[str, Any]:
    cfg = RunConfig.from_flat({**cfg_flat, "run-id": run_id})
    devices = cfg.synth.speakers - cfg.split.public_speakers - cfg.split.heldout_speakers
    app = client_app.app if attack is None else Attacker(attack, set(range(1, malicious + 1)))
    grid = InProcessGrid(app, devices, cfg.to_flat())
    start = time.monotonic()
    with server_identity():
        run_dir = run_federation(grid, cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    return {
        "heldout_wer": last["heldout_wer"],
        "heldout_words": last["heldout_words"],
        "start_wer": records[0]["heldout_wer"],
        "rejected_updates": sum(int(r.get("rejected_updates", 0)) for r in records[1:]),
        "aggregated_rounds": sum(bool(r.get("aggregated")) for r in records[1:]),
        "seconds": round(time.monotonic() - start, 1),
    }


def run_bench(plan: RobustnessPlan, *, workdir: Path, bench_id: str) -> dict[str, Any]:
    """Every defense clean, then every (share, attack, defense); returns the summary (also in runs/<id>/)."""
    flat = {**RunConfig().to_flat(), **plan.overrides, "workdir": str(workdir), "num-server-rounds": plan.rounds}
    cfg = RunConfig.from_flat(flat)
    prepare(cfg)  # the corpus and artifacts once, before any run
    devices = cfg.synth.speakers - cfg.split.public_speakers - cfg.split.heldout_speakers
    every = {
        "strategy.min-train-nodes": devices,
        "strategy.min-evaluate-nodes": devices,
        "strategy.min-available-nodes": devices,
        "strategy.fraction-train": 1.0,
        "strategy.fraction-evaluate": 1.0,
    }
    cells_dir = workdir / "runs" / bench_id / "cells"
    start = time.monotonic()
    clean: dict[str, dict[str, Any]] = {}
    for defense in plan.defenses:
        keys = {**flat, **every, **DEFENSES[defense]}
        clean[defense] = _cell(cells_dir, keys, attack=None, malicious=0, run_id=f"{bench_id}-clean-{defense}")
        print(f"clean {defense}: held-out WER {clean[defense]['heldout_wer']:.4f}", file=sys.stderr, flush=True)
    cells: list[dict[str, Any]] = []
    for share in plan.shares:
        malicious = max(1, math.ceil(share * devices))
        for attack in plan.attacks:
            for defense in plan.defenses:
                keys = {
                    **flat,
                    **every,
                    **DEFENSES[defense],
                    "strategy.num-malicious": malicious,
                    # a round aggregates what survives validation: the honest devices
                    "strategy.min-train-nodes": devices - malicious,
                }
                run_id = f"{bench_id}-{attack}-{defense}-{malicious}of{devices}"
                result = _cell(cells_dir, keys, attack=attack, malicious=malicious, run_id=run_id)
                reference = clean["fedavg"]["heldout_wer"] if "fedavg" in clean else clean[defense]["heldout_wer"]
                result.update(
                    share=share,
                    malicious=malicious,
                    attack=attack,
                    defense=defense,
                    relative_to_clean_fedavg=(result["heldout_wer"] / reference - 1.0) if reference else None,
                )
                cells.append(result)
                print(
                    f"{attack} x {defense}, {malicious}/{devices} malicious: held-out WER "
                    f"{result['heldout_wer']:.4f} ({result['rejected_updates']} rejected"
                    + (", from cells/)" if result["cached"] else ")"),
                    file=sys.stderr,
                    flush=True,
                )
    summary = {
        "bench": "robustness",
        "plan": plan.name,
        "devices": devices,
        "rounds": plan.rounds,
        "settings": plan.overrides,
        "clean": clean,
        "attacked": cells,
        "cached_cells": sum(c["cached"] for c in [*clean.values(), *cells]),
        "seconds": round(time.monotonic() - start, 1),
    }
    out = workdir / "runs" / bench_id
    write_text_atomic(out / "robustness.json", json.dumps(summary, indent=1))
    write_text_atomic(out / "robustness.md", "\n".join(_table(summary)) + "\n")
    return summary


def _table(summary: dict[str, Any]) -> list[str]:
    defenses = list(summary["clean"])
    lines = [
        f"# Robustness ({summary['devices']} devices, {summary['rounds']} rounds, plan {summary['plan']})",
        "",
        "Held-out WER after the last round (rejected updates over all rounds).",
        "",
        "| attack | malicious | " + " | ".join(defenses) + " |",
        "|---|---|" + "---|" * len(defenses),
        "| none | 0 | " + " | ".join(f"{summary['clean'][d]['heldout_wer']:.3f}" for d in defenses) + " |",
    ]
    keys = sorted({(c["attack"], c["malicious"]) for c in summary["attacked"]}, key=lambda k: (k[1], k[0]))
    for attack, malicious in keys:
        row = {c["defense"]: c for c in summary["attacked"] if (c["attack"], c["malicious"]) == (attack, malicious)}
        lines.append(
            f"| {attack} | {malicious} | "
            + " | ".join(f"{row[d]['heldout_wer']:.3f} ({row[d]['rejected_updates']})" if d in row else "" for d in defenses)
            + " |"
        )
    return lines


def main(plan: RobustnessPlan, *, workdir: Path, bench_id: str, as_json: bool) -> None:
    """Progress to stderr; stdout carries the JSON summary (``as_json``) or the markdown table."""
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(sys.stderr):
        summary = run_bench(plan, workdir=workdir, bench_id=bench_id)
    print(json.dumps(summary) if as_json else "\n".join(_table(summary)))
