"""Round checkpoints and `--resume`: the global model and the strategy's state survive a crash, every round
is recorded exactly once.

Fast tests drive the strategy and ``run_federation`` directly (a scripted in-process grid, no Ray); the slow one
kills a real ``chorus simulate`` mid-run (the whole process tree, SIGKILL) and resumes it: it is also the suite's
end-to-end check of `chorus simulate` itself (`flwr run`, Flower's simulation engine, Ray; 4 devices, 3 rounds).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import strategy as flwr_strategy

import server.workflow
import shared.files
from server.checkpoint import STRATEGY_STATE, load_round, rewind_metrics, save_round
from server.workflow import make_strategy, run_federation
from shared.config import RunConfig, StrategyConfig
from shared.models.checkpoint import build_model, load_checkpoint
from simulations.simulate import REPO_ROOT, stop_local_superlink
from tests.conftest import TINY_RUN, TinyWorkdir, ScriptedGrid, kill_marked, needs_espeak, wait_gone


pytestmark = pytest.mark.usefixtures("task_identity")


def _tiny_model_cfg():  # the TINY_RUN model
    return RunConfig.from_flat(TINY_RUN).model


def _one_round(strategy: flwr_strategy.Strategy, arrays: ArrayRecord, server_round: int) -> ArrayRecord:
    grid = ScriptedGrid(nodes=2)
    msgs = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    new_arrays, _ = strategy.aggregate_train(server_round, grid.send_and_receive(msgs))
    assert new_arrays is not None
    return new_arrays


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_strategy_state_round_trips_through_the_checkpoint(tmp_path: Path, name: str) -> None:
    model_cfg = _tiny_model_cfg()
    torch.manual_seed(0)
    model = build_model(model_cfg)
    if name == "fedavgm":  # make_strategy's FedAvgM has no momentum (none configurable): give it some here
        strategy: flwr_strategy.Strategy = flwr_strategy.FedAvgM(server_learning_rate=0.5, server_momentum=0.9)
        fresh: flwr_strategy.Strategy = flwr_strategy.FedAvgM(server_learning_rate=0.5, server_momentum=0.9)
    else:
        strategy, fresh = (make_strategy(StrategyConfig(name=name, server_lr=0.01)) for _ in range(2))
    arrays = _one_round(strategy, ArrayRecord(model.state_dict()), server_round=1)
    model.load_state_dict(arrays.to_torch_state_dict())
    arrays = ArrayRecord(model.state_dict())

    path = save_round(tmp_path / "global.pt", model, model_cfg, server_round=1, run_id="t", strategy_name=name, strategy=strategy)
    restored_model = build_model(model_cfg)
    assert load_round(path, restored_model, model_cfg, strategy_name=name, strategy=fresh) == 1

    saved = [a for a in STRATEGY_STATE if getattr(strategy, a, None) is not None]
    assert saved, f"{name} should carry state after a round"
    for attr in saved:
        before, after = getattr(strategy, attr), getattr(fresh, attr)
        pairs = [(before[k], after[k]) for k in before] if isinstance(before, dict) else list(zip(before, after))
        assert len(pairs) == len(before)
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in pairs), attr
    assert all(torch.equal(v, restored_model.state_dict()[k]) for k, v in model.state_dict().items())
    # The next round from the restored strategy is the next round of the original, to the bit.
    expected = _one_round(strategy, arrays, server_round=2).to_torch_state_dict()
    got = _one_round(fresh, ArrayRecord(restored_model.state_dict()), server_round=2).to_torch_state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_resume_refuses_another_strategy(tmp_path: Path) -> None:
    model_cfg = _tiny_model_cfg()
    model = build_model(model_cfg)
    path = save_round(
        tmp_path / "global.pt",
        model,
        model_cfg,
        server_round=2,
        run_id="t",
        strategy_name="fedadam",
        strategy=make_strategy(StrategyConfig(name="fedadam")),
    )
    with pytest.raises(ValueError, match="fedadam"):
        load_round(path, model, model_cfg, strategy_name="fedavg", strategy=make_strategy(StrategyConfig()))


def test_rewind_metrics_drops_uncommitted_and_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"round": r}) + "\n" for r in range(4)) + '{"round": 4, "heldo')
    assert [r["round"] for r in rewind_metrics(path, before=3)] == [0, 1, 2]
    assert [json.loads(line)["round"] for line in path.read_text().splitlines()] == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary left behind


def test_a_finished_run_is_the_same_from_another_checkout_of_its_base_model(tmp_path: Path) -> None:
    """Experiments reuse a finished arm by its config.json; the base checkpoint's path differs between two clones of
    the repository, its bytes do not."""
    here, there, other = tmp_path / "a" / "base.pt", tmp_path / "b" / "base.pt", tmp_path / "c" / "base.pt"
    for path, data in ((here, b"weights"), (there, b"weights"), (other, b"other weights")):
        path.parent.mkdir()
        path.write_bytes(data)

    def cfg(checkpoint: Path, **extra: bool | int | float | str) -> RunConfig:
        return RunConfig.from_flat({**RunConfig().to_flat(), "model.init-checkpoint": str(checkpoint), **extra})

    run_dir = tmp_path / "run"
    assert not server.workflow.same_run_config(run_dir, cfg(here))  # no config.json: nothing to reuse
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(cfg(here).to_flat()))
    assert server.workflow.same_run_config(run_dir, cfg(here))
    assert server.workflow.same_run_config(run_dir, cfg(there))  # the same file under another path
    assert not server.workflow.same_run_config(run_dir, cfg(other))  # another model
    assert not server.workflow.same_run_config(run_dir, cfg(there, **{"train.lr": 0.5}))  # another recipe
    here.unlink()  # the stored path is gone: nothing proves the two are the same model
    assert not server.workflow.same_run_config(run_dir, cfg(there))


# -- run_federation, crashed and resumed (scripted grid, real data preparation and held-out scoring) --------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, tiny_workdir: TinyWorkdir) -> Path:
    return tiny_workdir(tmp_path_factory.mktemp("resume"))


def _cfg(workdir: Path, run_id: str, **extra: bool | int | float | str) -> RunConfig:
    return RunConfig.from_flat(
        {**TINY_RUN, "num-server-rounds": 3, "workdir": str(workdir), "run-id": run_id, "strategy.name": "fedadam", **extra}
    )


def _rounds(run_dir: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@needs_espeak
def test_resume_after_a_crash_matches_an_uninterrupted_run(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    whole = run_federation(ScriptedGrid(), _cfg(workdir, "whole"))

    # Killed after round 2's metrics line and before its checkpoint: round 2 is not committed.
    real_save_round = server.workflow.save_round

    def killed_in_round_2(*args, server_round: int, **kwargs):  # type: ignore[no-untyped-def]
        if server_round == 2:
            with (workdir / "runs" / "crash" / "metrics.jsonl").open("a") as f:
                f.write('{"round": 3, "torn')  # and a torn line, as from a kill mid-write
            raise KeyboardInterrupt("server killed between the metrics line and the checkpoint")
        return real_save_round(*args, server_round=server_round, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(server.workflow, "save_round", killed_in_round_2)
        run_federation(ScriptedGrid(), _cfg(workdir, "crash"))
    crashed = workdir / "runs" / "crash"
    assert load_checkpoint(crashed / "checkpoints" / "global.pt").meta["round"] == 1

    run_dir = run_federation(ScriptedGrid(), _cfg(workdir, "crash"), resume=True)
    assert "resuming run crash after round 1" in capsys.readouterr().out
    assert _rounds(run_dir) == [0, 1, 2, 3]
    final, expected = (load_checkpoint(d / "checkpoints" / "global.pt") for d in (run_dir, whole))
    assert final.meta["round"] == 3
    # Same model and same Adam moments as the run that never stopped: no round redone, none lost, no state reset.
    assert all(torch.equal(expected.state_dict[k], final.state_dict[k]) for k in expected.state_dict)
    for attr in ("m_t", "v_t"):
        a, b = expected.meta["strategy"]["state"][attr], final.meta["strategy"]["state"][attr]
        assert all(torch.equal(a[k], b[k]) for k in a)

    def timeless(d: Path) -> list[dict[str, object]]:
        return [
            {k: v for k, v in json.loads(line).items() if not k.endswith("seconds")}
            for line in (d / "metrics.jsonl").read_text().splitlines()
        ]

    assert timeless(run_dir) == timeless(whole)  # the same records, round by round

    # A resume of a finished run redoes nothing.
    run_federation(ScriptedGrid(), _cfg(workdir, "crash"), resume=True)
    assert _rounds(run_dir) == [0, 1, 2, 3]


class _FullDisk:
    """A file on a disk that fills up: half of the first write lands, then ENOSPC."""

    def __init__(self, file: Any) -> None:
        self.file = file

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def write(self, data: bytes) -> int:
        self.file.write(data[: len(data) // 2])
        self.file.flush()
        raise OSError(errno.ENOSPC, "No space left on device")


@needs_espeak
def test_a_full_disk_while_writing_a_checkpoint_loses_nothing(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's disk fills up while it writes round 2's checkpoint: the run stops with the OS error, round 1's
    checkpoint stays whole, no partial file is left, and ``resume`` finishes the run as if nothing had happened."""
    whole = run_federation(ScriptedGrid(), _cfg(workdir, "disk-whole"))
    real_fdopen, writes = os.fdopen, []

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        file = real_fdopen(fd, *args, **kwargs)
        writes.append(name)
        if name.startswith("global.pt.") and sum(w.startswith("global.pt.") for w in writes) == 2:
            return _FullDisk(file)
        return file

    with monkeypatch.context() as patch, pytest.raises(OSError, match="No space left"):
        patch.setattr(shared.files.os, "fdopen", fdopen)
        run_federation(ScriptedGrid(), _cfg(workdir, "disk"))
    checkpoints = workdir / "runs" / "disk" / "checkpoints"
    assert load_checkpoint(checkpoints / "global.pt").meta["round"] == 1
    assert not list(checkpoints.glob("*.tmp")), "a partial temporary file was left behind"

    run_dir = run_federation(ScriptedGrid(), _cfg(workdir, "disk"), resume=True)
    final, expected = (load_checkpoint(d / "checkpoints" / "global.pt") for d in (run_dir, whole))
    assert final.meta["round"] == 3 and _rounds(run_dir) == [0, 1, 2, 3]
    assert all(torch.equal(expected.state_dict[k], final.state_dict[k]) for k in expected.state_dict)


