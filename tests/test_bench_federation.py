"""`chorus bench federation --quick --json`: one valid JSON object, measured by a real `flwr run` + Ray run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import RunConfig
from shared.processes import TreeMemorySampler
from simulations.bench_federation import QUICK, FederationPlan
from simulations.simulate import sampling_overrides
from tests.conftest import REPO_ROOT, needs_espeak

KEYS = {
    "clients",
    "per_round",
    "rounds",
    "parallel",
    "rounds_completed",
    "round_seconds",
    "mean_round_seconds",
    "pure_round_seconds",
    "overhead_ratio",
    "overhead_ratio_steady",
    "overhead_ratio_per_round",
    "round_cpu_seconds",
    "pure_round_cpu_seconds",
    "cpu_overhead_ratio",
    "timing_reliable",
    "peak_rss_bytes",
    "peak_rss_gib",
    "peak_pss_gib",
    "targets",
    "duration_s",
    "run_dir",
}


def test_sampling_overrides_pick_exactly_k_after_all_registered() -> None:
    for n, k in ((20, 5), (1000, 50), (7, 3), (3, 3), (1000, 1), (999, 998)):
        o = sampling_overrides(n, k, parallel=2)
        cfg = RunConfig.from_flat({**RunConfig().to_flat(), **o})  # valid keys and values
        assert cfg.strategy.min_available_nodes == n and cfg.strategy.max_in_flight == 4
        # Flower's FedAvg samples max(int(connected * fraction), min_nodes) nodes
        assert max(int(n * cfg.strategy.fraction_train), cfg.strategy.min_train_nodes) == k
        assert max(int(n * cfg.strategy.fraction_evaluate), cfg.strategy.min_evaluate_nodes) == k
        # ... and a round of K > 2 still aggregates when a device fails (the server's minimum of answers)
        assert cfg.strategy.min_train_nodes == min(k, 2)
    with pytest.raises(ValueError, match="per-round"):
        sampling_overrides(5, 6, parallel=2)
    with pytest.raises(ValueError, match="parallel"):
        sampling_overrides(5, 3, parallel=0)


def test_plan_changes_are_validated() -> None:
    plan = QUICK.with_changes(clients=10)
    assert (plan.clients, plan.per_round) == (10, 5)
    with pytest.raises(ValueError):
        QUICK.with_changes(clients=4, per_round=5)
    with pytest.raises(ValueError):
        QUICK.with_changes(overrides={"model.nope": 1})
    cfg = FederationPlan(clients=30, per_round=4, rounds=1, overrides=QUICK.overrides).config(Path("/x"), run_id="r")
    assert cfg.synth.speakers >= 30 + cfg.split.public_speakers + cfg.split.heldout_speakers


def test_tree_memory_sampler_counts_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", 'b = b"x" * (200 * 2**20); import time; time.sleep(3)'])
    try:
        with TreeMemorySampler(interval=0.1) as sampler:
            import time

            time.sleep(1.5)
    finally:
        child.wait()
    assert sampler.samples >= 2 and sampler.peak_processes >= 2
    assert sampler.peak_rss >= 200 * 2**20 and 0 < sampler.peak_pss <= sampler.peak_rss


@pytest.mark.slow
@needs_espeak
@pytest.mark.timeout(900)  # ~2.5 min on 2 idle cores; several times that on a shared, overloaded machine
def test_quick_bench_prints_json(tmp_path: Path) -> None:
    # One Ray actor and one baseline worker: the test checks the pipeline and the output, not the figures.
    bench = ["bench", "federation", "--quick", "--parallel", "1", "--json", "--workdir", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, "-m", "simulations.cli", *bench],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=880,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert KEYS <= set(result), f"missing {KEYS - set(result)}"
    assert (result["clients"], result["per_round"], result["rounds"]) == (20, 5, 2)
    assert result["rounds_completed"] == 2 and len(result["round_seconds"]) == 2
    assert result["train_replies"] == [5, 5] and result["train_failures"] == [0, 0]
    assert all(s > 0 for s in result["round_seconds"] + result["pure_round_seconds"])
    assert result["overhead_ratio"] > 0 and result["overhead_ratio_steady"] > 0
    # Flower's processes and Ray's (SuperLink, simulation, 2 actors) are in the tree: far more than this process.
    assert result["peak_rss_bytes"] > 500 * 2**20 and result["peak_processes"] >= 5
    assert any(name.startswith("ray") for name in result["peak_rss_gib_by_process"])  # Ray's workers are counted
    assert all(c > 0 for c in result["round_cpu_seconds"] + result["pure_round_cpu_seconds"])
    assert result["cpu_overhead_ratio"] > 0 and isinstance(result["timing_reliable"], bool)
    if not result["timing_reliable"]:  # a busy machine gives no verdict on the wall-time target
        assert result["targets"]["overhead_ratio_met"] is None
    assert result["federation_cpu_seconds_by_process"].get("flower-superlink", 0) > 0
    assert result["max_in_flight"] == 2 * result["parallel"]  # the window (windowed when 5 > 2 x cores)
    assert len(result["train_phase_seconds"]) == 2 and result["train_overhead_ratio"] > 0
    poll = result["engine_poll_sweep"]  # Flower's poll for work, measured with 5 and with the window waiting
    assert poll["nodes"] == 20 and poll["all_at_once"]["waiting"] == 5 and poll["all_at_once"]["sweep_cpu_ms"] > 0
    assert (Path(result["run_dir"]) / "report.md").exists() and (Path(result["run_dir"]) / "bench.json").exists()
