"""The server's one send/receive path: send a phase's messages through a window, and keep only valid replies.

Every phase (train, evaluate, the fairness queries) goes through :func:`exchange`, which

1. sends the messages with at most ``max_in_flight`` waiting for devices at once (:func:`_send_and_receive`);
2. sorts the replies: a device that replied with an error or not at all within the timeout *failed*
   (logged with its node id);
3. validates every reply with content against the message it answers (:func:`validate_reply`), because the
   server trusts no device: the privacy audit runs on the device, and a broken or malicious device skips it.
   A reply that fails is *rejected*: logged with the device's node id and the reason, counted, and never
   seen by a strategy.

What a valid reply is:
    * the device-side allowlist (``shared.privacy.audit.audit_reply``), checked again here: only allowlisted
      records and metrics; every ArrayRecord has exactly the keys, dtypes and shapes of what the server sent;
      metrics are finite scalars;
    * every array is finite (one NaN weight would make the global model NaN);
    * a train reply carries the model (``arrays``) and a whole-number aggregation weight ``num-examples`` in
      ``0 .. strategy.max-examples`` (FedAvg weighs each update by it: an unbounded claim is a takeover);
    * the norm of a train reply's update (reply minus the global model sent) is at most
      ``strategy.max-update-norm`` (0: no absolute bound) and at most ``strategy.update-norm-factor`` times
      the median update norm of the round's other valid replies (0: off). The median is robust while fewer than
      half the replies are attacks; it is the lower median, so with two replies the smaller one sets the bound.
    * evaluation counts (``word-errors``, ``words``, ``num-examples``) are non-negative whole numbers;
    * a loss-query reply (``query.loss``, Power-of-Choice selection) carries a non-negative ``train-loss``.

Under SecAgg+ (``strategy.secure-aggregation``) the server sees only the masked sum, so individual updates cannot
be checked here; that path (server/secagg.py) has its own protocol checks.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import TypeGuard

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid

from shared.config import StrategyConfig
from shared.fairness.protocol import LOSS_QUERY
from shared.privacy.audit import PrivacyViolation, audit_reply
from shared.records import array_record

__all__ = ["Exchange", "InvalidReply", "exchange", "update_norm", "validate_reply"]

log = logging.getLogger("chorus.server")

PULL_INTERVAL = 0.1  # seconds between looks for replies in a windowed phase (Flower's InMemoryGrid default)
_COUNTS = ("word-errors", "words", "num-examples")


class InvalidReply(ValueError):
    """A device reply the server refuses to use; the message is the reason (logged, never aggregated)."""


@dataclass(frozen=True)
class Exchange:
    """What came back from one phase: replies to use, and how many devices failed or were rejected."""

    ok: list[Message]
    failed: int  # replied with an error, or not at all within the timeout
    rejected: int  # replied, but with content the server refuses (see the module docstring)


def exchange(grid: Grid, messages: list[Message], *, phase: str, strategy: StrategyConfig) -> Exchange:
    """Send ``messages`` (one per device), wait, and return the valid replies; see the module docstring.

    ``strategy`` gives the phase's ``timeout``, the ``max_in_flight`` window and the bounds on replies."""
    sent = {m.metadata.dst_node_id: m for m in messages}
    replies = _send_and_receive(grid, messages, timeout=strategy.timeout, max_in_flight=strategy.max_in_flight)
    # The grid gave each message its id when it sent it. An error reply the SuperLink writes for a device (e.g.
    # "Node Unavailable" when the device stopped its heartbeats) comes from the SuperLink, not the device: match
    # replies to devices by the message they answer, so such a device counts as failed once, not also as silent.
    node_of = {m.metadata.message_id: node for node, m in sent.items() if m.metadata.message_id}

    def device(reply: Message) -> int:
        return node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    answered = {device(m) for m in replies}
    silent = sorted(node for node in sent if node not in answered)
    if silent:
        log.warning("%s: no reply within strategy.timeout from device(s) %s", phase, ", ".join(map(str, silent)))
    failed, candidates = len(silent), []
    for reply in replies:
        if reply.has_error():
            log.warning("%s: device %s failed: %s", phase, device(reply), reply.error.reason)
            failed += 1
            continue
        request = sent.get(reply.metadata.src_node_id)
        try:
            if request is None:
                raise InvalidReply("it answers no message of this phase")
            validate_reply(reply, request, strategy)
        except InvalidReply as reason:
            log.warning("%s: rejected the reply of device %s: %s", phase, reply.metadata.src_node_id, reason)
            continue
        candidates.append(reply)
    ok = _within_norm_bound(candidates, sent, strategy, phase=phase)
    return Exchange(ok=ok, failed=failed, rejected=len(replies) - failed + len(silent) - len(ok))


