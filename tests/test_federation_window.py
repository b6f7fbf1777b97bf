"""``strategy.max-in-flight``: a phase's messages go out through a window, against Flower's real in-memory
LinkState and InMemoryGrid (what the simulation engine runs on), with devices answering from a thread the way
the engine's workers do (``flwr/server/superlink/fleet/vce/vce_api.py``)."""

from __future__ import annotations

import threading
import time
from uuid import uuid4

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server.exchange import _send_and_receive, exchange
from shared.config import StrategyConfig
from simulations.bench_federation import in_memory_federation

RUN_ID, TASK_ID, SUPERLINK_NODE = 1, 7, 1


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # What flwr-simulation sets for its ServerApp; every new instruction Message records it.
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE)
    monkeypatch.setattr(TaskIdentity, "_task_id", TASK_ID)


class Federation:
    """``nodes`` simulated devices registered in an in-memory LinkState, as ``flwr-simulation`` sets it up
    (``run_simulation._main_loop`` and ``vce_api._register_nodes``), and a thread that plays the devices:
    it polls the LinkState for each node's next message every 10 ms, answers after ``work_s`` (devices in
    ``silent`` never answer) and records the most messages it ever saw waiting in the store."""

    def __init__(self, nodes: int, *, work_s: float = 0.01, silent: frozenset[int] = frozenset()) -> None:
        self.state, self.grid, self.node_ids = in_memory_federation(nodes)
        self.silent = {self.node_ids[i] for i in silent}
        self.work_s = work_s
        self.most_waiting = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._devices, daemon=True)

    def _devices(self) -> None:
        while not self._stop.is_set():
            self.most_waiting = max(self.most_waiting, len(self.state.message_ins_store))
            for node_id in self.node_ids:
                for msg in self.state.get_message_ins(node_id=node_id, limit=1):
                    if node_id in self.silent:
                        continue
                    time.sleep(self.work_s)
                    reply = Message(RecordDict({"metrics": MetricRecord({"num-examples": node_id % 1000})}), reply_to=msg)
                    reply.metadata.__dict__["_message_id"] = str(uuid4())  # as the engine's worker does
                    self.state.store_message_res(reply)
            self._stop.wait(0.01)

    def messages(self, count: int) -> list[Message]:
        return [
            Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node_id, message_type="query.window")
            for node_id in self.node_ids[:count]
        ]

    def __enter__(self) -> Federation:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def test_window_sends_every_message_and_never_more_than_the_window_at_once() -> None:
    with Federation(30) as fed:
        msgs = fed.messages(12)
        replies = _send_and_receive(fed.grid, msgs, timeout=60.0, max_in_flight=3)
    assert sorted(m.metadata.src_node_id for m in replies) == sorted(fed.node_ids[:12])
    assert not any(m.has_error() for m in replies)
    assert 1 <= fed.most_waiting <= 3
    assert not fed.state.message_ins_store  # every answered instruction was pulled and deleted


def test_without_a_window_everything_waits_at_once() -> None:
    with Federation(30, work_s=0.05) as fed:
        replies = _send_and_receive(fed.grid, fed.messages(12), timeout=60.0, max_in_flight=0)
    assert len(replies) == 12 and fed.most_waiting > 3


def test_a_silent_device_holds_a_slot_until_the_phase_deadline_and_is_counted() -> None:
    with Federation(10, silent=frozenset({0})) as fed:
        msgs = fed.messages(6)
        start = time.monotonic()
        replies = exchange(fed.grid, msgs, phase="window", strategy=StrategyConfig(timeout=2.0, max_in_flight=2))
        elapsed = time.monotonic() - start
    assert (len(replies.ok), replies.failed, replies.rejected) == (5, 1, 0)  # the others used the remaining slot
    assert 2.0 <= elapsed < 10.0
