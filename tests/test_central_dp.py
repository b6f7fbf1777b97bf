"""Central DP by config (``strategy.central-dp``): Flower's fixed-clipping DP wrappers around the run's strategy.

Each test runs one real round (``run_federation``, our ClientApp with its mods, the real local training) through
the in-process Grid of tests/test_secagg.py, which serializes every message as the wire does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.secaggplus_constants import Stage
from flwr.serverapp import strategy as flwr_strategy

from server.workflow import device_level_dp, make_strategy, run_federation, stateful_strategy
from shared.config import ConfigError, RunConfig
from shared.models.checkpoint import load_checkpoint
from shared.privacy.dp import WIDE_ORDERS, AccountantState
from tests.conftest import TINY_RUN, TinyWorkdir, SecAggGrid, needs_espeak

pytestmark = pytest.mark.usefixtures("task_identity")

CLIP = 1e-3  # far below a TINY_RUN device's round-1 change, so every update is clipped


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, tiny_workdir: TinyWorkdir) -> Path:
    return tiny_workdir(tmp_path_factory.mktemp("central-dp"))


def _round(workdir: Path, run_id: str, **extra: bool | int | float | str) -> tuple[SecAggGrid, Path]:
    cfg = RunConfig.from_flat(
        {
            **TINY_RUN,
            "workdir": str(workdir),
            "run-id": run_id,
            "num-server-rounds": 1,
            "central-dp.clipping-norm": CLIP,
            "central-dp.sampled-clients": 4,
            "central-dp.noise-multiplier": 1.0,
            **extra,
        }
    )
    grid = SecAggGrid(cfg)
    return grid, run_federation(grid, cfg)


def _change_norm(state: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum(((state[k].double() - initial[k].double()) ** 2).sum() for k in initial)))


def _round_one(run_dir: Path) -> dict[str, object]:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[1])


def _train_updates(grid: SecAggGrid) -> list[dict[str, torch.Tensor]]:
    """The model arrays of the devices' plain train replies, as the grid recorded them."""
    return [
        reply.content["arrays"].to_torch_state_dict()
        for stage, reply in grid.replies
        if stage == "plain" and "arrays" in reply.content
    ]


def test_make_strategy_wraps_by_config() -> None:
    cfg = RunConfig.from_flat({"strategy.name": "fedadam", "strategy.central-dp": "client"})
    strategy = make_strategy(cfg.strategy, cfg.central_dp)
    assert isinstance(strategy, flwr_strategy.DifferentialPrivacyClientSideFixedClipping)
    assert isinstance(stateful_strategy(strategy), flwr_strategy.FedAdam)  # its moments are what is checkpointed
    server = RunConfig.from_flat({"strategy.central-dp": "server"})
    assert isinstance(make_strategy(server.strategy, server.central_dp), flwr_strategy.DifferentialPrivacyServerSideFixedClipping)
    assert isinstance(make_strategy(RunConfig().strategy), flwr_strategy.FedAvg)


def test_qfedavg_reads_the_devices_loss_and_learning_rate() -> None:
    cfg = RunConfig.from_flat({"strategy.name": "qfedavg", "strategy.qffl-q": 0.5, "train.lr": 3e-4})
    strategy = make_strategy(cfg.strategy, cfg.central_dp, client_lr=cfg.train.lr)
    assert isinstance(strategy, flwr_strategy.QFedAvg)
    assert (strategy.q, strategy.client_learning_rate, strategy.train_loss_key) == (0.5, 3e-4, "train-loss")
    tuned = RunConfig.from_flat({"strategy.name": "qfedavg", "strategy.qffl-lr": 0.5})
    assert make_strategy(tuned.strategy, client_lr=tuned.train.lr).client_learning_rate == 0.5
    with pytest.raises(ConfigError, match="DP-SGD replies do not carry"):
        RunConfig.from_flat({"strategy.name": "qfedavg", "dp.enabled": True})
    with pytest.raises(ConfigError, match="needs each device's update"):
        RunConfig.from_flat({"strategy.name": "qfedavg", "strategy.secure-aggregation": True})
    with pytest.raises(ConfigError, match="strategy.qffl-q must be >= 0"):
        RunConfig.from_flat({"strategy.qffl-q": -1.0})