def validate_reply(reply: Message, request: Message, limits: StrategyConfig) -> None:
    """Raise :class:`InvalidReply` naming the first thing wrong with ``reply`` (the answer to ``request``)."""
    try:
        audit_reply(reply.content, request.content)
    except PrivacyViolation as violation:
        raise InvalidReply(f"outside the allowlist: {violation}") from None
    for name, record in reply.content.items():
        if isinstance(record, ArrayRecord):
            for key, array in record.items():
                if not np.isfinite(array.numpy()).all():
                    raise InvalidReply(f"array {name}/{key} is not finite")
    kind = request.metadata.message_type.split(".")[0]  # "train", "evaluate" or "query"
    metrics = reply.content.get("metrics")
    needs_metrics = kind in (MessageType.TRAIN, MessageType.EVALUATE) or request.metadata.message_type == LOSS_QUERY
    if needs_metrics and not isinstance(metrics, MetricRecord):
        raise InvalidReply(f"a {request.metadata.message_type} reply without its 'metrics' record")
    assert metrics is None or isinstance(metrics, MetricRecord)
    if metrics is None:  # a query reply without metrics
        return
    if kind == MessageType.TRAIN:
        if not isinstance(reply.content.get("arrays"), ArrayRecord):
            raise InvalidReply("a train reply without the model ('arrays')")
        examples = metrics.get("num-examples")
        if not _whole(examples) or not 0 <= float(examples) <= limits.max_examples:
            raise InvalidReply(
                f"num-examples={examples!r} is not a whole number in 0..{limits.max_examples} (strategy.max-examples)"
            )
    elif request.metadata.message_type == LOSS_QUERY:
        loss = metrics.get("train-loss")
        if not isinstance(loss, (int, float)) or isinstance(loss, bool) or not loss >= 0:
            raise InvalidReply(f"loss query: train-loss={loss!r} is not a non-negative number")
    elif kind == MessageType.EVALUATE:
        for key in _COUNTS:
            count = metrics.get(key)
            if not _whole(count) or float(count) < 0:
                raise InvalidReply(f"evaluation count {key}={count!r} is not a non-negative whole number")


def update_norm(reply: ArrayRecord, sent: ArrayRecord) -> float:
    """L2 norm of ``reply - sent`` over every array (float64)."""
    total = 0.0
    for key, array in reply.items():
        delta = array.numpy().astype(np.float64) - sent[key].numpy().astype(np.float64)
        total += float(np.dot(delta.ravel(), delta.ravel()))
    return math.sqrt(total)


def _whole(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and float(value) == int(value)


def _within_norm_bound(replies: list[Message], sent: dict[int, Message], limits: StrategyConfig, *, phase: str) -> list[Message]:
    """The train replies whose update norm is within the absolute and the median-relative bound."""
    trains = [r for r in replies if sent[r.metadata.src_node_id].metadata.message_type.split(".")[0] == MessageType.TRAIN]
    if not trains or (limits.max_update_norm <= 0 and limits.update_norm_factor <= 0):
        return replies
    norms = {
        id(r): update_norm(array_record(r.content, "arrays"), array_record(sent[r.metadata.src_node_id].content, "arrays"))
        for r in trains
    }
    moved = [n for n in norms.values() if n > 0]  # an idle device of a targeted round sends the model back
    relative = limits.update_norm_factor * statistics.median_low(moved) if moved else math.inf
    bound = min(limits.max_update_norm or math.inf, relative if limits.update_norm_factor > 0 else math.inf)
    kept = []
    for reply in replies:
        norm = norms.get(id(reply), 0.0)
        if norm > bound:
            log.warning(
                "%s: rejected the reply of device %s: update norm %.4g exceeds the bound %.4g "
                "(strategy.max-update-norm=%g, strategy.update-norm-factor=%g x median)",
                phase,
                reply.metadata.src_node_id,
                norm,
                bound,
                limits.max_update_norm,
                limits.update_norm_factor,
            )
            continue
        kept.append(reply)
    return kept


def _send_and_receive(grid: Grid, messages: list[Message], *, timeout: float, max_in_flight: int) -> list[Message]:
    """``grid.send_and_receive`` with at most ``max_in_flight`` messages waiting for devices at once (0: all).

    Why a window: Flower 1.42's simulation engine finds work by asking its in-memory LinkState, every 0.1 s,
    for each of the N nodes' next message, and each such query walks every message in the store; it runs in
    the process, and under the GIL, of the ServerApp, on the cores the devices train on. A sweep costs CPU in
    proportion to N x waiting messages (``chorus bench federation`` reports it). A window as wide as the
    devices that run at once, plus as many queued, keeps every device busy and sends the same messages, gets
    the same replies and aggregates them the same way. The phase as a whole gets ``timeout``, as with
    ``send_and_receive``; messages not yet sent when it passes count as devices that did not answer.
    """
    if max_in_flight == 0 or len(messages) <= max_in_flight:
        return list(grid.send_and_receive(messages, timeout=timeout))
    deadline = time.monotonic() + timeout
    queued = iter(messages)
    waiting: set[str] = set()
    replies: list[Message] = []
    while True:
        while len(waiting) < max_in_flight and (msg := next(queued, None)) is not None:
            waiting.update(grid.push_messages([msg]))
        if not waiting or time.monotonic() >= deadline:
            return replies
        pulled = list(grid.pull_messages(waiting))
        replies.extend(pulled)
        waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
        if not pulled:
            time.sleep(PULL_INTERVAL)
