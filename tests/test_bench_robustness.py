"""`chorus bench robustness --quick`: real federations with malicious devices, every cell beside the clean runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simulations.cli import app
from tests.conftest import needs_espeak


@needs_espeak
@pytest.mark.timeout(900)  # a hang guard: about a minute on 2 idle cores
def test_quick_bench_rejects_nan_and_scaled_updates_and_reports_every_cell(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "robustness", "--quick", "--json", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary["clean"]) == {"fedavg", "fedmedian", "krum"}
    cells = {(c["attack"], c["defense"]): c for c in summary["attacked"]}
    assert len(cells) == 9 and all(c["malicious"] == 2 for c in cells.values())  # 20% of 10 devices
    for cell in [*cells.values(), *summary["clean"].values()]:
        assert math.isfinite(cell["heldout_wer"]) and cell["heldout_words"] > 0
    rounds = summary["rounds"]
    # The default configuration (FedAvg with the server's validation) drops both attacks, every round...
    assert cells["nan", "fedavg"]["rejected_updates"] == 2 * rounds
    assert cells["scaled", "fedavg"]["rejected_updates"] == 2 * rounds
    assert cells["nan", "fedavg"]["aggregated_rounds"] == rounds
    # ...and a sign flip, as large as an honest update, passes validation: that is the robust strategies' job.
    assert cells["sign-flip", "fedavg"]["rejected_updates"] == 0
    table = (tmp_path / "runs" / "bench-robustness-quick" / "robustness.md").read_text()
    assert "| nan | 2 |" in table and "| none | 0 |" in table


def test_unknown_attack_is_refused_in_one_line() -> None:
    result = CliRunner().invoke(app, ["bench", "robustness", "--quick", "--attacks", "nan,ddos"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --attacks: ddos not among nan, scaled, sign-flip, noise, shuffled"


def test_a_share_outside_zero_one_is_refused_in_one_line() -> None:
    result = CliRunner().invoke(app, ["bench", "robustness", "--quick", "--shares", "0.2,1.5"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --shares: 1.5 not in (0, 1)"