@needs_espeak
def test_crash_before_the_first_checkpoint_restarts_cleanly(workdir: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        run_federation(ScriptedGrid(crash_at=1), _cfg(workdir, "early", **{"num-server-rounds": 1}))
    run_dir = run_federation(ScriptedGrid(), _cfg(workdir, "early", **{"num-server-rounds": 1}), resume=True)
    assert _rounds(run_dir) == [0, 1]


# -- a real `chorus simulate`, killed and resumed ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1200)  # two full `chorus simulate` starts: several minutes on 2 busy cores
@needs_espeak
def test_kill_and_resume_a_real_simulation(tmp_path: Path, tiny_workdir: TinyWorkdir) -> None:
    tiny_workdir(tmp_path)
    marker = f"chorus-resume-test-{uuid.uuid4().hex}"  # in the environment of every process the run starts
    env = {**os.environ, "CHORUS_TEST_MARKER": marker, "PYTHONUNBUFFERED": "1"}
    sets = [arg for k, v in {**TINY_RUN, "workdir": str(tmp_path)}.items() for arg in ("--set", f"{k}={v}")]
    simulate = ["simulate", "--clients", "4", "--rounds", "3", "--parallel", "1", "--run-id", "killed"]  # 1 Ray actor
    cmd = [sys.executable, "-m", "simulations.cli", *simulate, *sets]
    run_dir = tmp_path / "runs" / "killed"
    metrics = run_dir / "metrics.jsonl"
    log = (tmp_path / "first.log").open("wb")
    try:
        first = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )  # its own process group
        # Round 1's metrics line, then its checkpoint (written atomically: once the file is there it is whole).
        deadline = time.monotonic() + 480
        while not (
            metrics.exists() and '"round": 1,' in metrics.read_text() and (ckpt := run_dir / "checkpoints" / "global.pt").exists()
        ):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "round 1 did not finish in time"
            time.sleep(0.1)
        os.killpg(first.pid, signal.SIGKILL)  # a crash: no cleanup of any kind
        first.wait()
        stop_local_superlink(tmp_path / ".flwr")  # Flower's SuperLink runs in a session of its own
        assert not wait_gone(marker, 30), "processes of the killed run survived"
        committed = load_checkpoint(ckpt).meta["round"]
        lines_before = metrics.read_text().splitlines()[: committed + 1]  # rounds 0..committed

        resumed = subprocess.run([*cmd, "--resume"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

        lines = metrics.read_text().splitlines()
        assert [json.loads(line)["round"] for line in lines] == [0, 1, 2, 3]
        assert lines[: committed + 1] == lines_before  # committed rounds were not run again
        final = load_checkpoint(run_dir / "checkpoints" / "global.pt")
        assert final.meta["round"] == 3 and final.meta["run_id"] == "killed"

        # The run, across the crash, is what an uninterrupted one records: round 0 scores the starting model on
        # the devices (every round's baseline), every round has all 4 devices' replies, WER on the devices' own
        # data and on the server's held-out speakers, and aggregation moved the global model.
        records = [json.loads(line) for line in lines]
        assert 0.0 <= records[0]["device_wer"] and records[0]["device_words"] == records[1]["device_words"] > 0
        for r in records[1:]:
            assert (r["train_replies"], r["train_failures"], r["eval_replies"]) == (4, 0, 4), r
            assert r["train_loss"] > 0 and r["device_words"] > 0 and r["heldout_wer"] >= 0.0 and r["heldout_words"] > 0
        initial = load_checkpoint(run_dir / "checkpoints" / "initial.pt").state_dict
        changed = [k for k in initial if not torch.equal(initial[k], final.state_dict[k])]
        assert len(changed) > len(initial) // 2, "aggregation should move most of the global model's tensors"
        report = (run_dir / "report.md").read_text()
        assert "| 3 |" in report and "by accent" in report and (run_dir / "rounds.png").exists()
        assert not wait_gone(marker, 30), "processes of the resumed run survived"
    finally:
        log.close()
        stop_local_superlink(tmp_path / ".flwr")
        kill_marked(marker)
