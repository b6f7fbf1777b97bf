"""The train phase of a round through SecAgg+: the server learns the weighted sum of the updates, not one of them.

Why this module speaks Flower's legacy API: in Flower 1.42 SecAgg+ exists only as ``SecAggPlusWorkflow``
(``flwr.server.workflow``), written for the legacy ``LegacyContext`` + ``flwr.server.strategy.Strategy``
(``configure_fit`` / ``aggregate_fit`` with ``FitIns`` / ``FitRes``), while our rounds run the Message-API strategies
of ``flwr.serverapp.strategy``. Everything legacy stays here, behind one function, :func:`secure_train_round`:

    1. the run's own (Message-API) strategy samples the devices and builds their train instructions
       (``configure_train``; central-DP wrappers add their clipping norm there);
    2. ``SecAggPlusWorkflow`` runs its four stages with those devices: setup (public keys), share keys (encrypted
       Shamir shares, relayed by the server), collect masked vectors (the device trains, then uploads its
       quantized, weighted and masked update), unmask (shares of the survivors' seeds and of the dropped devices'
       keys): the masks cancel in the sum, and only the weighted mean of the updates comes out;
    3. the strategy's own ``aggregate_train`` runs on replies that each carry that mean (and the weighted mean of
       each metric, which rode in the masked vector too: ``shared/privacy/secure_reply.py``): FedAvg of identical
       arrays is the mean itself; FedAvgM / FedAdam / FedYogi / FedAdagrad
       take their server step from it; the client-side central-DP wrapper adds its noise to it. Strategies that
       need each update (FedMedian, FedTrimmedAvg, server-side clipping) are refused by the config.

A small subclass of the workflow (``_MessageApiSecAggPlus``) sends our Message-API train instruction (arrays keyed
by parameter name, the strategy's config) in the masked-vector stage instead of a legacy ``FitIns``, so the
device-side handler is the usual one; the device answers in the legacy ``FitRes`` layout that
``secaggplus_mod`` and this workflow parse (``client/secagg.py``).

Quantization: SecAgg+ adds integers modulo 2^32. Each device multiplies its parameters by its weight
``num-examples / secagg.max-weight``, clips them to +-``secagg.clipping-range`` and rounds them stochastically to
``secagg.quantization-range`` levels, so the securely aggregated mean differs from the float FedAvg of the same
updates by at most ``quantization_step(cfg) x devices / (sum of the weights)`` per parameter (unbiased).

The fairness phases (``server/fairness.py``) use the same protocol for sums that are not model updates
(:func:`secure_sum`): the k-means statistics of cohort discovery and the per-cohort evaluation counts. Each device
answers with weight 1, so the weighted mean times the number of contributors is the sum.

What the server still learns per device under SecAgg+: that it took part, when it answered each stage, its
public keys and the encrypted shares it relays. Its update, its weight and its metrics stay masked: the server
reads the weighted mean of each metric (a metric slot, ``shared/privacy/secure_reply.py``), never one device's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, MetricRecordValues, RecordDict
from flwr.common import FitIns, FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy

from shared.config import SecAggConfig
from shared.privacy.secure_reply import METRIC_SLOT, PLAIN_WEIGHT, slot_metric

if TYPE_CHECKING:
    from server.fairness import FairStrategy  # which imports this module

__all__ = ["SecureRound", "SecureSum", "quantization_step", "secure_sum", "secure_train_round"]

log = logging.getLogger("chorus.server")


@dataclass(frozen=True)
class SecureRound:
    """One secure train phase: the strategy's aggregate (None if too few devices completed the protocol)."""

    arrays: ArrayRecord | None
    metrics: MetricRecord | None
    contributed: int  # devices whose masked update is in the sum
    failed: int  # sampled devices that are not (error, dropout, or the protocol halted)


def quantization_step(cfg: SecAggConfig) -> float:
    """The width of one quantization level of a weighted parameter (before the division by the weights)."""
    return 2.0 * cfg.clipping_range / cfg.quantization_range


class _Relay(LegacyStrategy):
    """The legacy strategy the workflow drives: it relays the Message-API strategy's sampling and keeps the
    securely aggregated result; the real aggregation happens afterwards in the Message-API strategy."""

    def __init__(self, sampled: list[int], grid: Grid, run_id: int) -> None:
        super().__init__()
        self.proxies = [GridClientProxy(node, grid, run_id) for node in sampled]
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.aggregated = False

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: object
    ) -> list[tuple[ClientProxy, FitIns]]:
        # The real instructions replace these in _MessageApiSecAggPlus.setup_stage: nothing to serialize here.
        empty = FitIns(Parameters(tensors=[], tensor_type=""), {})
        return [(proxy, empty) for proxy in self.proxies]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        # Every FitRes carries the unmasked weighted mean by now (the workflow put it there).
        self.results, self.aggregated = list(results), True
        return None, {}

    def initialize_parameters(self, client_manager: object) -> Parameters | None:
        return None

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: object) -> list:
        return []  # evaluation runs in the Message-API loop (server/workflow.py)

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