@needs_espeak
def test_a_round_with_server_side_clipping(workdir: Path) -> None:
    grid, run_dir = _round(workdir, "server", **{"strategy.central-dp": "server"})
    one = _round_one(run_dir)
    assert (one["aggregated"], one["train_replies"], one["train_failures"]) == (True, 4, 0), one
    initial = load_checkpoint(run_dir / "checkpoints" / "initial.pt").state_dict
    # The devices sent their unclipped updates (the server clips them): each moved further than the clip.
    updates = _train_updates(grid)
    assert len(updates) == 4 and all(_change_norm(u, initial) > 10 * CLIP for u in updates)
    final = load_checkpoint(run_dir / "checkpoints" / "global.pt").state_dict
    # mean of clipped changes (norm <= CLIP) + Gaussian noise of std sigma x CLIP / 4 on every parameter
    params = sum(v.numel() for v in initial.values())
    noise = 1.0 * CLIP / 4 * params**0.5
    assert 0.5 * noise < _change_norm(final, initial) < CLIP + 1.5 * noise
    # Device-level accounting: all 4 devices sampled of 4 (rate 1), so the round is one Gaussian mechanism of
    # noise multiplier 1, whose RDP is alpha / (2 sigma^2) in closed form (Mironov 2017), converted to
    # (epsilon, delta) as Opacus does (Balle et al. 2020).
    assert one["central_dp_sample_rate"] == 1.0
    delta = RunConfig().central_dp.delta
    orders = np.array(WIDE_ORDERS)
    closed_form = orders / 2 - (np.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    assert one["central_dp_epsilon"] == pytest.approx(float(closed_form.min()), rel=1e-9)
    assert "Device-level DP" in (run_dir / "report.md").read_text()


def test_device_level_epsilon_counts_the_rounds_that_released_a_model() -> None:
    central = RunConfig().central_dp  # 20 devices a round, noise multiplier 1
    rate = 20 / 200
    earlier = [{"round": 0}, {"round": 1, "central_dp_sample_rate": rate}, {"round": 2, "central_dp_sample_rate": None}]
    three = device_level_dp(central, 200, earlier + [{"round": 3, "central_dp_sample_rate": rate}], released=True)
    two = AccountantState().after(noise_multiplier=1.0, sample_rate=rate, steps=2)
    assert three["central_dp_sample_rate"] == rate
    assert three["central_dp_epsilon"] == pytest.approx(
        two.after(noise_multiplier=1.0, sample_rate=rate, steps=1).epsilon(central.delta, orders=WIDE_ORDERS)
    )
    kept = device_level_dp(central, 200, earlier + [{"round": 3, "central_dp_sample_rate": rate}], released=False)
    assert kept == {"central_dp_sample_rate": None, "central_dp_epsilon": two.epsilon(central.delta, orders=WIDE_ORDERS)}
    assert device_level_dp(central, 2000, [], released=True)["central_dp_epsilon"] < three["central_dp_epsilon"]
    noiseless = RunConfig.from_flat({"central-dp.noise-multiplier": 0.0}).central_dp
    assert device_level_dp(noiseless, 200, [], released=True)["central_dp_epsilon"] is None


@needs_espeak
def test_a_round_with_client_side_clipping(workdir: Path) -> None:
    grid, run_dir = _round(workdir, "client", **{"strategy.central-dp": "client"})
    one = _round_one(run_dir)
    assert (one["aggregated"], one["train_replies"], one["train_failures"]) == (True, 4, 0), one
    initial = load_checkpoint(run_dir / "checkpoints" / "initial.pt").state_dict
    # fixedclipping_mod clipped each update on its device, before the audit and the wire
    updates = _train_updates(grid)
    assert len(updates) == 4
    assert all(CLIP * 0.999 < _change_norm(u, initial) <= CLIP * 1.0001 for u in updates)
    evaluate = [reply for stage, reply in grid.replies if stage == "plain" and "arrays" not in reply.content]
    assert evaluate and not any(r.has_error() for r in evaluate)  # the clipping mod is on train only


@needs_espeak
def test_client_side_clipping_under_secagg(workdir: Path) -> None:
    """The combination that hides every update: devices clip, SecAgg+ masks, the server adds noise to the sum."""
    grid, run_dir = _round(workdir, "client-secagg", **{"strategy.central-dp": "client", "strategy.secure-aggregation": True})
    one = _round_one(run_dir)
    assert (one["aggregated"], one["train_replies"], one["train_failures"]) == (True, 4, 0), one
    masked = [reply for stage, reply in grid.replies if stage == Stage.COLLECT_MASKED_VECTORS]
    assert len(masked) == 4 and not any(r.has_error() for r in masked)
    assert not any("arrays" in reply.content for stage, reply in grid.replies if stage != "plain")


def test_device_dp_table_shows_what_population_buys() -> None:
    from typer.testing import CliRunner

    from simulations.cli import app

    args = ["eval", "device-dp", "--population", "200,1000", "--rounds", "5,50", "--noise", "1,2", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = {(r["population"], r["rounds"], r["noise_multiplier"]): r["epsilon"] for r in json.loads(result.output)["table"]}
    assert len(table) == 8
    for rounds in (5, 50):
        for sigma in (1.0, 2.0):
            assert table[(1000, rounds, sigma)] < table[(200, rounds, sigma)]  # subsampling amplifies privacy
            assert table[(200, rounds, 2.0)] < table[(200, rounds, 1.0)]
    assert table[(200, 5, 1.0)] < table[(200, 50, 1.0)]  # composition over rounds
    bad = CliRunner().invoke(app, ["eval", "device-dp", "--population", "10", "--per-round", "30"])
    assert bad.exit_code == 2 and "populations must be >= --per-round" in bad.output
