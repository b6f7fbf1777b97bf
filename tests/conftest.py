"""Shared fixtures: locations of the real corpora beside the checkout, and a tiny run config."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from flwr.app import Context

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def real_corpus(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real corpus {path} is absent (it ships only beside the developers' checkout)")
    return path


needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (sudo apt-get install espeak-ng)")

def with_run_config(context: Context, run_config: dict[str, bool | int | float | str]) -> Context:
    """The device's context with the run's config added. run_simulation's Python API gives devices no run config
    (`flwr run` would); a copy, since Flower refuses a device context whose run_config changed (and turns the
    reply into an error)."""
    return Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                   state=context.state, run_config={**context.run_config, **run_config})


# A federation small enough for CI: 4 devices, 2 public and 2 held-out speakers, a 2-layer model.
TINY_RUN = {
    "synth.speakers": 8, "synth.utterances": 6, "synth.seed": 3,
    "split.public-speakers": 2, "split.heldout-speakers": 2,
    "model.d-model": 64, "model.num-layers": 2, "model.num-heads": 2, "model.ffn-dim": 128,
    "model.vocab-size": 128, "model.init-checkpoint": "",
    "train.local-steps": 2, "train.batch-frames": 3000,
    "eval.heldout-utterances": 6,
    "strategy.min-train-nodes": 4, "strategy.min-evaluate-nodes": 4, "strategy.min-available-nodes": 4,
}


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    # Tests run many small ops: one thread is faster than two fighting over a 2-core CI machine.
    import torch

    torch.set_num_threads(1)