class _MessageApiSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, sending our Message-API train instructions in the masked-vector stage, and
    recovering from devices that drop out before sharing their keys or next to another dropped device."""

    def __init__(self, instructions: dict[int, RecordDict], cfg: SecAggConfig, *, timeout: float) -> None:
        super().__init__(
            num_shares=cfg.num_shares,
            reconstruction_threshold=cfg.reconstruction_threshold,
            max_weight=cfg.max_weight,
            clipping_range=cfg.clipping_range,
            quantization_range=cfg.quantization_range,
            timeout=timeout,
        )
        self._instructions = instructions

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        proceed = super().setup_stage(grid, context, state)
        # One RecordDict per device: the next stage adds that device's own key shares to it in place (the
        # strategy's messages share one RecordDict), next to the arrays (keyed by parameter name) and config.
        state.nid_to_fitins = {node: RecordDict(dict(self._instructions[node].items())) for node in state.nid_to_fitins}
        return proceed

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        proceed = super().share_keys_stage(grid, context, state)
        # Flower 1.42 counts a device that never shared its keys (it dropped out in setup or here) as "dead" in
        # the unmask stage, where its neighbours hold no share of its key: the device-side mod fails with a
        # KeyError and the round halts. No one masked anything with such a device, so from here on the sampled
        # devices and their neighbourhoods are the devices that shared their keys.
        state.sampled_node_ids = set(state.active_node_ids)
        state.nid_to_neighbours = {
            node: neighbours & state.active_node_ids
            for node, neighbours in state.nid_to_neighbours.items()
            if node in state.active_node_ids
        }
        return proceed

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        # Flower removes a dropped device's pairwise mask with each of its neighbours, but only neighbours whose
        # masked vectors are in the sum added one: two dropped neighbours would corrupt the sum otherwise.
        for node in state.sampled_node_ids - state.active_node_ids:
            state.nid_to_neighbours[node] = (state.nid_to_neighbours[node] & state.active_node_ids) | {node}
        return super().unmask_stage(grid, context, state)


def _mean_record(results: list[tuple[ClientProxy, FitRes]], sent: ArrayRecord) -> ArrayRecord:
    """The unmasked mean (a legacy Parameters list, in the order the devices sent their arrays: the global
    model's) as an ArrayRecord with the global model's names and dtypes."""
    arrays = parameters_to_ndarrays(results[0][1].parameters)
    if len(arrays) != len(sent):
        raise ValueError(f"SecAgg+ returned {len(arrays)} arrays, the global model has {len(sent)}")
    out = {}
    for (key, reference), value in zip(sent.items(), arrays, strict=True):
        if tuple(value.shape) != tuple(reference.shape):
            raise ValueError(
                f"SecAgg+ aggregate {key!r} has shape {tuple(value.shape)}, the global model's is {tuple(reference.shape)}"
            )
        out[key] = Array(np.asarray(value, dtype=reference.numpy().dtype))
    return ArrayRecord(out)


def _split_slots(mean: ArrayRecord) -> tuple[ArrayRecord, MetricRecord]:
    """The unmasked mean -> (the model's arrays, a reply's metrics: each slot's weighted mean, weight 1)."""
    arrays = ArrayRecord({k: v for k, v in mean.items() if not k.startswith(METRIC_SLOT)})
    metrics: dict[str, MetricRecordValues] = {
        k[len(METRIC_SLOT) :]: slot_metric(k[len(METRIC_SLOT) :], float(v.numpy()[0]))
        for k, v in mean.items()
        if k.startswith(METRIC_SLOT)
    }
    metrics["num-examples"] = PLAIN_WEIGHT
    return arrays, MetricRecord(metrics)


def _run_protocol(
    grid: Grid, instructions: dict[int, RecordDict], arrays: ArrayRecord, server_round: int, cfg: SecAggConfig, *, timeout: float
) -> list[tuple[ClientProxy, FitRes]] | None:
    """The four SecAgg+ stages with the devices of ``instructions`` (node id -> what its handler receives in the
    masked-vector stage); the results of the devices whose masked vectors are in the sum (each carrying the
    unmasked weighted mean), or None when the protocol halted."""
    relay = _Relay(sorted(instructions), grid, run_id=0)
    # The workflow keeps its round and global model in the LegacyContext's state: a scratch one per round.
    scratch = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(scratch, strategy=relay)
    context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    context.state[MAIN_PARAMS_RECORD] = arrays
    workflow = _MessageApiSecAggPlus(instructions, cfg, timeout=timeout)
    with np.errstate(divide="ignore", invalid="ignore"):  # a summed weight of 0: the caller checks the mean
        workflow(grid, context)
    return relay.results if relay.aggregated and relay.results else None


def secure_train_round(
    grid: Grid,
    strategy: flwr_strategy.Strategy | FairStrategy,
    server_round: int,
    arrays: ArrayRecord,
    cfg: SecAggConfig,
    *,
    timeout: float,
    min_contributors: int,
    metric_keys: Sequence[str] = (),
) -> SecureRound:
    """Run the train phase of ``server_round`` through SecAgg+ and aggregate with ``strategy``.

    ``metric_keys``: the train metrics to ask for (``secure_reply.train_metrics``), as masked slots; the strategy
    aggregates replies that carry their weighted means. ``timeout`` bounds each of the four stages. Devices that
    fail or drop out in any stage are left out; the round completes while every sampled device keeps at least the
    reconstruction threshold of its neighbours, else the workflow halts and nothing is aggregated. With fewer than
    ``min_contributors`` updates in the sum, or none with a weight above 0, the strategy does not step either (its
    state stays as it was) and the global model is kept.
    """
    messages: list[Message] = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    sampled = [m.metadata.dst_node_id for m in messages]
    if len(sampled) < 2:  # SecAgg+ needs two devices at least; fewer would reveal the one update
        log.warning("round %d: %d device(s) sampled: SecAgg+ needs at least 2, nothing aggregated", server_round, len(sampled))
        return SecureRound(None, None, 0, len(sampled))
    # What the strategy sends (the model; with ARW, the adversary too), then the metric slots, zero: what the
    # device fills in, and what the audit and the unmasked mean are read against.
    sent = messages[0].content["arrays"]
    if not isinstance(sent, ArrayRecord) or any(m.content["arrays"] is not sent for m in messages):
        raise ValueError(f"round {server_round}: SecAgg+ needs one ArrayRecord 'arrays' sent to every device")
    slotted = ArrayRecord({**dict(sent.items()), **{METRIC_SLOT + k: Array(np.zeros(1)) for k in metric_keys}})
    instructions = {m.metadata.dst_node_id: RecordDict({**dict(m.content.items()), "arrays": slotted}) for m in messages}
    results = _run_protocol(grid, instructions, slotted, server_round, cfg, timeout=timeout)
    if results is None:
        log.warning("round %d: SecAgg+ halted (too few devices completed a stage): nothing aggregated", server_round)
        return SecureRound(None, None, 0, len(sampled))
    contributed = len(results)
    if contributed < min_contributors:
        log.warning(
            "round %d: %d device(s) answered, fewer than strategy.min-train-nodes=%d: the global model is kept",
            server_round,
            contributed,
            min_contributors,
        )
        return SecureRound(None, None, contributed, len(sampled) - contributed)
    mean, reply_metrics = _split_slots(_mean_record(results, slotted))
    if not all(np.isfinite(v.numpy()).all() for v in mean.values()):
        # The summed weight is 0: e.g. a targeted round in which no device of the targeted cohorts took part.
        log.warning("round %d: no masked update carries weight (no device trained): the global model is kept", server_round)
        return SecureRound(None, None, contributed, len(sampled) - contributed)
    by_node = {m.metadata.dst_node_id: m for m in messages}
    replies: Iterable[Message] = [
        Message(RecordDict({"arrays": mean, "metrics": reply_metrics}), reply_to=by_node[proxy.node_id]) for proxy, _ in results
    ]
    new_arrays, metrics = strategy.aggregate_train(server_round, replies)
    log.info("round %d: SecAgg+ aggregated %d of %d sampled devices", server_round, contributed, len(sampled))
    return SecureRound(new_arrays, metrics, contributed, len(sampled) - contributed)


@dataclass(frozen=True)
class SecureSum:
    """One secure sum: the total of the devices' arrays (None if the protocol halted), and who is in it."""

    sums: dict[str, np.ndarray] | None
    contributed: int
    failed: int


def secure_sum(
    grid: Grid, nodes: Sequence[int], content: RecordDict, cfg: SecAggConfig, *, timeout: float, phase: str
) -> SecureSum:
    """The sum over ``nodes`` of the arrays each device computes for ``content``: the server learns the total,
    not one device's part (the fairness phases' k-means statistics and per-cohort counts).

    ``content["arrays"]`` holds zeros with the names, shapes and dtypes of the sum (what the device's reply and
    the audit are checked against). Each device answers with weight 1 (``num-examples``), so SecAgg+'s weighted
    mean times the number of contributors is the sum; each summand is quantized with step
    ``quantization_step(cfg) x max-weight`` and must lie within +-``cfg.sum_bound``.
    """
    arrays = content.get("arrays")
    if not isinstance(arrays, ArrayRecord):
        raise ValueError(f"{phase}: a secure sum needs 'arrays' (zeros shaped like the sum)")
    if len(nodes) < 2:
        log.warning("%s: %d device(s): SecAgg+ needs at least 2, nothing summed", phase, len(nodes))
        return SecureSum(None, 0, len(nodes))
    # One RecordDict per device: the protocol adds each device's own records to it in place.
    results = _run_protocol(grid, {node: RecordDict(dict(content.items())) for node in nodes}, arrays, 0, cfg, timeout=timeout)
    if results is None:
        log.warning("%s: SecAgg+ halted (too few devices completed a stage): nothing summed", phase)
        return SecureSum(None, 0, len(nodes))
    mean = _mean_record(results, arrays)
    sums = {key: value.numpy() * len(results) for key, value in mean.items()}
    log.info("%s: SecAgg+ summed %d of %d devices", phase, len(results), len(nodes))
    return SecureSum(sums, len(results), len(nodes) - len(results))
