"""Which RabbitMQ the soak disrupts, and the broker-side faults it injects there.

``stop_app``/``start_app`` and a lowered ``consumer_timeout`` disconnect or disturb every
client of a broker, so they go to the 3-node cluster of ``../shared/rabbitmq-cluster``
when it answers (nodes ``jc1..jc3@localhost``, AMQP 5681-5683): there only ``jc1`` and
``jc2`` are ever stopped, and the soak's own connection (publisher, history reader) is on
``jc3``. Without the cluster (CI: the run is alone on the machine) they go to the
machine's broker on 5672. Closing connections only ever closes the soak's own replicas'
connections: those named ``jasper-consumer <prefix>`` whose peer port is one of the
soak's proxies.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass, field

import aio_pika

from tests.reliability.conftest import AMQP_URL, rabbitmqctl_table

from .schedule import LOWERED_TIMEOUT_MS

CLUSTER_NODES = (("jc1@localhost", 5681), ("jc2@localhost", 5682), ("jc3@localhost", 5683))
LOCAL_PORT = 5672
_CONNECTION_NAME = re.compile(r'\{"connection_name","([^"]*)"\}')


@dataclass
class Node:
    name: str | None  # the Erlang node for rabbitmqctl -n; None: the machine's broker
    port: int
    stopped: bool = False

    @property
    def label(self) -> str:
        return self.name or f"rabbit (127.0.0.1:{self.port})"


@dataclass
class Broker:
    """The broker the soak runs on: its nodes, those it may stop, the soak's own URL."""

    kind: str  # "cluster" or "local"
    nodes: list[Node]
    stoppable: list[int]  # indices into nodes
    own_url: str  # the soak's publisher and history reader: never stopped on a cluster
    saved_env: dict[str | None, dict[str, str]] = field(default_factory=dict)

    @property
    def query_node(self) -> str | None:
        """The node listings are asked on (one that is never stopped, where there is one)."""
        return self.nodes[-1].name


async def ctl(node: str | None, *args: str, timeout_s: float = 120) -> str:
    """``rabbitmqctl -q [-n node] args…``; its output, or RuntimeError with its stderr."""
    target = ["-n", node] if node else []
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", *target, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} timed out after {timeout_s} s") \
            from None
    if proc.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {err.decode(errors='replace')[-500:]}")
    return out.decode(errors="replace")


async def _answers(url: str) -> bool:
    try:
        connection = await aio_pika.connect(url, timeout=5)
    except Exception:
        return False
    await connection.close()
    return True


async def choose(want: str = "auto") -> Broker:
    """The cluster when it answers (or ``want == "cluster"``), else the machine's broker."""
    if want in ("auto", "cluster"):
        urls = [f"amqp://guest:guest@127.0.0.1:{port}/" for _, port in CLUSTER_NODES]
        answers = [await _answers(u) for u in urls]
        if all(answers):
            for name, _ in CLUSTER_NODES:
                await ctl(name, "await_startup", "--timeout", "60")
            return Broker("cluster", [Node(n, p) for n, p in CLUSTER_NODES], [0, 1], urls[-1])
        if want == "cluster":
            raise RuntimeError("the 3-node cluster does not answer on 5681-5683: start it "
                               "with ../shared/rabbitmq-cluster/up")
    if not await _answers(AMQP_URL):
        raise RuntimeError("RabbitMQ does not answer on 127.0.0.1:5672")
    return Broker("local", [Node(None, LOCAL_PORT)], [0], AMQP_URL)


async def queue_depths(broker: Broker, prefix: str) -> dict[str, int]:
    """Messages (ready + unacknowledged) of each of the soak's queues."""
    rows = await rabbitmqctl_table("list_queues", "name", "messages", node=broker.query_node)
    return {r["name"]: int(r["messages"]) for r in rows
            if r["name"].startswith(prefix + ".") and r["messages"].isdigit()}


async def close_connections(broker: Broker, prefix: str, peer_ports: set[int] | None,
                            reason: str = "chaos soak") -> int:
    """Close the soak's replicas' connections (only those on ``peer_ports`` if given);
    return how many were closed."""
    rows = await rabbitmqctl_table("list_connections", "pid", "peer_port", "client_properties",
                                   node=broker.query_node)
    closed = 0
    for row in rows:
        match = _CONNECTION_NAME.search(row["client_properties"])
        if not match or match.group(1) != f"jasper-consumer {prefix}":
            continue
        if peer_ports is not None and int(row["peer_port"]) not in peer_ports:
            continue
        with contextlib.suppress(RuntimeError):  # gone meanwhile
            await ctl(broker.query_node, "close_connection", row["pid"], reason)
            closed += 1
    return closed


_ENV_KEYS = ("consumer_timeout", "channel_tick_interval")


async def save_env(broker: Broker) -> None:
    """Read each node's consumer timeout settings once, before any fault touches them."""
    for node in broker.nodes:
        values: dict[str, str] = {}
        for key in _ENV_KEYS:
            out = (await ctl(node.name, "eval", f"application:get_env(rabbit, {key}).")).strip()
            values[key] = out
        broker.saved_env[node.name] = values
        if values["consumer_timeout"] == f"{{ok,{LOWERED_TIMEOUT_MS}}}":
            raise RuntimeError(
                f"{node.label} has consumer_timeout {LOWERED_TIMEOUT_MS} ms, the soak's own "
                "lowered value: an interrupted soak left it? Restore it first: rabbitmqctl "
                + (f"-n {node.name} " if node.name else "")
                + "eval 'application:set_env(rabbit, consumer_timeout, 1800000), "
                "application:set_env(rabbit, channel_tick_interval, 60000).'")


async def lower_consumer_timeout(broker: Broker, timeout_ms: int) -> None:
    """Every node: ``consumer_timeout`` low, checked every second (for channels opened from
    now on; the soak closes its replicas' connections so theirs are)."""
    for node in broker.nodes:
        await ctl(node.name, "eval",
                  f"application:set_env(rabbit, consumer_timeout, {int(timeout_ms)}), "
                  "application:set_env(rabbit, channel_tick_interval, 1000).")


async def restore_consumer_timeout(broker: Broker) -> None:
    """Every node back to the values :func:`save_env` read."""
    for node in broker.nodes:
        saved = broker.saved_env.get(node.name)
        if saved is None:
            continue
        for key, got in saved.items():
            match = re.fullmatch(r"\{ok,(\d+)\}", got)
            expr = (f"application:set_env(rabbit, {key}, {match.group(1)})." if match
                    else f"application:unset_env(rabbit, {key}).")
            await ctl(node.name, "eval", expr)


async def consumer_timeout_restored(broker: Broker) -> bool:
    """Whether every node has the saved values again."""
    for node in broker.nodes:
        for key, got in broker.saved_env.get(node.name, {}).items():
            now = (await ctl(node.name, "eval", f"application:get_env(rabbit, {key}).")).strip()
            if now != got:
                return False
    return True


async def stop_app(broker: Broker, index: int) -> Node:
    node = broker.nodes[index]
    node.stopped = True
    await ctl(node.name, "stop_app")
    return node


async def start_app(node: Node) -> None:
    await ctl(node.name, "start_app")
    await ctl(node.name, "await_startup", "--timeout", "90")
    node.stopped = False
