"""Federated fine-tuning of the two-talker model over devices that each hold two-talker sessions.

``federate`` plays the server of ``rounds`` FedAvg rounds in this process: every device is a call of the real
ClientApp (``client.multitalker.mt_app``, its privacy audit mod included) through ``simulations/harness.py``'s
``InProcessGrid``, on the wire; the server side is Flower's FedAvg (``server.workflow.make_strategy``, whose
evaluation pools word-error counts) and the server's one send/receive path, which validates every reply
(``server/exchange.py``). The global model is evaluated on the devices' held-out sessions before the first round
and after each: the pooled WER (sum of the devices' word errors / sum of their words). The pattern is the
verifier's federation (``simulations/eval_verification.py``'s ``federate``). ``run`` is `chorus simulate-multitalker`:
inputs checked first, then ``federate``, the final global model and the round table written to the run folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import Strategy

from client.multitalker import MODEL_KEY, SESSIONS_DIR_KEY, MultitalkerRecipe, model_arrays, mt_app
from server.exchange import exchange
from server.workflow import make_strategy, train_round
from shared.config import ModelConfig, StrategyConfig
from shared.data.mix import MixError, load_sessions
from shared.files import write_text_atomic
from shared.models.checkpoint import read_payload
from shared.models.separator_transducer import SeparatorTransducer
from shared.multitalker import load_multitalker, save_multitalker
from shared.records import scalar
from simulations.harness import InProcessGrid, server_identity

__all__ = ["MultitalkerFederation", "federate", "run"]


@dataclass(frozen=True)
class MultitalkerFederation:
    """The global model after the last round, one row per round (round 0: before training), and every
    (message as sent, reply as it left its device)."""

    model: SeparatorTransducer
    rounds: list[dict[str, Any]]
    exchanges: list[tuple[Message, Message]]


def _evaluate(
    strategy: Strategy,
    grid: InProcessGrid,
    model: SeparatorTransducer,
    server_round: int,
    config: dict[str, Any],
    limits: StrategyConfig,
) -> dict[str, Any]:
    """The devices' pooled counts on their held-out sessions under the global ``model``."""
    messages = list(strategy.configure_evaluate(server_round, ArrayRecord(model_arrays(model)), ConfigRecord(config), grid))
    result = exchange(grid, messages, phase=f"multi-talker evaluation {server_round}", strategy=limits)
    metrics = strategy.aggregate_evaluate(server_round, result.ok) if result.ok else None
    if metrics is None:
        return {"wer": None, "word_errors": None, "words": None}
    return {
        "wer": round(float(scalar(metrics, "wer")), 4),
        "word_errors": int(scalar(metrics, "word-errors")),
        "words": int(scalar(metrics, "words")),
    }


def federate(init: Path, devices: Sequence[Path], recipe: MultitalkerRecipe, *, rounds: int) -> MultitalkerFederation:
    """Fine-tune the multi-talker model ``init`` on ``devices`` (one sessions folder each) for ``rounds`` FedAvg
    rounds; see the module docstring."""
    model, _, _, _ = load_multitalker(init)
    limits = StrategyConfig(min_train_nodes=len(devices), min_evaluate_nodes=len(devices), min_available_nodes=len(devices))
    strategy = make_strategy(limits)  # Flower's FedAvg, as the recognizer's default
    grid = InProcessGrid(mt_app, len(devices), {}, on_wire=True)
    for node, folder in zip(grid.get_node_ids(), devices, strict=True):
        grid.contexts[node].node_config.update({SESSIONS_DIR_KEY: str(folder), MODEL_KEY: str(init)})
    config: dict[str, Any] = recipe.to_config()
    with server_identity():
        history: list[dict[str, Any]] = [{"round": 0, **_evaluate(strategy, grid, model, 0, config, limits)}]
        for server_round in range(1, rounds + 1):
            started = time.monotonic()
            arrays = ArrayRecord(model_arrays(model))
            phase = f"multi-talker round {server_round}"
            trained = train_round(grid, strategy, server_round, arrays, limits, config=ConfigRecord(config), phase=phase)
            if trained.arrays is not None:
                model.load_state_dict(trained.arrays.to_torch_state_dict(), strict=False)
            history.append(
                {
                    "round": server_round,
                    **trained.fields(),
                    **_evaluate(strategy, grid, model, server_round, config, limits),
                    "seconds": round(time.monotonic() - started, 1),
                }
            )
    return MultitalkerFederation(model=model, rounds=history, exchanges=list(grid.exchanges))


def run(init: Path, devices: Sequence[Path], recipe: MultitalkerRecipe, *, rounds: int, run_dir: Path) -> dict[str, Any]:
    """``federate``, after checking what a user gives (MixError or CheckpointError naming the file or folder,
    before any training); writes ``run_dir/global.pt`` (the final global model, a multi-talker model file) and
    ``run_dir/federation.json`` (the rounds), and returns the latter's content."""
    for folder in devices:
        count = len(load_sessions(folder))
        if count <= recipe.heldout:
            raise MixError(f"{folder}: {count} sessions, but the last {recipe.heldout} are held out: none left to train on")
    _, kind, frontend, _ = load_multitalker(init)
    base_config = ModelConfig(**read_payload(init, "multi-talker model")["model_config"])
    started = time.monotonic()
    federation = federate(init, devices, recipe, rounds=rounds)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_path = save_multitalker(
        run_dir / "global.pt",
        federation.model,
        base_config,
        kind,
        frontend=frontend,
        federation={"init": str(init), "rounds": rounds},
    )
    result = {
        "init": str(init),
        "kind": kind,
        "devices": [str(d) for d in devices],
        "recipe": recipe.to_config(),
        "rounds": federation.rounds,
        "model": str(model_path),
        "seconds": round(time.monotonic() - started, 1),
    }
    write_text_atomic(run_dir / "federation.json", json.dumps(result, indent=1) + "\n")
    return result
