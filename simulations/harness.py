"""The one in-process federation harness: Flower's Grid over ClientApp calls in this process.

Evaluations (``chorus eval fairness``, ``chorus eval privacy``) and tests play the server in this process and
need devices that answer at once, deterministically and without Ray. :class:`InProcessGrid` is that Grid: each
device is a call of a ClientApp (ours, or one a test builds) with its own persistent ``Context`` (its ``state``
lives as long as the grid, as a SuperNode keeps it for a run). Messages are delivered in node order, so sums
over replies are exactly reproducible. Everything else (strategies, ``server/exchange.py``, the privacy audit
mod) is the code that runs in a real federation.

Flower stamps every new instruction Message with the run of the process it runs in; :func:`server_identity`
sets that identity for a process that plays the server.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

from flwr.app import Context, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["InProcessGrid", "server_identity", "wire"]

ClientAppCall = Callable[[Message, Context], Message]


def wire(msg: Message) -> Message:
    """``msg`` as the other side receives it: serialized and parsed. (Flower's strategies send several devices one
    RecordDict, which a device's mods may change in place; on the wire each device gets its own copy.)"""
    return message_from_proto(message_to_proto(msg))


class InProcessGrid(Grid):
    """A Grid whose devices (node ids 1..N, ``partition-id`` N - 1) are calls of ``app`` in this process.

    ``send_and_receive`` delivers at once; ``push_messages`` delivers too and keeps the replies for
    ``pull_messages`` (the path the server's ``strategy.max-in-flight`` window takes).

    Args:
        app: the devices' ClientApp (or any callable with its signature).
        devices: how many devices, or {node id: its initial ``context.state``}.
        run_config: every device's ``context.run_config``.
        on_wire: serialize messages and replies both ways, as a real link does.

    Attributes:
        exchanges: every (message as sent, reply as it left the device) so far, in delivery order.
        seconds: wall time of each device call.
    """

    def __init__(
        self,
        app: ClientAppCall,
        devices: int | Mapping[int, RecordDict],
        run_config: Mapping[str, bool | int | float | str],
        *,
        on_wire: bool = False,
    ) -> None:
        states = {node: RecordDict() for node in range(1, devices + 1)} if isinstance(devices, int) else devices
        self.app = app
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                state=state,
                run_config=dict(run_config),
                node_config={"partition-id": node - 1, "num-partitions": len(states)},
            )
            for node, state in states.items()
        }
        self.on_wire = on_wire
        self.exchanges: list[tuple[Message, Message]] = []
        self.seconds: list[float] = []
        self._pending: dict[str, Message] = {}  # push_messages' replies by the message they answer
        self._run = Run.create_empty(run_id=1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver now (devices answer in this process); the replies wait for ``pull_messages``."""
        pushed = {m.metadata.dst_node_id: (m.object_id, m) for m in messages}  # Flower's id: the object id
        for reply in self.send_and_receive([m for _, m in pushed.values()]):
            self._pending[pushed[reply.metadata.src_node_id][0]] = reply
        return [message_id for message_id, _ in pushed.values()]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._pending.pop(i) for i in message_ids if i in self._pending]

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def answers(self, msg: Message) -> bool:
        """Whether the device ``msg`` goes to answers it (all do; a subclass can make devices drop out)."""
        return True

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            if not self.answers(msg):
                continue
            sent = wire(msg) if self.on_wire else msg  # as sent: the device's mods may consume its own copy
            start = time.perf_counter()
            reply = self.app(wire(msg) if self.on_wire else msg, self.contexts[msg.metadata.dst_node_id])
            self.seconds.append(time.perf_counter() - start)
            reply = wire(reply) if self.on_wire else reply
            self.exchanges.append((sent, reply))
            replies.append(wire(reply) if self.on_wire else reply)  # its own copy: strategies may change it
        return replies


@contextlib.contextmanager
def server_identity(run_id: int = 1, node_id: int = 0, task_id: int = 1) -> Iterator[None]:
    """Play the server in this process: Flower's task identity set for the block, the previous one restored."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
