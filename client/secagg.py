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
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from shared.config import RunConfig
from shared.records import scalar

__all__ = ["SecureAggregationRequired", "is_secagg_message", "secure_aggregation_mod"]


class SecureAggregationRequired(RuntimeError):
    """The run config asks for SecAgg+, but the server sent a plain train instruction."""


def is_secagg_message(msg: Message) -> bool:
    """Whether ``msg`` is a stage of the SecAgg+ protocol (it carries the protocol's config record)."""
    return msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records


def _train_as_fitres(call_next: ClientAppCallable) -> ClientAppCallable:
    """Our train handler (arrays + config in, arrays + metrics out) as ``secaggplus_mod`` calls it: it sees the
    instruction without the protocol's record, and its reply goes back in the ``FitRes`` layout."""

    def train(msg: Message, context: Context) -> Message:
        received = msg.content
        msg.content = RecordDict({name: record for name, record in received.items() if name != RECORD_KEY_CONFIGS})
        try:
            reply = call_next(msg, context)
        finally:
            msg.content = received
        if reply.has_error():
            return reply
        arrays, metrics = reply.content["arrays"], reply.content["metrics"]
        if not isinstance(arrays, ArrayRecord) or not isinstance(metrics, MetricRecord):
            raise TypeError("the train handler's reply must carry ArrayRecord 'arrays' and MetricRecord 'metrics'")
        return Message(
            RecordDict(
                {
                    "fitres.parameters": arrays,  # masked by secaggplus_mod, then emptied: this never leaves
                    "fitres.num_examples": MetricRecord({"num_examples": int(scalar(metrics, "num-examples"))}),
                    "fitres.metrics": ConfigRecord(dict(metrics)),
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
        return secaggplus_mod(msg, context, _train_as_fitres(call_next))
    if RunConfig.from_flat(context.run_config).strategy.secure_aggregation:
        raise SecureAggregationRequired(
            "strategy.secure-aggregation is on, but the server sent a plain train "
            "instruction: the update would leave unmasked, so the device refuses"
        )
    return call_next(msg, context)
