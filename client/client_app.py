"""Flower ClientApp: one speaker's device. A thin adapter: records in, plain functions, records out.

Train replies can be securely aggregated (SecAgg+, ``client/secagg.py``) and clipped for central DP, by run config.
Every reply passes the privacy audit before it leaves: ``audit_mod`` (shared/privacy/audit.py) wraps every
handler of this app, in simulation and in deployment, checks the reply against the allowlist and against the
arrays the server sent, and turns a violation into an error reply.

Power-of-Choice selection (``strategy.selection``): a query handler (``query.loss``) answers with the global
model's loss on the device's training utterances.

Fairness phases (``fairness.enabled``; message contract in ``shared/fairness/protocol.py``, device side in
``client/fairness.py``): two query handlers (``query.kmeans``: federated k-means; ``query.fisher``: EWC's Fisher
sums), and train / evaluate messages that may carry an EWC Fisher, ARW adversary arrays, targeted cohort ids or
centroids. A message without them is a plain round. Under SecAgg+ the k-means statistics, per-cohort counts
and Fisher sums leave only inside a secure sum (a train message with ``protocol.SECURE_SUM``; the plain forms are
refused).
"""

from __future__ import annotations

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from client.data import DeviceData, node_data
from client.evaluate import evaluate_local
from client.fairness import (
    cohort_eval_record,
    embedder_location,
    fisher_reply,
    idle_train_reply,
    kmeans_reply,
    local_fairness,
    remember_evaluation,
    secure_sum_reply,
)
from client.secagg import SecureAggregationRequired, secure_aggregation_mod
from client.train import fine_tune, training_loss
from shared.config import RunConfig
from shared.fairness import protocol
from shared.privacy.audit import audit_mod
from shared.records import array_record, config_record, scalar

# Mods wrap handlers when they are registered: audit_mod must be here, not added to `app` later.
app = ClientApp(mods=[audit_mod])


def central_dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """``strategy.central-dp = "client"``: Flower's ``fixedclipping_mod`` clips this device's model change to the
    norm the server's DP wrapper sent, before it leaves (under SecAgg+, before it is masked). Train only: an
    evaluate instruction carries no clipping norm, and a fairness phase's secure sum is no model update."""
    if RunConfig.from_flat(context.run_config).strategy.central_dp == "client" and protocol.SECURE_SUM not in msg.content:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def _setup(msg: Message, context: Context) -> tuple[RunConfig, dict[str, torch.Tensor], DeviceData, int, int]:
    # One core per simulated device: Ray runs one device per core; more threads would oversubscribe.
    torch.set_num_threads(1)
    cfg = RunConfig.from_flat(context.run_config)
    state = array_record(msg.content, "arrays").to_torch_state_dict()
    # Simulation: node_config has partition-id; deployment (`chorus device join`): data-dir + artifacts-dir.
    data = node_data(cfg, context.node_config)
    seed_id = int(context.node_config.get("partition-id", context.node_id % 1_000_003))  # seeds this device's steps
    return cfg, state, data, seed_id, int(scalar(config_record(msg.content, "config"), "server-round"))


def _unmasked(cfg: RunConfig, what: str) -> None:
    """A device whose run asks for SecAgg+ sends fairness vectors only inside a secure sum."""
    if cfg.strategy.secure_aggregation:
        raise SecureAggregationRequired(
            f"strategy.secure-aggregation is on, but the server asked for {what} in "
            f"plain: it would name this device's cohort, so the device refuses"
        )


# Order, outermost first: audit_mod (app-wide) sees what leaves; SecAgg+ masks the clipped update; clipping sees
# the handler's plain update.
@app.train(mods=[secure_aggregation_mod, central_dp_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    if protocol.SECURE_SUM in msg.content:  # a fairness phase's sum under SecAgg+: no training
        torch.set_num_threads(1)
        cfg = RunConfig.from_flat(context.run_config)
        return Message(
            secure_sum_reply(
                cfg, msg.content, context.state, node_data(cfg, context.node_config), embedder_location(cfg, context.node_config)
            ),
            reply_to=msg,
        )
    cfg, state, data, seed_id, server_round = _setup(msg, context)
    # EWC / ARW / targeted round, as the message asks (nothing extra: plain fine-tuning of `state`).
    local = local_fairness(
        msg.content,
        context.state,
        data,
        embedder_location(cfg, context.node_config),
        global_state=state,
        local_steps=cfg.train.local_steps,
    )
    if not local.takes_part:  # a targeted round for other cohorts: decided here, the cohort id never leaves
        return Message(idle_train_reply(msg.content, skipped=len(data.features.skipped)), reply_to=msg)
    # DP-SGD keeps its accountant in context.state, which persists on the device across rounds. A device whose
    # privacy budget is spent raises PrivacyBudgetExhausted: audit_mod answers with an error naming that type.
    ledger = {"device_state": context.state} if cfg.dp.enabled else {}
    update = fine_tune(
        cfg,
        local.model_state,
        data,
        server_round=server_round,
        partition_id=seed_id,
        penalty=local.penalty,
        reweighter=local.reweighter,
        **ledger,
    )
    return Message(
        RecordDict(
            {
                "arrays": local.reply_arrays(update.state_dict),
                "metrics": MetricRecord({**update.metrics(), **local.reply_metrics(update.num_examples)}),
            }
        ),
        reply_to=msg,
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, state, data, _, server_round = _setup(msg, context)
    counts = evaluate_local(cfg, state, data)
    remember_evaluation(context.state, server_round, counts)  # stays here: for a secure per-cohort sum
    metrics = MetricRecord(
        {
            "word-errors": counts.errors,
            "words": counts.words,
            "num-examples": counts.utterances,
            "wer": counts.wer if counts.words else 0.0,
        }
    )
    reply = RecordDict({"metrics": metrics})
    if protocol.CENTROIDS in msg.content:  # disaggregated evaluation: dense per-cohort counts
        _unmasked(cfg, "per-cohort evaluation counts")
        reply[protocol.COHORT_EVAL] = cohort_eval_record(
            msg.content, context.state, data, embedder_location(cfg, context.node_config), counts
        )
    return Message(reply, reply_to=msg)


@app.query("kmeans")
def kmeans(msg: Message, context: Context) -> Message:
    """One federated Lloyd iteration: dense per-cluster sums and counts of this device's speaker embedding."""
    torch.set_num_threads(1)
    cfg = RunConfig.from_flat(context.run_config)
    _unmasked(cfg, "k-means statistics")
    data = node_data(cfg, context.node_config)
    return Message(kmeans_reply(msg.content, context.state, data, embedder_location(cfg, context.node_config)), reply_to=msg)


@app.query("fisher")
def fisher(msg: Message, context: Context) -> Message:
    """EWC: summed squared gradients of the global model on this device's training utterances."""
    cfg, state, data, _, _ = _setup(msg, context)
    _unmasked(cfg, "Fisher sums")
    return Message(fisher_reply(cfg, state, data), reply_to=msg)


@app.query("loss")
def loss(msg: Message, context: Context) -> Message:
    """Power-of-Choice selection: the global model's loss on this device's training utterances (one scalar, like a
    train reply's ``train-loss``). Refused under DP-SGD, whose guarantee does not cover it."""
    cfg, state, data, _, _ = _setup(msg, context)
    if cfg.dp.enabled:
        raise ValueError("dp.enabled: the training loss lies outside DP-SGD's guarantee, so this device does not send it")
    value, utterances = training_loss(cfg, state, data)
    return Message(RecordDict({"metrics": MetricRecord({"train-loss": value, "num-examples": utterances})}), reply_to=msg)
