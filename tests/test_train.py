"""Central pretraining: learns, checkpoints, resumes exactly where it stopped, and averages its last checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from shared.config import RunConfig
from shared.models.checkpoint import CheckpointError, build_model, load_checkpoint, save_checkpoint
from simulations.cli import app
from simulations.train import TrainPlan, train_central
from tests.conftest import TINY_RUN, TinyWorkdir, needs_espeak

pytestmark = needs_espeak


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory, tiny_workdir: TinyWorkdir) -> RunConfig:
    workdir = tiny_workdir(tmp_path_factory.mktemp("train"))
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


def test_average_keeps_the_last_checkpoints_and_writes_their_mean(cfg: RunConfig, tmp_path: Path) -> None:
    plan = TrainPlan(steps=6, ckpt_every=2, eval_every=6, warmup=2, eval_utterances=2, average=2)
    ckpts = train_central(cfg, plan, run_dir=tmp_path / "avg", progress=False).parent
    assert sorted(p.name for p in ckpts.glob("step*.pt")) == ["step4.pt", "step6.pt"]
    four, six = (load_checkpoint(ckpts / f"step{s}.pt").state_dict for s in (4, 6))
    assert any(not torch.equal(four[k], six[k]) for k in four)  # two different models: the mean is neither
    averaged = load_checkpoint(ckpts / "averaged.pt")
    assert averaged.frontend is not None and averaged.meta["averaged"] == ["step4.pt", "step6.pt"]
    for key, value in averaged.state_dict.items():
        torch.testing.assert_close(value, (four[key] + six[key]) / 2 if value.is_floating_point() else six[key])

    out = tmp_path / "cli-average.pt"  # `chorus model average` writes the same mean
    result = CliRunner().invoke(app, ["model", "average", str(ckpts / "step4.pt"), str(ckpts / "step6.pt"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert all(torch.equal(load_checkpoint(out).state_dict[k], averaged.state_dict[k]) for k in four)
    other_cfg = RunConfig.from_flat({**TINY_RUN, "model.d-model": 96}).model
    other = save_checkpoint(tmp_path / "other.pt", build_model(other_cfg), other_cfg)
    result = CliRunner().invoke(app, ["model", "average", str(ckpts / "step4.pt"), str(other), "--out", str(out)])
    assert result.exit_code == 2 and "other.pt is a different model" in result.stderr, result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_a_device_this_machine_lacks_is_named(cfg: RunConfig) -> None:
    plan = TrainPlan(steps=1, eval_every=1, warmup=1, eval_utterances=2, device="cuda")
    with pytest.raises(ValueError, match="device='cuda' is not usable here"):
        train_central(cfg, plan, run_dir=cfg.workdir_path / "runs" / "gpu", progress=False)


def test_max_minutes_fits_the_whole_schedule_into_the_budget(cfg: RunConfig, capsys: pytest.CaptureFixture[str]) -> None:
    plan = TrainPlan(steps=100_000, ckpt_every=2, eval_every=4, warmup=1, eval_utterances=2, max_minutes=0.05)
    run_dir = cfg.workdir_path / "runs" / "budget"
    train_central(cfg, plan, run_dir=run_dir, progress=False)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]["step"]
    assert last < 100_000 and last % 2 == 0
    assert f"s a step, so {last} steps" in capsys.readouterr().out
    assert "heldout_wer" in records[-1], "the shortened schedule's last step is scored, as a full run's is"
    with pytest.raises(ValueError, match="max_minutes=-1.0 must be >= 0"):
        TrainPlan(max_minutes=-1.0)


def test_withhold_leaves_a_market_out_of_the_training_speakers(cfg: RunConfig) -> None:
    from shared.data.corpora import read_speakers_tsv
    from shared.data.prepare import prepare
    from simulations.train import _train_speakers

    prepared = prepare(cfg, progress=False)
    everyone = _train_speakers(prepared, "train", "")
    fleets = read_speakers_tsv(prepared.corpus.root)
    withheld = fleets[everyone[0]]["accent"]
    kept = _train_speakers(prepared, "train", f"accent={withheld}")
    assert kept == tuple(s for s in everyone if fleets[s]["accent"] != withheld) and len(kept) < len(everyone)

    with pytest.raises(ValueError, match="speakers.tsv has no column 'market'"):
        _train_speakers(prepared, "train", "market=legacy")
    with pytest.raises(ValueError, match=r"no speaker of .* has accent \['en-xx'\]"):
        _train_speakers(prepared, "train", f"accent={withheld},en-xx")
    result = CliRunner().invoke(app, ["train", "--withhold", "accent", "--set", f"workdir={cfg.workdir_path}"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].endswith("expected ATTRIBUTE=VALUE[,VALUE...], e.g. accent=en-029")


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
    assert prepared.artifacts != prepare(replace(other, model=replace(other.model, init_checkpoint="")), progress=False).artifacts


def test_amortized_arbitrators_fine_tune_from_a_dense_checkpoint_at_their_own_rate(cfg: RunConfig, tmp_path: Path) -> None:
    """`chorus train --arbitrator-lr`: an amortized model started from a dense checkpoint keeps the dense weights in
    one optimizer group at --lr and trains its fresh arbitrators in another at their own peak rate."""
    plan = TrainPlan(steps=2, ckpt_every=2, eval_every=2, warmup=1, eval_utterances=2)
    dense = train_central(cfg, plan, run_dir=tmp_path / "dense", progress=False).parent / "last.pt"
    flags = ["--steps", "2", "--eval-every", "2", "--lr", "1e-4", "--arbitrator-lr", "2e-3", "--run-id", "amortized"]
    settings = {**TINY_RUN, "workdir": str(cfg.workdir_path), "model.name": "amortized", "model.init-checkpoint": str(dense)}
    result = CliRunner().invoke(app, ["train", *flags, *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")]])
    assert result.exit_code == 0, result.output
    last = load_checkpoint(cfg.workdir_path / "runs" / "amortized" / "checkpoints" / "last.pt")
    blocks, arbitrators = last.meta["optimizer"]["param_groups"]
    assert arbitrators["lr"] == pytest.approx(20 * blocks["lr"])  # 2e-3 / 1e-4, at every step of the schedule
    names = [name for name, _ in last.build().named_parameters()]
    assert len(arbitrators["params"]) == sum(".arbitrator." in name for name in names) > 0


def test_split_market_draws_devices_and_held_out_speakers_from_the_market_and_public_ones_from_the_rest(
    cfg: RunConfig,
) -> None:
    from collections import Counter

    from shared.config import ConfigError
    from shared.data.corpora import read_speakers_tsv
    from shared.data.prepare import PrepareError, artifact_dir, plan_split, prepare, split_speakers

    root = prepare(cfg, progress=False).corpus.root
    accents = {speaker: row["accent"] for speaker, row in read_speakers_tsv(root).items()}
    accent, count = Counter(accents.values()).most_common(1)[0]
    assert count >= 2, "the tiny corpus needs one accent with a held-out and a federated speaker"
    flat = {**cfg.to_flat(), "split.market": f"accent={accent}", "split.heldout-speakers": 1}
    split = prepare(RunConfig.from_flat(flat), progress=False).split
    assert plan_split(RunConfig.from_flat(flat))[0] == split  # what a command checks before any synthesis
    market = {speaker for speaker, a in accents.items() if a == accent}
    assert set(split.heldout) | set(split.federated) == market and len(split.heldout) == 1
    assert len(split.public) == cfg.split.public_speakers and not set(split.public) & market
    assert artifact_dir(RunConfig.from_flat(flat)) != artifact_dir(RunConfig.from_flat({**flat, "split.market": ""}))

    with pytest.raises(PrepareError, match="cannot split 2 speakers of split.market and 1 others"):
        split_speakers(["a", "b", "c"], public=1, heldout=2, seed=0, market={"a", "b"})
    with pytest.raises(ConfigError, match="'split.market' = 'accent': expected ATTRIBUTE=VALUE"):
        RunConfig.from_flat({"split.market": "accent"})
    result = CliRunner().invoke(app, ["data", "prepare", "--set", f"corpus={root}", "--set", "split.market=accent=en-xx"])
    assert result.exit_code == 2
    named = f"split.market = 'accent=en-xx': no speaker of {root} has accent ['en-xx']"
    assert result.output.strip().splitlines()[-1].endswith(named)


def test_model_ship_writes_a_float16_file_and_its_manifest_entry(
    cfg: RunConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shared.models.checkpoint as checkpoint_module
    import simulations.ship as ship_module
    from shared.data.prepare import prepare

    shipped = tmp_path / "shipped"  # the package's own folder stays untouched
    shipped.mkdir()
    monkeypatch.setattr(checkpoint_module, "SHIPPED_DIR", shipped)
    monkeypatch.setattr(ship_module, "SHIPPED_DIR", shipped)
    plan = TrainPlan(steps=2, ckpt_every=2, eval_every=2, warmup=1, eval_utterances=2)
    best = train_central(cfg, plan, run_dir=tmp_path / "run", progress=False)
    corpus = prepare(cfg, progress=False).corpus.root
    args = ["model", "ship", str(best), "--name", "tiny", "--command", "chorus train ...", "--hardware", "test"]
    args += ["--eval-corpus", str(corpus), "--eval-command", "chorus data synth ...", "--built-on", "dense-6.pt of commit C"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    entry = json.loads((shipped / "manifest.json").read_text())["tiny.pt"]
    assert entry["built_on"] == "dense-6.pt of commit C" and entry["command"] == "chorus train ..."
    assert entry["sha256"] == checkpoint_module.sha256_of(shipped / "tiny.pt") and entry["step"] == 2
    assert entry["train_seconds"] > 0 and entry["eval"]["words"] > 0 and 0 <= entry["eval"]["wer"]
    assert {"accent", "gender"} <= set(entry["eval"]["by"]) and "wer" in entry["eval"]["wer_lead_silence"]
    weights = load_checkpoint(shipped / "tiny.pt").state_dict.values()
    assert all(v.dtype == torch.float16 for v in weights if v.is_floating_point())
