"""End to end: 2 rounds, 4 devices, through `flwr run` and Flower's simulation engine (Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared.config import RunConfig
from shared.models.checkpoint import load_checkpoint
from simulations.simulate import simulate
from tests.conftest import TINY_RUN, TinyWorkdir, needs_espeak

pytestmark = [pytest.mark.slow, needs_espeak]


def test_two_rounds_four_devices(tmp_path: Path, tiny_workdir: TinyWorkdir) -> None:
    tiny_workdir(tmp_path)
    cfg = RunConfig.from_flat({**TINY_RUN, "num-server-rounds": 2, "workdir": str(tmp_path), "run-id": "e2e"})
    run_dir = simulate(cfg, num_supernodes=4, progress=False, parallel=1)  # one Ray actor: a tiny model needs no more

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    # Round 0 scores the starting model on the devices too: the baseline of every round's device WER.
    assert 0.0 <= records[0]["device_wer"] and records[0]["device_words"] == records[1]["device_words"] > 0
    for r in records[1:]:
        assert r["train_replies"] == 4 and r["train_failures"] == 0
        assert r["eval_replies"] == 4
        assert r["train_loss"] > 0
        assert 0.0 <= r["device_wer"] and r["device_words"] > 0  # WER computed on the devices' own data
        assert r["heldout_wer"] >= 0.0 and r["heldout_words"] > 0  # and by the server on held-out speakers

    initial = load_checkpoint(run_dir / "checkpoints" / "initial.pt").state_dict
    final = load_checkpoint(run_dir / "checkpoints" / "global.pt")
    assert final.meta["round"] == 2
    changed = [k for k in initial if not torch.equal(initial[k], final.state_dict[k])]
    assert len(changed) > len(initial) // 2, "aggregation should move most of the global model's tensors"

    report = (run_dir / "report.md").read_text()
    assert "| 2 |" in report and (run_dir / "rounds.png").exists()
    assert "by accent" in report  # per-accent WER spread from the evaluation harness
