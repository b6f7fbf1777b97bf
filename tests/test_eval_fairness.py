"""`chorus eval fairness --quick`: the whole experiment runs and prints one JSON object with the table's keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from simulations.cli import app
from simulations.eval_fairness import QUICK, FairnessPlan, arm_overrides
from shared.config import ConfigError
from tests.conftest import REPO_ROOT, SHARED_DATA, needs_espeak

SUMMARY_KEYS = {
    "overall_wer",
    "worst_wer",
    "best_wer",
    "gap",
    "bottom_share",
    "variance",
    "worst_cohort",
    "cohort_wer",
    "cohort_words",
}


@pytest.mark.slow
@needs_espeak
@pytest.mark.timeout(900)  # a hang guard, not a timing check: --quick takes a few minutes on 2 shared cores
def test_quick_fairness_eval_prints_one_json_object(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "eval", "fairness", "--quick", "--json", "--workdir", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout)  # stdout is exactly one JSON object; progress went to stderr
    assert {"experiment", "plan", "targets", "corpora", "seconds", "report"} <= set(summary)
    assert summary["plan"] == "quick"
    corpora = summary["corpora"]
    if (SHARED_DATA / "speechocean762-dev").is_dir():
        assert set(corpora) == {"synth", "speechocean762-dev"}
    else:
        assert "absent" in corpora["speechocean762-dev"]["skipped"]
    for name, section in corpora.items():
        if "skipped" in section:
            continue
        assert set(section["arms"]) == set(QUICK.arms), name
        for arm, row in [("base", section["base"]), *section["arms"].items()]:
            for partition in ("automatic", "metadata"):
                assert SUMMARY_KEYS <= set(row[partition]), (name, arm, partition)
            assert 0.0 <= row["automatic"]["overall_wer"] and row["automatic"]["cohorts"] == 3
        for arm, row in section["arms"].items():
            # The server's sums of the devices' dense vectors equal a central recount of the same cohorts.
            assert row["federated_matches_recount"], (name, arm)
        assert section["arms"]["ewc"]["targeted_cohorts"] and not section["arms"]["fedavg"]["targeted_cohorts"]
        # Population ARW: uniform weights (1: as without ARW) in the warm-up round, then the adversary weighs devices apart.
        spread = section["arms"]["arw"]["arw_weight_range"]
        assert len(spread) == QUICK.rounds and np.allclose(spread[0], 1.0), (name, spread)
        assert spread[-1][0] < spread[-1][1], (name, spread)
        assert not section["arms"]["fedavg"]["arw_weight_range"]
        # The personalized arm personalizes FedAvg's own final model (one federation, reused) on every device; a
        # device that keeps the received model scores as FedAvg's, so with none kept the rows are equal.
        personal, fedavg = section["arms"]["fedavg+personal"], section["arms"]["fedavg"]
        assert personal["run_dir"] == fedavg["run_dir"] and fedavg["personalized_devices"] is None
        assert 0 <= personal["personalized_devices"] <= section["devices"], name
        if personal["personalized_devices"] == 0:
            assert personal["automatic"] == fedavg["automatic"], name
    report = Path(summary["report"]).read_text()
    assert "| fedavg | automatic |" in report and "| ewc+arw | metadata |" in report
    assert "| fedavg+personal | automatic |" in report and "fedavg+personal " in report.split("Personalized arms:")[1]
    assert (Path(summary["report"]).parent / "fairness-synth.png").exists()


def test_plan_overrides_are_checked_and_win_over_corpus_defaults() -> None:
    plan = QUICK.with_overrides({"split.public-speakers": 5, "fairness.num-cohorts": 2})
    assert isinstance(plan, FairnessPlan) and plan.overrides["fairness.num-cohorts"] == 2
    assert "split.public-speakers" not in plan.corpus_overrides["synth"]
    ewc = arm_overrides("ewc", QUICK.with_overrides({"fairness.ewc-lambda": 0.1, "fairness.targeted-rounds": 2}))
    assert ewc["fairness.ewc-lambda"] == 0.1 and ewc["fairness.targeted-rounds"] == 2  # --set wins in the EWC arms too
    assert QUICK.with_overrides({"num-server-rounds": 5}).rounds == 5  # the rounds every arm runs
    with pytest.raises(ConfigError, match="'fairness.num-cohort'"):
        QUICK.with_overrides({"fairness.num-cohort": 2})


@pytest.mark.parametrize(
    ("args", "culprit"),
    [
        (["--corpus", "no-such-corpus"], "'no-such-corpus'"),
        (["--checkpoint", "base.pt"], "--checkpoint needs --corpus"),
        (["--corpus", "synth", "--checkpoint", "no-such.pt"], "no-such.pt"),
    ],
)
def test_bad_arguments_get_one_line_naming_them_before_any_work(tmp_path: Path, args: list[str], culprit: str) -> None:
    result = CliRunner().invoke(app, ["eval", "fairness", "--quick", "--workdir", str(tmp_path), *args])
    assert result.exit_code == 2 and culprit in result.output and len(result.output.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir()), "nothing is prepared or written before the arguments are checked"
