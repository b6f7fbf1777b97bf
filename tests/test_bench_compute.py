"""`chorus bench compute --quick --json`: one valid JSON object with every model's keys, nothing else on stdout;
every trained model starts from the shipped dense base."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shared.models.checkpoint import shipped_manifest
from tests.conftest import REPO_ROOT, needs_espeak

pytestmark = [pytest.mark.slow, needs_espeak]

ROW_KEYS = {
    "params",
    "wer",
    "encoder_gflops_per_audio_second",
    "relative_flops_vs_dense",
    "batch1_streaming_rtf",
    "relative_wall_vs_dense",
    "relative_wer_vs_dense",
    "by",
}


def _quick_bench(workdir: Path, *flags: str) -> dict[str, Any]:
    """``chorus bench compute --quick --json [flags]`` in ``workdir``: its one JSON object."""
    command = ["bench", "compute", "--quick", *flags, "--json", "--workdir", str(workdir)]
    out = subprocess.run(
        [sys.executable, "-m", "simulations.cli", *command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_quick_bench_prints_json(tmp_path: Path) -> None:
    result = _quick_bench(tmp_path)
    assert set(result["models"]) == {"transformer", "transformer-continued", "sliding-window", "convrnnt", "amortized"}
    for name, row in result["models"].items():
        assert ROW_KEYS <= set(row), f"{name} lacks {ROW_KEYS - set(row)}"
        assert row["params"] > 0 and row["encoder_gflops_per_audio_second"] > 0
    # ConvRNN-T is measured as shipped, its WER against the dense base as shipped.
    convrnnt = result["models"]["convrnnt"]
    assert convrnnt["relative_flops_vs_dense"] < 1.0
    assert Path(result["checkpoints"]["convrnnt"]).name == "convrnnt-6.pt"
    assert convrnnt["params"] == shipped_manifest()["convrnnt-6.pt"]["parameters"]
    assert convrnnt["relative_wer_vs_dense"] == pytest.approx(convrnnt["wer"] / result["models"]["transformer"]["wer"])
    dense = result["models"]["transformer"]
    assert dense["relative_flops_vs_dense"] == 1.0 and dense["batch1_streaming_rtf"] > 0
    # The dense row is the shipped base as shipped.
    assert Path(result["checkpoints"]["transformer"]).name == "dense-6.pt"
    assert dense["params"] == shipped_manifest()["dense-6.pt"]["parameters"]
    assert 0.0 <= dense["wer"] and set(dense["by"]) == {"accent", "fleet"}
    # Sliding-window attention looks at 8 frames instead of 64: it must execute fewer FLOPs.
    assert result["models"]["sliding-window"]["relative_flops_vs_dense"] < 1.0
    curve = result["amortized_curve"]
    assert len(curve) >= 2 and all(0.0 < c["executed_share"] <= 1.0 for c in curve)
    assert (Path(result["run_dir"]) / "report.md").exists()
    # The fine-tuned models' WER is relative to the dense model trained as long (base + fine-tuning steps).
    continued = result["models"]["transformer-continued"]
    for point in curve:
        assert point["relative_wer_vs_dense"] == pytest.approx(point["wer"] / continued["wer"])


def test_shipped_bench_measures_the_shipped_bases_as_they_are(tmp_path: Path) -> None:
    """``--shipped`` trains nothing: the dense, amortized and ConvRNN-T bases as shipped, side by side, every WER
    against the dense base's."""
    result = _quick_bench(tmp_path, "--shipped", "--beam", "2", "--chunk-ms", "320")
    assert result["settings"]["chunk_ms"] == 320
    everything = result["models"]
    # --beam 2: every model measured a second time under beam search, streamed, against the dense greedy row.
    searched = {name: row for name, row in everything.items() if name.endswith("+beam2")}
    models = {name: row for name, row in everything.items() if name not in searched}
    assert set(models) == {"transformer", "amortized", "convrnnt"} and result["amortized_curve"] == []
    assert set(searched) == {f"{name}+beam2" for name in models}
    for name, row in searched.items():
        greedy = models[name.removesuffix("+beam2")]
        assert row["beam"] == 2 and greedy["beam"] == 1 and row["params"] == greedy["params"]
        assert row["relative_wer_vs_dense"] == pytest.approx(row["wer"] / models["transformer"]["wer"])
        assert row["relative_wer_vs_dense_same_search"] == pytest.approx(row["wer"] / searched["transformer+beam2"]["wer"])
        assert greedy["relative_wer_vs_dense_same_search"] == greedy["relative_wer_vs_dense"]
        assert row["encoder_gflops_per_audio_second"] == pytest.approx(greedy["encoder_gflops_per_audio_second"])
        assert len(row["pass_seconds"]) == 2 and row["batch1_streaming_rtf"] > 0
    manifest = shipped_manifest()
    by_architecture = {e["model_config"]["name"]: n for n, e in manifest.items() if "model_config" in e and not e.get("withheld")}
    for name, row in models.items():
        assert ROW_KEYS <= set(row), f"{name} lacks {ROW_KEYS - set(row)}"
        assert Path(result["checkpoints"][name]).name == by_architecture[name]
        assert row["params"] == manifest[by_architecture[name]]["parameters"]
        assert row["relative_wer_vs_dense"] == pytest.approx(row["wer"] / models["transformer"]["wer"])
    assert 0.0 < models["amortized"]["executed_share"] <= 1.0
    assert models["convrnnt"]["relative_flops_vs_dense"] < 1.0
    # Again as a device hears it: the plan's lead-in of noise floor before each test recording.
    for row in models.values():
        assert 0.0 <= row["wer_lead_silence"] and row["encoder_gflops_per_audio_second_lead_silence"] > 0
    assert models["transformer"]["relative_flops_vs_dense_lead_silence"] == 1.0
    assert 0.0 < models["amortized"]["executed_share_lead_silence"] <= 1.0
    assert "Lead-in: 0.5 s" in (Path(result["run_dir"]) / "report.md").read_text()
    # Wall time: each model timed once per pass, the passes interleaved; a ratio is taken within a pass.
    for row in models.values():
        assert len(row["pass_seconds"]) == result["settings"]["plan"]["repeats"] == 2
        low, high = row["relative_wall_range"]
        assert low <= row["relative_wall_vs_dense"] <= high
    assert models["transformer"]["relative_wall_range"] == [1.0, 1.0]
    assert not (tmp_path / "runs" / "bench-compute-shipped-quick" / "transformer-continued").exists()  # nothing trained


def test_a_chunk_that_is_not_whole_frames_is_refused_by_name() -> None:
    from typer.testing import CliRunner

    from simulations.cli import app

    result = CliRunner().invoke(app, ["bench", "compute", "--shipped", "--chunk-ms", "155"])
    assert result.exit_code != 0 and "--chunk-ms 155" in result.output
