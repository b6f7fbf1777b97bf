"""Flower ClientApp: one speaker's device. A thin adapter: records in, plain functions, records out.

Every reply passes the privacy audit before it leaves (shared/privacy/audit.py).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.data import DeviceData, node_data
from client.evaluate import evaluate_local
from client.train import fine_tune
from shared.config import RunConfig
from shared.privacy.audit import audit_reply

app = ClientApp()


def _setup(msg: Message, context: Context) -> tuple[RunConfig, dict[str, torch.Tensor], DeviceData, int, int]:
    # One core per simulated device: Ray runs one device per core; more threads would oversubscribe.
    torch.set_num_threads(1)
    cfg = RunConfig.from_flat(context.run_config)
    state = msg.content["arrays"].to_torch_state_dict()
    # Simulation: node_config has partition-id; deployment (`chorus device join`): data-dir + artifacts-dir.
    data = node_data(cfg, context.node_config)
    seed_id = int(context.node_config.get("partition-id", context.node_id % 1_000_003))  # seeds this device's steps
    return cfg, state, data, seed_id, int(msg.content["config"]["server-round"])


def _reply(msg: Message, content: RecordDict, global_state: dict[str, torch.Tensor]) -> Message:
    audit_reply(content, expected_arrays={k: tuple(v.shape) for k, v in global_state.items()})
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, state, data, seed_id, server_round = _setup(msg, context)
    update = fine_tune(cfg, state, data, server_round=server_round, partition_id=seed_id)
    metrics = MetricRecord({"train-loss": update.loss, "local-steps": update.steps,
                            "num-examples": update.num_examples, "compute-cost": update.compute_cost,
                            "skipped-utterances": update.skipped})
    return _reply(msg, RecordDict({"arrays": ArrayRecord(update.state_dict), "metrics": metrics}), state)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, state, data, _, _ = _setup(msg, context)
    counts = evaluate_local(cfg, state, data)
    metrics = MetricRecord({"word-errors": counts.errors, "words": counts.words,
                            "num-examples": counts.utterances, "wer": counts.wer if counts.words else 0.0})
    return _reply(msg, RecordDict({"metrics": metrics}), state)
