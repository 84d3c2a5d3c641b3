"""Fault-test harness: the real service and simulator as subprocesses, the real broker.

Every test gets its own queue prefix and exchanges, and removes them afterwards.
Waiting is always on a condition with a bound (``wait_until``), never a bare sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from jasper_consumer.broker import event_message
from jasper_consumer.config import parse_settings, slugify
from jasper_consumer.topology import remove_topology

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], what: str, timeout: float,
    poll: float = 0.05,
) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(poll)


def reached(moment: float) -> Callable[[], bool]:
    """A predicate for ``wait_until``: the monotonic clock has reached ``moment``."""
    return lambda: time.monotonic() >= moment


async def publish_paced(harness: Harness, events: Sequence[dict[str, Any]], rate: float,
                        started: dict[str, float] | None = None) -> None:
    """Publish one event every ``1 / rate`` s on a fixed schedule, each confirmed before the
    next; ``started`` gets each event id's ``time.monotonic()`` as its publish begins."""
    begin = time.monotonic()
    for n, event in enumerate(events):
        await wait_until(reached(begin + n / rate), f"the publish slot of event {n}", 5, 0.005)
        if started is not None:
            started[event["event_id"]] = time.monotonic()
        await harness.publish([event])


class Proc:
    """A child process whose output goes to a log file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})})

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill9(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout)

    def close(self) -> None:
        if self.alive:
            self.popen.kill()
            self.popen.wait(10)
        self._log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


class Simulator:
    """The simulator subprocess and its admin API."""

    def __init__(self, proc: Proc, port: int, session: aiohttp.ClientSession):
        self.proc = proc
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}/rws/api/v1"
        self._admin = f"http://127.0.0.1:{port}/_sim"
        self._http = session

    async def _req(self, method: str, path: str, body: Any = None) -> Any:
        async with self._http.request(method, self._admin + path, json=body) as resp:
            assert resp.status < 300, (resp.status, await resp.text())
            return await resp.json()

    async def account(self, username: str, **fields: Any) -> Any:
        return await self._req("PUT", f"/accounts/{username}", fields)

    async def fault(self, iccid: str, **fields: Any) -> Any:
        return await self._req("PUT", f"/faults/{iccid}", fields)

    async def sim(self, iccid: str) -> Any:
        async with self._http.get(f"{self._admin}/sims/{iccid}") as resp:
            return await resp.json() if resp.status == 200 else None

    async def stats(self) -> Any:
        return await self._req("GET", "/stats")

    async def requests(self) -> list[dict[str, Any]]:
        return list(await self._req("GET", "/requests"))


@dataclass
class Signals:
    """Every signal read from the test's history queue, by event id.

    ``arrived`` holds, in the same order, the ``time.monotonic()`` at which each signal
    reached the test: on Linux that is CLOCK_MONOTONIC, one clock for every process on the
    host, so it compares with the simulator's ``RequestRecord.started``.
    """

    by_event: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    arrived: dict[str, list[float]] = field(default_factory=dict)

    def add(self, signal: dict[str, Any], at: float | None = None) -> None:
        self.by_event.setdefault(signal["event_id"], []).append(signal)
        self.arrived.setdefault(signal["event_id"], []).append(
            time.monotonic() if at is None else at)

    def first_at(self, event_id: str, outcome: str) -> float | None:
        """When the event's first signal with ``outcome`` arrived, or None."""
        for sig, at in zip(self.by_event.get(event_id, []), self.arrived.get(event_id, []),
                           strict=True):
            if sig["outcome"] == outcome:
                return at
        return None

    def finals(self, event_id: str) -> list[dict[str, Any]]:
        return [s for s in self.by_event.get(event_id, [])
                if s["outcome"] in ("succeeded", "failed")]

    def outcomes(self, event_id: str) -> list[str]:
        return [s["outcome"] for s in self.by_event.get(event_id, [])]

    def report(self, fault: str, event_ids: list[str]) -> str:
        """One line for the fault's assertion message and the test log."""
        lost, dup = self.count(event_ids)
        line = f"{fault}: published {len(event_ids)}, lost {lost}, duplicated {dup}"
        print(line)
        return line

    def count(self, event_ids: list[str]) -> tuple[int, int]:
        """(lost, duplicated) among ``event_ids``."""
        lost = sum(1 for e in event_ids if not self.finals(e))
        dup = sum(1 for e in event_ids if len(self.finals(e)) > 1)
        return lost, dup


