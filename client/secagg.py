"""The device side of SecAgg+ (``strategy.secure-aggregation``; the server side is ``server/secagg.py``).

Flower's ``secaggplus_mod`` runs the protocol on the device: key pairs (setup), encrypted Shamir shares of its
mask seed and key for its neighbours (share keys), its update quantized, weighted and masked (collect masked
vectors), and shares for unmasking (unmask). Only the third stage trains: the mod calls our train handler and
reads its reply in the legacy ``FitRes`` layout (``fitres.parameters`` / ``fitres.num_examples`` /
``fitres.metrics`` / ``fitres.status``), which is Flower's legacy API: that translation lives here, once.

:func:`secure_aggregation_mod` is a train-handler mod (``client/client_app.py``), inside ``audit_mod``, which
therefore audits the protocol's replies as they leave (``shared/privacy/secagg_audit.py``), not our handler's
plain update (the mod empties ``fitres.parameters`` before the reply leaves). A device whose run config asks for
secure aggregation refuses a plain train instruction: its update would reach the server unmasked.

The reply's weight and metrics ride inside the masked vector too (``shared/privacy/secure_reply.py``): the
handler never sees the metric slots the server appended to the arrays, the device fills them in from its reply's
metrics, and the plain ``num_examples`` the mod leaves in the reply is replaced by the same value on every device.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from shared.config import RunConfig
from shared.fairness.protocol import SECURE_SUM
from shared.privacy.secure_reply import METRIC_SLOT, PLAIN_WEIGHT, secure_weight, slot_value

__all__ = ["SecureAggregationRequired", "is_secagg_message", "secure_aggregation_mod"]


class SecureAggregationRequired(RuntimeError):
    """The run config asks for SecAgg+, but the server sent a plain train instruction."""


def is_secagg_message(msg: Message) -> bool:
    """Whether ``msg`` is a stage of the SecAgg+ protocol (it carries the protocol's config record)."""
    return msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records


def _train_as_fitres(call_next: ClientAppCallable, cfg: RunConfig) -> ClientAppCallable:
    """Our train handler (arrays + config in, arrays + metrics out) as ``secaggplus_mod`` calls it: it sees the
    instruction without the protocol's record and without the metric slots, and its reply goes back in the
    ``FitRes`` layout: the arrays with the slots filled in, weighed by :func:`secure_weight`, and no plain metric."""

    def train(msg: Message, context: Context) -> Message:
        received = msg.content
        sent = received["arrays"]
        if not isinstance(sent, ArrayRecord):
            raise TypeError("a SecAgg+ train instruction must carry an ArrayRecord 'arrays'")
        slots = [k for k in sent if k.startswith(METRIC_SLOT)]
        unslotted = ArrayRecord({k: v for k, v in sent.items() if k not in slots})
        msg.content = RecordDict(
            {name: unslotted if name == "arrays" else record for name, record in received.items() if name != RECORD_KEY_CONFIGS}
        )
        try:
            reply = call_next(msg, context)
        finally:
            msg.content = received
        if reply.has_error():
            return reply
        arrays, metrics = reply.content["arrays"], reply.content["metrics"]
        if not isinstance(arrays, ArrayRecord) or not isinstance(metrics, MetricRecord):
            raise TypeError("the train handler's reply must carry ArrayRecord 'arrays' and MetricRecord 'metrics'")
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        # A fairness phase's secure sum weighs every device 1 (its own contract); a training round as it trained.
        weight = 1.0 if SECURE_SUM in received else secure_weight(numbers, cfg)
        for slot in slots:  # after the model's arrays, in the order sent: the unmasked mean is read in that order
            arrays[slot] = Array(np.array([slot_value(numbers, slot[len(METRIC_SLOT) :], weight, cfg)]))
        return Message(
            RecordDict(
                {
                    "fitres.parameters": arrays,  # masked by secaggplus_mod, then emptied: this never leaves
                    "fitres.num_examples": MetricRecord({"num_examples": weight}),  # masked; replaced below
                    "fitres.metrics": ConfigRecord(),
                    "fitres.status": ConfigRecord({"code": 0, "message": ""}),
                }
            ),
            reply_to=msg,
        )

    return train


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Train-handler mod: a SecAgg+ stage goes through Flower's ``secaggplus_mod``, a plain instruction straight
    to the handler (refused when this run's config asks for secure aggregation)."""
    if is_secagg_message(msg):
        reply = secaggplus_mod(msg, context, _train_as_fitres(call_next, RunConfig.from_flat(context.run_config)))
        if "fitres.num_examples" in reply.content:  # the mod left the weight it masked in plain beside the vector
            reply.content["fitres.num_examples"] = MetricRecord({"num_examples": PLAIN_WEIGHT})
        return reply
    if RunConfig.from_flat(context.run_config).strategy.secure_aggregation:
        raise SecureAggregationRequired(
            "strategy.secure-aggregation is on, but the server sent a plain train "
            "instruction: the update would leave unmasked, so the device refuses"
        )
    return call_next(msg, context)
