"""A device's local round: fine-tune the received global model on its own utterances."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from client.data import DeviceData
from shared.config import RunConfig
from shared.data.dataset import make_batches
from shared.models.checkpoint import build_model, load_state
from shared.training import train_steps

__all__ = ["LocalUpdate", "fine_tune"]


@dataclass(frozen=True)
class LocalUpdate:
    state_dict: dict[str, torch.Tensor]
    loss: float
    steps: int
    num_examples: int  # distinct local training utterances: the FedAvg weight
    compute_cost: float
    skipped: int


def fine_tune(cfg: RunConfig, global_state: dict[str, torch.Tensor], data: DeviceData, *,
              server_round: int, partition_id: int) -> LocalUpdate:
    """``cfg.train.local_steps`` AdamW steps from the global weights (a fresh optimizer each round: the
    device keeps no optimizer state between rounds, so a device may skip rounds without stale moments)."""
    seed = cfg.train.seed * 1_000_003 + server_round * 1009 + partition_id
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    load_state(model, global_state, source="global model from the server")
    batches = make_batches(data.train, features=data.features, tokenizer=data.tokenizer,
                           max_frames=cfg.train.batch_frames, shuffle=True, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    stats = train_steps(model, batches, steps=cfg.train.local_steps, optimizer=optimizer,
                        spec_augment_seed=seed if cfg.train.spec_augment else None,
                        compute_weight=cfg.train.compute_weight)
    return LocalUpdate(state_dict=model.state_dict(), loss=stats.loss, steps=stats.steps,
                       num_examples=sum(len(b.ids) for b in batches), compute_cost=stats.compute_cost,
                       skipped=len(data.features.skipped))