def type_(letter: str, max_concurrency: int = 1, requests_per_second: float = 50,
          **extra: Any) -> dict[str, Any]:
    """Communicator type "Type <LETTER>" on simulator account <letter> with key k<letter>.

    The request timeout is 2 s: a process that takes a type over waits one call interval
    plus the request timeout before its first call (operator guide, section 13), 10 s at the
    default."""
    return {"name": f"Type {letter.upper()}", "username": letter, "api_key": f"k{letter}",
            "max_concurrency": max_concurrency, "requests_per_second": requests_per_second,
            "request_timeout_seconds": 2, **extra}


def make_event(iccid: str, communicator_type: str, code: int = 65516,
               **extra: Any) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()), "event_code": code, "client_id": f"c-{iccid[-6:]}",
        "occurred_at": "2026-11-25T10:15:00Z",
        "device": {"ref_no": iccid, "communicator_type": communicator_type}, **extra,
    }


def iccid(n: int) -> str:
    return f"8961018501{n:010d}"


def job_body(event_id: str, sim: str, command: str, stamp: int,
             communicator_type: str = "Type A") -> dict[str, Any]:
    """A work-queue job as the router writes it, stamped ``stamp``."""
    return {
        "event_id": event_id, "event_code": 65516 if command == "activate" else 65517,
        "client_id": f"c-{sim[-6:]}", "command": command, "iccid": sim,
        "communicator_type": communicator_type, "occurred_at": "2026-11-25T10:15:00Z",
        "stamp": stamp,
    }


