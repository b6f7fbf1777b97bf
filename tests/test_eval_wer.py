"""`chorus eval wer`: WER per speaker attribute, and one-line errors that name the bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shared.data.synth import synthesize
from shared.models.checkpoint import SHIPPED_DIR
from simulations.cli import app
from simulations.eval_wer import default_checkpoint
from tests.conftest import needs_espeak

runner = CliRunner()


@needs_espeak
def test_wer_overall_and_by_attribute_pools_the_same_words(tmp_path: Path) -> None:
    corpus = synthesize(tmp_path / "corpus", speakers=4, utterances=2, seed=41, workers=1, progress=False)
    result = runner.invoke(app, ["eval", "wer", "--corpus", str(corpus), "--by", "accent,fleet,speaker", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["utterances"] == 8 and out["checkpoint"] == str(default_checkpoint())
    assert sorted(out["by"]["speaker"]) == ["spk0000", "spk0001", "spk0002", "spk0003"]
    for attribute in ("accent", "fleet", "speaker"):
        assert sum(out["by_words"][attribute].values()) == out["words"]
        pooled = sum(out["by"][attribute][v] * out["by_words"][attribute][v] for v in out["by"][attribute])
        assert pooled / out["words"] == pytest.approx(out["wer"], abs=1e-3)
    # A dense model runs every sub-block; the shipped amortized one says what share of its sub-blocks ran.
    assert "executed_share" not in out
    late = runner.invoke(app, ["eval", "wer", "--corpus", str(corpus), "--lead-silence", "0.5", "--json"])
    assert late.exit_code == 0, late.output
    assert json.loads(late.stdout)["lead_silence_s"] == 0.5 and json.loads(late.stdout)["words"] == out["words"]
    amortized = SHIPPED_DIR / "amortized-6.pt"
    result = runner.invoke(app, ["eval", "wer", "--corpus", str(corpus), "--checkpoint", str(amortized), "--json"])
    assert result.exit_code == 0, result.output
    assert 0.0 < json.loads(result.stdout)["executed_share"] < 1.0


@pytest.mark.parametrize("case", ["missing checkpoint", "missing corpus", "empty corpus", "unknown attribute"])
def test_bad_input_gets_one_line_naming_it(case: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.jsonl").write_text("")
    args = {
        "missing checkpoint": ["--corpus", str(empty), "--checkpoint", str(tmp_path / "nope.pt")],
        "missing corpus": ["--corpus", str(tmp_path / "absent")],
        "empty corpus": ["--corpus", str(empty)],
        "unknown attribute": ["--corpus", str(empty), "--by", "height"],
    }[case]
    named = {"missing checkpoint": "nope.pt", "missing corpus": "absent", "empty corpus": "empty", "unknown attribute": "empty"}[
        case
    ]
    result = runner.invoke(app, ["eval", "wer", *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr
