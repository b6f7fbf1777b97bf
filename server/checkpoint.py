"""The server's round checkpoint: global model + strategy state + round number, in one atomically written file.

Flower's stateful strategies carry optimizer state from round to round in plain attributes: the FedOpt
family (FedAdam, FedYogi, FedAdagrad) keeps the first and second moments ``m_t`` / ``v_t``, FedAvgM its
``momentum_vector``. A resume that restores only the weights would restart those from zero. Both go into
``runs/<id>/checkpoints/global.pt`` together, written to a temporary file and moved into place with
``os.replace`` (``save_checkpoint``), so a kill mid-write leaves the previous round's checkpoint whole.

A round's ``metrics.jsonl`` line is written *before* its checkpoint: the checkpoint commits the round. A kill
between the two leaves a line for a round that is not committed; resume reruns that round and
:func:`rewind_metrics` drops the line first (with any torn last line), so every round appears exactly once.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.serverapp import strategy as flwr_strategy
from torch import nn

from shared.config import ModelConfig
from shared.files import write_text_atomic
from shared.models.checkpoint import CheckpointError, load_checkpoint, load_state, save_checkpoint

__all__ = ["STRATEGY_STATE", "strategy_state", "restore_strategy_state", "save_round", "load_round", "rewind_metrics"]

log = logging.getLogger("chorus.server")

# The attributes in which Flower 1.42's built-in strategies keep state across rounds (FedOpt: dicts of
# arrays by parameter name; FedAvgM: a list of arrays). ``current_arrays`` is not state: both families set
# it from the global model in ``configure_train``, which equals the checkpointed model.
STRATEGY_STATE = ("m_t", "v_t", "momentum_vector")


def _to_tensors(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: torch.from_numpy(np.array(v)) for k, v in value.items()}
    return [torch.from_numpy(np.array(v)) for v in value]


def _to_arrays(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: v.numpy() for k, v in value.items()}
    return [v.numpy() for v in value]


def strategy_state(strategy: flwr_strategy.Strategy) -> dict[str, Any]:
    """The strategy's cross-round state as tensors (exact dtypes kept); empty for a stateless strategy."""
    return {name: _to_tensors(getattr(strategy, name)) for name in STRATEGY_STATE if getattr(strategy, name, None) is not None}


def restore_strategy_state(strategy: flwr_strategy.Strategy, state: dict[str, Any]) -> None:
    for name, value in state.items():
        if not hasattr(strategy, name):
            raise CheckpointError(f"strategy {type(strategy).__name__} has no state {name!r} to restore")
        setattr(strategy, name, _to_arrays(value))


def save_round(
    path: Path,
    model: nn.Module,
    model_config: ModelConfig,
    *,
    server_round: int,
    run_id: str,
    strategy_name: str,
    strategy: flwr_strategy.Strategy,
) -> Path:
    """Commit ``server_round``: the global model (``model``) and the strategy's state, in one atomic write."""
    return save_checkpoint(
        path,
        model,
        model_config,
        round=server_round,
        run_id=run_id,
        strategy={"name": strategy_name, "state": strategy_state(strategy)},
    )


def load_round(
    path: Path, model: nn.Module, model_config: ModelConfig, *, strategy_name: str, strategy: flwr_strategy.Strategy
) -> int:
    """Load a ``save_round`` checkpoint into ``model`` and ``strategy``; returns the last committed round."""
    ckpt = load_checkpoint(path, expect=model_config)
    saved = ckpt.meta.get("strategy", {"name": strategy_name, "state": {}})
    if saved["name"] != strategy_name:
        raise CheckpointError(
            f"{path} was written by strategy {saved['name']!r}, the run config says "
            f"{strategy_name!r}: resume with the run's own strategy.name"
        )
    load_state(model, ckpt.state_dict, source=str(path))
    restore_strategy_state(strategy, saved["state"])
    return int(ckpt.meta["round"])


def rewind_metrics(path: Path, *, before: int) -> list[dict[str, Any]]:
    """Keep the ``metrics.jsonl`` lines of rounds ``< before`` (dropping a torn last line); atomic rewrite."""
    kept: list[dict[str, Any]] = []
    if path.exists():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s: dropping a torn line (the run was killed while writing it)", path)
                continue
            if record["round"] < before:
                kept.append(record)
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    return kept