def first_answer(records: list[dict[str, Any]], http_status: int,
                 after: float = float("-inf")) -> dict[str, Any] | None:
    """The earliest simulator request record started after ``after`` and answered
    ``http_status`` (``started`` is the simulator's ``time.monotonic()``)."""
    hits = [r for r in records if r["http_status"] == http_status and r["started"] > after]
    return min(hits, key=lambda r: r["started"]) if hits else None


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name{labels}`` in a /metrics page, None if absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def vm_rss_mb(pid: int) -> float:
    """The process's resident set size (VmRSS) in MB, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match, f"no VmRSS in /proc/{pid}/status"
    return int(match.group(1)) / 1024


_RABBITMQCTL: list[str] = []  # why rabbitmqctl cannot be used here ("" once it could)


def require_rabbitmqctl() -> None:
    """Skip, saying why, where ``rabbitmqctl`` is missing or may not talk to the local node
    (it needs the node's Erlang cookie: run as root, as the rabbitmq user, or with a copy of
    the cookie in your home)."""
    if not _RABBITMQCTL:
        try:
            done = subprocess.run(["rabbitmqctl", "-q", "list_vhosts"], capture_output=True,
                                  text=True, timeout=60, check=False)
            why = "" if done.returncode == 0 else done.stderr.strip().splitlines()[:1]
        except FileNotFoundError:
            why = ["rabbitmqctl is not installed"]
        _RABBITMQCTL.append(" ".join(why) if why else "")
    if _RABBITMQCTL[0]:
        pytest.skip(f"needs rabbitmqctl allowed to talk to the local RabbitMQ (root, the "
                    f"rabbitmq user, or its Erlang cookie in ~/.erlang.cookie): "
                    f"{_RABBITMQCTL[0][:200]}")


async def rabbitmqctl_table(command: str, *columns: str,
                            node: str | None = None) -> list[dict[str, str]]:
    """Rows of ``rabbitmqctl [-n node] <command> -p / <columns>`` (e.g. list_queues), one
    dict each; ``node`` is another node than the machine's broker (e.g. ``jc1@localhost``).

    Read-only listings only: never stop, restart or reset the shared broker from a test.
    """
    assert command.startswith("list_"), command
    require_rabbitmqctl()
    target = ["-n", node] if node else []
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", *target, command, "-p", "/", "--no-table-headers", *columns,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, (command, err.decode(errors="replace"))
    return [dict(zip(columns, line.split("\t"), strict=True))
            for line in out.decode().splitlines() if line.strip()]


async def queue_counts(name: str) -> tuple[int, int]:
    """(ready, unacked) messages of queue ``name``, as RabbitMQ counts them."""
    rows = [r for r in await rabbitmqctl_table(
        "list_queues", "name", "messages_ready", "messages_unacknowledged") if r["name"] == name]
    assert rows, f"no queue {name}"
    return int(rows[0]["messages_ready"]), int(rows[0]["messages_unacknowledged"])


async def consumer_prefetches(queue: str) -> list[int]:
    """The prefetch count of each consumer registered on ``queue``."""
    return [int(r["prefetch_count"]) for r in await rabbitmqctl_table(
        "list_consumers", "queue_name", "prefetch_count") if r["queue_name"] == queue]


async def active_consumer_pid(queue: str) -> int | None:
    """The OS pid of the process whose consumer is the active one on ``queue`` (single
    active consumer), found through the broker: consumer → channel → connection →
    the client's port → the process holding that socket (``ss -p``)."""
    consumers = await rabbitmqctl_table("list_consumers", "queue_name", "channel_pid", "active")
    channels = [c["channel_pid"] for c in consumers
                if c["queue_name"] == queue and c["active"] == "true"]
    if len(channels) != 1:
        return None
    connection = {r["pid"]: r["connection"] for r in await rabbitmqctl_table(
        "list_channels", "pid", "connection")}.get(channels[0])
    port = {r["pid"]: r["peer_port"] for r in await rabbitmqctl_table(
        "list_connections", "pid", "peer_port")}.get(connection or "")
    if port is None:
        return None
    ss = await asyncio.create_subprocess_exec(
        "ss", "-tnpH", "state", "established", f"( sport = :{port} )",
        stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(ss.communicate(), 10)
    pids = set(re.findall(r"pid=(\d+)", out.decode()))
    return int(pids.pop()) if len(pids) == 1 else None


class Harness:
    """Starts services and the simulator for one test; publishes; collects signals."""

    def __init__(self, tmp: Path, session: aiohttp.ClientSession,
                 connection: aio_pika.abc.AbstractRobustConnection):
        self.tmp = tmp
        self.http = session
        self.connection = connection
        self.tag = f"jcr-{uuid.uuid4().hex[:10]}"
        self.signals = Signals()
        self.services: list[Proc] = []
        self.sim: Simulator | None = None
        self.config_path = tmp / "config.yaml"
        self.config: dict[str, Any] = {}
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self.ports: list[int] = []
        self.dead: dict[str, str | None] = {}

    async def start_simulator(self, accounts: list[str]) -> Simulator:
        port = free_port()
        args = [sys.executable, "-m", "jasper_consumer", "simulator", "--port", str(port)]
        for a in accounts:
            args += ["--account", a]
        proc = Proc(args, self.tmp / "simulator.log")
        self.sim = Simulator(proc, port, self.http)

        async def up() -> bool:
            try:
                await self.sim.stats()  # type: ignore[union-attr]
            except (aiohttp.ClientError, OSError):
                return False
            return True

        await wait_until(up, "the simulator to answer", 20)
        return self.sim

    async def setup(self, types: list[dict[str, Any]], *,
                    account_keys: dict[str, str] | None = None, **overrides: Any) -> Simulator:
        """Start the simulator with one account per type, enforcing the type's own limits
        (its key unless ``account_keys`` says otherwise), and write the service's config."""
        accounts = [
            f"{t['username']}:{(account_keys or {}).get(t['username'], t.get('api_key'))}:"
            f"{t.get('max_concurrency', 1)}:{t.get('requests_per_second', 1)}" for t in types]
        sim = await self.start_simulator(accounts)
        self.write_config(types, **overrides)
        return sim

    def write_config(self, types: list[dict[str, Any]], **overrides: Any) -> Path:
        assert self.sim is not None
        for t in types:
            t.setdefault("server_address", self.sim.base_url)
        self.config = {
            "amqp_url": AMQP_URL,
            "events_exchange": f"{self.tag}.events",
            "history_exchange": f"{self.tag}.history",
            "queue_prefix": self.tag,
            "http_port": 0,
            "retry": {"max_attempts": 4, "initial_delay_seconds": 0.05,
                      "max_delay_seconds": 0.5, "max_elapsed_seconds": 10},
            "shutdown_grace_seconds": 10,
            "watchdog_interval_seconds": 1,
            "communicator_types": types,
            **overrides,
        }
        self.config_path.write_text(yaml.safe_dump(self.config))
        return self.config_path

    async def start_service(self, *, wait_ready: bool = True) -> Proc:
        port = free_port()
        config = dict(self.config, http_port=port)
        path = self.tmp / f"config-{port}.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = Proc([sys.executable, "-m", "jasper_consumer", "run", "--config", str(path)],
                    self.tmp / f"service-{len(self.services)}.log")
        self.services.append(proc)
        self.ports.append(port)
        if wait_ready:
            await wait_until(lambda: self.ready(port, proc), "the service to be ready", 30)
        return proc

    async def ready(self, port: int, proc: Proc) -> bool:
        if not proc.alive:
            raise AssertionError(
                f"service exited {proc.popen.returncode}:\n{proc.output()[-3000:]}")
        try:
            async with self.http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                return resp.status == 200
        except (aiohttp.ClientError, OSError):
            return False

    async def metrics(self, port: int) -> str:
        async with self.http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            return await resp.text()

    async def channel(self) -> aio_pika.abc.AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            self._channel = await self.connection.channel()
        return self._channel

    async def read_signals(self) -> None:
        """Consume the history queue (declared by the service) into ``self.signals``."""
        channel = await self.channel()
        queue = await channel.get_queue(f"{self.tag}.history")

        async def on_signal(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            self.signals.add(json.loads(message.body), time.monotonic())
            with contextlib.suppress(Exception):  # lost with the connection: redelivered
                await message.ack()

        await queue.consume(on_signal)

    async def publish(self, events: Sequence[dict[str, Any] | bytes],
                      headers: list[dict[str, Any]] | None = None,
                      message_ids: list[str] | None = None,
                      routing_key: str | None = None) -> list[float]:
        """Publish to the events exchange, each confirmed before the next; return the
        ``time.monotonic()`` at which each was confirmed."""
        confirmed: list[float] = []
        channel = await self.connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            f"{self.tag}.events", aio_pika.ExchangeType.TOPIC, durable=True)
        for i, event in enumerate(events):
            if isinstance(event, dict):
                body, code, mid = json.dumps(event).encode(), event.get("event_code"), \
                    event.get("event_id")
            else:
                body, code, mid = event, 65516, None
            if message_ids:
                mid = message_ids[i]
            await exchange.publish(
                event_message(body, message_id=mid, headers=headers[i] if headers else None),
                routing_key=routing_key or f"event.{code if isinstance(code, int) else 65516}")
            confirmed.append(time.monotonic())
        await channel.close()
        return confirmed

    def work_queue(self, type_name: str) -> str:
        """The name of the communicator type's work queue."""
        return f"{self.tag}.work.{slugify(type_name)}"

    async def publish_jobs(self, queue: str, jobs: Sequence[dict[str, Any]]) -> None:
        """Publish jobs (see ``job_body``) straight to a work queue, in order, confirmed."""
        channel = await self.connection.channel(publisher_confirms=True)
        try:
            for job in jobs:
                await channel.default_exchange.publish(
                    aio_pika.Message(json.dumps(job).encode(), content_type="application/json",
                                     message_id=job["event_id"],
                                     delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=queue)
        finally:
            await channel.close()

    async def dead_letters(self) -> dict[str, str | None]:
        """Take every message off ``<prefix>.dead`` into ``self.dead`` (message id → its
        ``x-jasper-error`` header) and return everything seen so far."""
        channel = await self.channel()
        queue = await channel.get_queue(f"{self.tag}.dead")
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            reason = (message.headers or {}).get("x-jasper-error")
            self.dead[str(message.message_id)] = None if reason is None else str(reason)
        return self.dead

    async def wait_final(self, event_ids: list[str], timeout: float) -> None:
        await wait_until(lambda: all(self.signals.finals(e) for e in event_ids),
                         f"final signals for {len(event_ids)} events "
                         f"(lost so far: {self.signals.count(event_ids)[0]})", timeout, 0.2)

    async def queue_depth(self, name: str) -> int:
        channel = await self.connection.channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
            return int(queue.declaration_result.message_count or 0)
        finally:
            await channel.close()

    async def cleanup(self) -> None:
        for proc in self.services:
            proc.close()
        if self.sim is not None:
            self.sim.proc.close()
        if self.config:
            await remove_topology(self.connection, parse_settings(self.config, {}))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``cluster`` run after all others (their three broker nodes, once
    started, cost the rest of the run nothing)."""
    items.sort(key=lambda item: item.get_closest_marker("cluster") is not None)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    connection = await aio_pika.connect_robust(AMQP_URL)
    async with aiohttp.ClientSession() as session:
        h = Harness(tmp_path, session, connection)
        try:
            yield h
        finally:
            await h.cleanup()
            await connection.close()


def caller_pid(user_agent: str | None) -> int | None:
    """The pid in the service's ``jasper-consumer/<version> (<host> pid <pid>)``."""
    match = re.search(r"\bpid (\d+)\)", user_agent or "")
    return int(match.group(1)) if match else None
