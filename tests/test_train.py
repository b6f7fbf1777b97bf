"""Central pretraining: learns, checkpoints, and resumes exactly where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared.config import RunConfig
from shared.models.checkpoint import CheckpointError, load_checkpoint
from simulations.train import TrainPlan, train_central
from tests.conftest import TINY_RUN, needs_espeak

pytestmark = needs_espeak


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> RunConfig:
    workdir = tmp_path_factory.mktemp("train")
    return RunConfig.from_flat({**TINY_RUN, "workdir": str(workdir), "model.dropout": 0.1})


def test_resume_continues_exactly(cfg: RunConfig) -> None:
    plan = TrainPlan(steps=4, ckpt_every=2, eval_every=4, warmup=2, eval_utterances=4)
    straight = train_central(cfg, plan, run_dir=cfg.workdir_path / "runs" / "straight", progress=False)

    # "Crash" after the first checkpoint (step 2), then resume the same run to step 4.
    half = TrainPlan(**{**plan.__dict__, "steps": 2})
    crashed_dir = cfg.workdir_path / "runs" / "crashed"
    train_central(cfg, half, run_dir=crashed_dir, progress=False)
    assert load_checkpoint(crashed_dir / "checkpoints" / "last.pt").meta["step"] == 2
    train_central(cfg, plan, run_dir=crashed_dir, resume=True, progress=False)

    a = load_checkpoint(straight.parent / "last.pt").state_dict
    b = load_checkpoint(crashed_dir / "checkpoints" / "last.pt").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed training must equal uninterrupted training"
    steps = [json.loads(line)["step"] for line in (crashed_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


def test_loss_goes_down(cfg: RunConfig) -> None:
    plan = TrainPlan(steps=30, ckpt_every=10, eval_every=30, warmup=5, peak_lr=3e-3, eval_utterances=4)
    run_dir = cfg.workdir_path / "runs" / "learn"
    train_central(cfg, plan, run_dir=run_dir, progress=False)
    losses = [json.loads(line)["train_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0]


def test_corrupt_and_mismatched_checkpoints_are_named(cfg: RunConfig, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt is corrupt"):
        load_checkpoint(bad)
    plan = TrainPlan(steps=1, ckpt_every=1, eval_every=1, warmup=1, eval_utterances=2)
    good = train_central(cfg, plan, run_dir=tmp_path / "one-step", progress=False).parent / "last.pt"
    other = RunConfig.from_flat({**TINY_RUN, "model.d-model": 96}).model
    with pytest.raises(CheckpointError, match="d_model: checkpoint 64 vs expected 96"):
        load_checkpoint(good, expect=other)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_a_device_this_machine_lacks_is_named(cfg: RunConfig) -> None:
    plan = TrainPlan(steps=1, eval_every=1, warmup=1, eval_utterances=2, device="cuda")
    with pytest.raises(ValueError, match="device='cuda' is not usable here"):
        train_central(cfg, plan, run_dir=cfg.workdir_path / "runs" / "gpu", progress=False)


def test_checkpoints_carry_their_front_end_and_runs_that_start_from_one_use_it(cfg: RunConfig, tmp_path: Path) -> None:
    from dataclasses import replace

    from shared.data.prepare import prepare

    plan = TrainPlan(steps=2, ckpt_every=2, eval_every=2, warmup=1, eval_utterances=2)
    best = train_central(cfg, plan, run_dir=cfg.workdir_path / "runs" / "frontend", progress=False)
    trained_with = prepare(cfg, progress=False)
    frontend = load_checkpoint(best).frontend
    assert frontend is not None
    assert frontend.tokenizer.model_proto == trained_with.tokenizer.model_proto
    assert (frontend.cmvn.mean == trained_with.cmvn.mean).all()

    # Another corpus (its own public speakers would train another tokenizer): the run takes the checkpoint's.
    other = RunConfig.from_flat({**cfg.to_flat(), "synth.seed": 5, "model.init-checkpoint": str(best)})
    prepared = prepare(other, progress=False)
    assert prepared.tokenizer.model_proto == frontend.tokenizer.model_proto
    assert (prepared.cmvn.std == frontend.cmvn.std).all()
    assert prepared.artifacts != prepare(replace(other, model=replace(other.model, init_checkpoint="")),
                                         progress=False).artifacts
