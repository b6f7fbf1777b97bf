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
def test_quick_bench_rejects_nan_updates_passes_sign_flips_and_reports_every_cell(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "robustness", "--quick", "--json", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary["clean"]) == {"fedavg", "krum"}
    cells = {(c["attack"], c["defense"]): c for c in summary["attacked"]}
    assert len(cells) == 4 and all(c["malicious"] == 2 for c in cells.values())  # 20% of 10 devices
    for cell in [*cells.values(), *summary["clean"].values()]:
        assert math.isfinite(cell["heldout_wer"]) and cell["heldout_words"] > 0
    rounds = summary["rounds"]
    # The default configuration (FedAvg with the server's validation) drops the NaN updates, every round...
    assert cells["nan", "fedavg"]["rejected_updates"] == 2 * rounds
    assert cells["nan", "fedavg"]["aggregated_rounds"] == rounds
    # ...and a sign flip, as large as an honest update, passes validation: that is the robust strategies' job.
    assert cells["sign-flip", "fedavg"]["rejected_updates"] == 0
    table = (tmp_path / "runs" / "bench-robustness-quick" / "robustness.md").read_text()
    assert "| nan | 2 |" in table and "| none | 0 |" in table
    assert summary["cached_cells"] == 0

    # Run again (a bench killed after its last cell, or a second process's share of the table): every cell
    # comes from cells/, with the figures it was measured with; a cell whose config changed runs again.
    changed = tmp_path / "runs" / "bench-robustness-quick" / "cells" / "bench-robustness-quick-nan-krum-2of10.json"
    stored = json.loads(changed.read_text())
    stored["config"]["num-server-rounds"] += 1  # as if measured with another plan
    changed.write_text(json.dumps(stored))
    again = CliRunner().invoke(app, ["bench", "robustness", "--quick", "--json", "--workdir", str(tmp_path)])
    assert again.exit_code == 0, again.output
    resumed = json.loads(again.stdout.strip().splitlines()[-1])
    assert resumed["cached_cells"] == 5
    again_cells = {(c["attack"], c["defense"]): c for c in resumed["attacked"]}
    assert not again_cells["nan", "krum"]["cached"]
    for key, cell in cells.items():
        if key != ("nan", "krum"):
            assert again_cells[key] == {**cell, "cached": True}


def test_unknown_attack_is_refused_in_one_line() -> None:
    result = CliRunner().invoke(app, ["bench", "robustness", "--quick", "--attacks", "nan,ddos"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --attacks: ddos not among nan, scaled, sign-flip, noise, shuffled"


def test_a_share_outside_zero_one_is_refused_in_one_line() -> None:
    result = CliRunner().invoke(app, ["bench", "robustness", "--quick", "--shares", "0.2,1.5"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --shares: 1.5 not in (0, 1)"
