"""A device scores the global model on its own held-out utterances and reports only error counts."""

from __future__ import annotations

import torch

from client.data import DeviceData
from shared.config import RunConfig
from shared.metrics import ErrorCounts
from shared.models.checkpoint import build_model, load_state
from shared.training import score

__all__ = ["evaluate_local"]


def evaluate_local(cfg: RunConfig, global_state: dict[str, torch.Tensor], data: DeviceData) -> ErrorCounts:
    model = build_model(cfg.model)
    load_state(model, global_state, source="global model from the server")
    total, _ = score(
        model,
        data.eval,
        features=data.features,
        tokenizer=data.tokenizer,
        beam=cfg.eval.beam,
        batch_frames=cfg.train.batch_frames,
    )
    return total
