"""`chorus bench compute --quick --json`: one valid JSON object with every model's keys, nothing else on stdout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, needs_espeak

pytestmark = [pytest.mark.slow, needs_espeak]

KEYS = {
    "params",
    "wer",
    "encoder_gflops_per_audio_second",
    "batch1_streaming_rtf",
    "relative_flops_vs_dense",
    "relative_wall_vs_dense",
}


def test_quick_bench_prints_json(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "bench", "compute", "--quick", "--json", "--workdir", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert set(result["models"]) == {"transformer", "transformer-continued", "sliding-window", "convrnnt", "amortized"}
    for name, row in result["models"].items():
        assert KEYS <= set(row), f"{name} lacks {KEYS - set(row)}"
        assert row["params"] > 0 and row["encoder_gflops_per_audio_second"] > 0 and row["batch1_streaming_rtf"] > 0
        assert 0.0 <= row["wer"]
    assert result["models"]["transformer"]["relative_flops_vs_dense"] == 1.0
    # Sliding-window attention looks at 8 frames instead of 64: it must execute fewer FLOPs.
    assert result["models"]["sliding-window"]["relative_flops_vs_dense"] < 1.0
    curve = result["amortized_curve"]
    assert len(curve) >= 4 and all(0.0 < c["executed_share"] <= 1.0 for c in curve)
    assert (Path(result["run_dir"]) / "report.md").exists()
    # The amortized models' WER is relative to the dense model trained as long (base + fine-tuning steps).
    continued = result["models"]["transformer-continued"]
    for point in curve:
        assert point["relative_wer_vs_dense"] == pytest.approx(point["wer"] / continued["wer"])
