"""Power-of-Choice device selection (Cho, Wang and Joshi, AISTATS 2022): each round, train the devices the global
model serves worst, without knowing who they are (``strategy.selection = "power-of-choice"``).

Uniform sampling gives a market the vendor never served one vote per device in the average, and the devices that
are already served well, two thirds of a population in ``chorus eval federation``, outvote it. Power-of-Choice
draws ``strategy.candidates`` devices uniformly (0: every connected device), asks each for the global model's loss
on its training utterances (``query.loss``: one scalar, what a train reply already carries as ``train-loss``), and
trains the ones with the highest loss, as many as the strategy's own uniform sampling would take. As those devices
improve, others overtake them, so no device is left out for good while it is served worse than the rest.

The strategy builds its train messages as always (config, DP clipping norm, fairness records unchanged); only their
addressees change. Aggregation weights stay the strategy's (FedAvg: the devices' example counts).

Trust: a device may claim a high loss to be chosen more often. Selection decides only who trains; every update
still passes the server's validation and norm bounds (``server/exchange.py``, which also checks each loss reply).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy

from server.exchange import exchange
from server.fairness import FairStrategy
from shared.config import StrategyConfig
from shared.fairness.protocol import LOSS_QUERY
from shared.records import metric_record, scalar

__all__ = ["PowerOfChoice", "ranked_by_loss"]


def ranked_by_loss(replies: Iterable[Message]) -> list[tuple[int, float]]:
    """(device, loss) of each loss-query reply, highest loss first (ties keep the replies' order)."""
    losses = [(m.metadata.src_node_id, float(scalar(metric_record(m.content, "metrics"), "train-loss"))) for m in replies]
    return sorted(losses, key=lambda pair: -pair[1])


class PowerOfChoice:
    """A strategy's four round methods (Flower's or :class:`FairStrategy`'s) with Power-of-Choice's choice of who
    trains; ``server/workflow.py`` calls them as it calls the strategy. ``seed`` (``train.seed``) and the round
    number seed the draw of candidates, so a resumed run draws the same ones."""

    def __init__(self, strategy: flwr_strategy.Strategy | FairStrategy, limits: StrategyConfig, *, seed: int) -> None:
        self.strategy, self.limits, self.seed = strategy, limits, seed
        self._notes: dict[int, dict[str, Any]] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if not messages:
            return messages
        nodes = sorted(grid.get_node_ids())
        count = min(len(nodes), max(self.limits.candidates or len(nodes), len(messages)))
        candidates = random.Random(self.seed * 1_000_003 + server_round).sample(nodes, count)
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
        queries = [Message(content=content, dst_node_id=node, message_type=LOSS_QUERY) for node in candidates]
        answered = exchange(grid, queries, phase=f"round {server_round} loss query", strategy=self.limits).ok
        ranked = ranked_by_loss(sorted(answered, key=lambda m: candidates.index(m.metadata.src_node_id)))
        chosen = [node for node, _ in ranked[: len(messages)]]
        # Too few answers: the rest go where the strategy's own sampling sent them.
        sampled = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in chosen]
        chosen += sampled[: len(messages) - len(chosen)]
        for message, node in zip(messages, chosen, strict=True):
            message.metadata.dst_node_id = node
        losses = [loss for _, loss in ranked]
        self._notes[server_round] = {
            "selection_candidates": count,
            "selection_answered": len(ranked),
            "selection_loss_mean": round(statistics.fmean(losses), 5) if losses else None,
            "selected_loss_mean": round(statistics.fmean(losses[: len(messages)]), 5) if losses else None,
        }
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        return list(self.strategy.configure_evaluate(server_round, arrays, config, grid))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def round_fields(self, server_round: int) -> dict[str, Any]:
        """The round record's selection fields: candidates asked, answers, their mean loss and the chosen ones'."""
        return self._notes.get(server_round, {})
