"""`chorus eval privacy --quick --json`: one JSON object with every setting's keys, a report and a plot."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from typer.testing import CliRunner

from client.data import device_data
from shared.config import RunConfig
from shared.data.corpora import read_speakers_tsv
from shared.data.prepare import open_prepared
from shared.data.synth import ACCENTS
from shared.models.checkpoint import SHIPPED_DIR
from shared.privacy.dp import AccountantState
from simulations.cli import app
from simulations.eval_federation import LAUNCH_BASE
from tests.conftest import REPO_ROOT, needs_espeak

pytestmark = [pytest.mark.slow, needs_espeak]

MARKETS = tuple(a for a in ACCENTS if a != "en-gb-x-gbclan")  # every accent but one (a rare one)

SETTING_KEYS = {
    "name",
    "dp",
    "noise_multiplier",
    "epsilon",
    "epsilon_per_client",
    "epsilon_per_round",
    "heldout_wer",
    "device_wer",
    "relative_device_wer_cost",
    "rounds",
    "relative_wer_cost",
    "gain_kept",
    "device_gain_kept",
    "mia",
    "device_failures",
    "seconds_per_device_round",
    "seconds",
}


@pytest.mark.timeout(2400)  # ~2 min of CPU: under 5 min on 2 free cores, far longer on a loaded machine
def test_quick_privacy_eval_prints_json(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulations.cli",
            "eval",
            "privacy",
            "--quick",
            "--json",
            "--workdir",
            str(tmp_path),
            "--devices",
            "3",
            "--markets",
            ",".join(MARKETS),
            "--noise-multipliers",
            "0.5,1,2",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=2300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert {"base", "non_dp", "settings", "step_time", "targets", "plan", "duration_s", "run_dir"} <= set(result)
    assert 0.0 <= result["base"]["mia"]["auc"] <= 1.0  # the attack on a model that saw no device data

    # The devices are the first 3 federated speakers of the chosen markets (the corpus' order, others skipped).
    plan = result["plan"]
    cfg = RunConfig.from_flat({**RunConfig().to_flat(), **plan["overrides"], "workdir": str(tmp_path)})
    prepared = open_prepared(cfg)
    accents = {s: row["accent"] for s, row in read_speakers_tsv(prepared.corpus.root).items()}
    federated = [prepared.speaker_for_partition(p) for p in range(len(prepared.split.federated))]
    expected = {str(p): accents[s] for p, s in enumerate(federated) if accents[s] in MARKETS}
    assert result["device_markets"] == dict(list(expected.items())[:3])
    # Device WER is over these devices' own local-eval utterances; its word count says how many errors a figure is.
    local_eval = [u for p in result["device_markets"] for u in device_data(cfg, int(p)).eval]
    assert result["base"]["device_words"] == sum(len(u.text.split()) for u in local_eval) > 0

    settings = result["settings"]
    assert settings[0]["name"] == "non-dp" and settings[0]["epsilon"] is None and not settings[0]["dp"]
    # Non-DP keeps all of its own gain, or had none to keep (a 30-step base model: WER 1 before and after).
    assert settings[0]["gain_kept"] in (None, 1.0) and settings[0]["device_gain_kept"] in (None, 1.0)
    dp = [s for s in settings if s["dp"]]
    assert [s["noise_multiplier"] for s in dp] == [0.5, 1.0, 2.0]  # --noise-multipliers
    for s in settings:
        assert SETTING_KEYS <= set(s), f"{s['name']} lacks {SETTING_KEYS - set(s)}"
        assert 0.0 <= s["heldout_wer"] and s["device_failures"] == 0
        for attack in ("device_update", "global_model"):
            assert 0.0 <= s["mia"][attack]["auc"] <= 1.0 and s["mia"][attack]["members"] > 0
    for s in dp:
        # Every device reported its epsilon; all trained every round at the same (sigma, q), so they agree with
        # the RDP accountant fed rounds x local steps.
        assert len(s["epsilon_per_client"]) == plan["devices"]
        expected = (
            AccountantState()
            .after(
                noise_multiplier=s["noise_multiplier"],
                sample_rate=plan["dp"]["sample_rate"],
                steps=plan["rounds"] * plan["local_steps"],
            )
            .epsilon(plan["dp"]["delta"])
        )
        assert all(math.isclose(e, expected, rel_tol=1e-9) for e in s["epsilon_per_client"].values())
        assert len(s["epsilon_per_round"]) == plan["rounds"]
        assert s["epsilon_per_round"] == sorted(s["epsilon_per_round"])  # it only grows
    by_sigma = sorted(dp, key=lambda s: s["noise_multiplier"])
    assert [s["epsilon"] for s in by_sigma] == sorted((s["epsilon"] for s in dp), reverse=True)  # more noise, less eps

    step = result["step_time"]
    # Times only: two step pairs on a machine the other tests share put no order on them (the DP/plain ratio is
    # the benchmark's figure, measured on idle cores, never a test's).
    assert step["plain_s"] > 0 and step["dp_s"] > 0
    run_dir = Path(result["run_dir"])
    report = (run_dir / "report.md").read_text()
    assert "| non-dp |" in report and "wer_vs_epsilon.png" in report
    assert (run_dir / "wer_vs_epsilon.png").stat().st_size > 0


def test_bad_markets_and_a_missing_launch_base_are_named_before_anything_runs(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["eval", "privacy", "--quick", "--markets", "en-029,en-mars", "--workdir", str(tmp_path)])
    assert bad.exit_code == 2 and "['en-mars'] is not one of" in bad.output
    beyond = runner.invoke(app, ["eval", "privacy", "--quick", "--devices", "50", "--markets", "any", "--workdir", str(tmp_path)])
    assert beyond.exit_code == 2 and "--devices 50: the corpus has " in beyond.output  # the split, before any synthesis
    if not (SHIPPED_DIR / LAUNCH_BASE).exists():  # the full plan starts from the launch base, or --checkpoint
        unshipped = runner.invoke(app, ["eval", "privacy", "--workdir", str(tmp_path)])
        assert unshipped.exit_code == 2 and f"{LAUNCH_BASE} is not shipped yet; pass --checkpoint" in unshipped.output
    assert not (tmp_path / "data").exists()  # nothing was synthesized
