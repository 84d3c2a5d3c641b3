"""What every scenario needs: broker names and clean-up, processes, RSS, statistics.

Everything talks to 127.0.0.1 only. Each scenario makes its own queue prefix and
exchanges (``jcbench-<bench pid>-<hex>``) and deletes them when it ends, also on failure.
The service and the simulator run as subprocesses of the venv's Python, so their
CPU and memory are their own; ``time.monotonic`` is system-wide on Linux, so the
simulator's request records and the bench's own clock can be compared.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import yaml
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from jasper_consumer.broker import event_message

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
HOST = "127.0.0.1"
PREFIX = "jcbench"
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PYTHON = sys.executable
EVENT_CODE = 65516
SERVICE_KEY = "bench-key"  # the api_key of every type in the service's config
REQUEST_TIMEOUT_S = 2.0  # every type's request_timeout_seconds (see comm_type)
_QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}
_PR_SET_PDEATHSIG = 1


def owner_alive(name: str) -> bool:
    """Whether the bench process that made broker object ``name`` is still running."""
    parts = name.split("-", 2)
    if len(parts) < 3 or parts[0] != PREFIX or not parts[1].isdigit():
        return False
    try:
        return b"bench" in Path(f"/proc/{parts[1]}/cmdline").read_bytes()
    except OSError:
        return False


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- events --------------------------------------------------------------------------------


def iccid(n: int, series: int = 0) -> str:
    """A distinct 20-digit ICCID per (series, n): no coalescing, no per-SIM ordering waits."""
    return f"8961{series:04d}{n:012d}"


def event(iccid_: str, communicator_type: str, *, event_id: str | None = None) -> dict[str, Any]:
    return {
        "event_id": event_id or str(uuid.uuid4()),
        "event_code": EVENT_CODE,
        "client_id": "100234",
        "occurred_at": "2026-11-25T10:15:00Z",
        "device": {"ref_no": iccid_, "communicator_type": communicator_type},
    }


def event_bytes(n: int, communicator_type: str, series: int = 0) -> bytes:
    return json.dumps(event(iccid(n, series), communicator_type)).encode()


def event_bodies(count: int, communicator_type: str, series: int = 0) -> list[bytes]:
    return [event_bytes(n, communicator_type, series) for n in range(count)]


def message(body: bytes, message_id: str | None = None) -> aio_pika.Message:
    return event_message(body, message_id=message_id)


# --- the service's settings and broker objects ---------------------------------------------


@dataclass
class Topo:
    """One scenario's names on the broker, and the service config that uses them."""

    tag: str = field(default_factory=lambda: f"{PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    extra_queues: list[str] = field(default_factory=list)

    @property
    def events_exchange(self) -> str:
        return f"{self.tag}.events"

    @property
    def history_exchange(self) -> str:
        return f"{self.tag}.history"

    @property
    def events_queue(self) -> str:
        return f"{self.tag}.events"

    @property
    def history_queue(self) -> str:
        return f"{self.tag}.history"

    def work_queue(self, slug: str) -> str:
        return f"{self.tag}.work.{slug}"

    def config(self, types: Sequence[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
        raw: dict[str, Any] = {
            "amqp_url": AMQP_URL,
            "events_exchange": self.events_exchange,
            "history_exchange": self.history_exchange,
            "queue_prefix": self.tag,
            "http_port": 0,
            "prefetch": 64,
            "retry": {"max_attempts": 5, "initial_delay_seconds": 0.5,
                      "max_delay_seconds": 30, "max_elapsed_seconds": 120},
            "shutdown_grace_seconds": 2,
            "communicator_types": list(types),
        }
        raw.update(overrides)
        return raw


def comm_type(name: str, server_address: str, *, max_concurrency: int, rps: float,
              request_timeout_s: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
    """A communicator type whose simulator account is ``user-<slug>`` with key ``bench-key``.

    A process that becomes a type's owner after a crash waits ``1 / rps`` plus the request
    timeout before its first call (operator guide, section 13; on a first start or after a
    clean hand-over it calls at once); the simulator answers in about a millisecond, so the
    bench's types have 2 s rather than 10, and its scenarios wait for a first call
    (:func:`first_calls`) or a warm-up event before they measure.
    """
    return {"name": name, "server_address": server_address, "username": account_name(name),
            "api_key": SERVICE_KEY, "max_concurrency": max_concurrency,
            "requests_per_second": rps, "request_timeout_seconds": request_timeout_s}


def slug(name: str) -> str:
    from jasper_consumer.config import slugify

    return slugify(name)


def account_name(name: str) -> str:
    return f"user-{slug(name)}"


async def declare_service_topology(channel: AbstractChannel, raw: dict[str, Any]) -> None:
    """Declare exactly what the service declares (its own code), so a backlog can wait."""
    from jasper_consumer.config import parse_settings
    from jasper_consumer.topology import declare

    await declare(channel, parse_settings(raw, {}))


async def delete_topology(conn: AbstractRobustConnection, topo: Topo,
                          type_names: Iterable[str] = ()) -> None:
    """Delete every queue and exchange of ``topo``; missing ones are fine."""
    queues = [topo.events_queue, topo.history_queue, f"{topo.tag}.dead",
              f"{topo.tag}.router-epoch", *topo.extra_queues]
    for name in type_names:  # as jasper_consumer.topology.Names names them
        queues += [topo.work_queue(slug(name)), f"{topo.tag}.parked.{slug(name)}",
                   f"{topo.tag}.calls.{slug(name)}", f"{topo.tag}.bulk.{slug(name)}",
                   f"{topo.tag}.owner.{slug(name)}"]
    exchanges = [topo.events_exchange, topo.history_exchange, f"{topo.tag}.dlx",
                 f"{topo.tag}.status"]
    for name in queues:
        channel = await conn.channel()
        with contextlib.suppress(Exception):
            await channel.queue_delete(name)
        with contextlib.suppress(Exception):
            await channel.close()
    for name in exchanges:
        channel = await conn.channel()
        with contextlib.suppress(Exception):
            await channel.exchange_delete(name)
        with contextlib.suppress(Exception):
            await channel.close()


async def declare_quorum(channel: AbstractChannel, name: str) -> None:
    await channel.declare_queue(name, durable=True, arguments=_QUORUM)


async def queue_state(conn: AbstractRobustConnection, name: str) -> tuple[int, int]:
    """``(ready messages, consumers)`` of an existing queue (passive declare)."""
    channel = await conn.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        result = queue.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


async def wait_until(predicate: Callable[[], Any], what: str, timeout_s: float,
                     interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(interval_s)


async def sleep_checked(proc: Proc, seconds: float) -> None:
    """Sleep, failing early if ``proc`` dies meanwhile."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        proc.check()
        await asyncio.sleep(min(left, 0.5))


async def wait_consumers(conn: AbstractRobustConnection, queues: Iterable[str],
                         timeout_s: float = 30.0, minimum: int = 1) -> None:
    names = list(queues)

    async def ready() -> bool:
        for name in names:
            if (await queue_state(conn, name))[1] < minimum:
                return False
        return True

    await wait_until(ready, f"consumers on {', '.join(names)}", timeout_s, 0.1)


async def first_calls(sim: Sim, names: Iterable[str], timeout_s: float) -> float:
    """Wait until the simulator has seen a call from the account of every type in ``names``
    (each type's owner has ended its wait, see :func:`comm_type`); returns when the last
    of those first calls started (``time.monotonic``)."""
    users = {account_name(n) for n in names}
    firsts: dict[str, float] = {}

    async def seen() -> bool:
        for record in await sim.requests():
            user = record["account"]
            if user in users and user not in firsts:
                firsts[user] = record["started"]
        return len(firsts) == len(users)

    await wait_until(seen, f"a first call from each of {len(users)} type(s)", timeout_s, 0.25)
    return max(firsts.values())


async def preload(conn: AbstractRobustConnection, bodies: Sequence[bytes], *,
                  exchange: str = "", routing_key: str, batch: int = 2000) -> float:
    """Publish ``bodies`` persistent, every one confirmed; returns seconds taken."""
    started = time.perf_counter()
    channel = await conn.channel(publisher_confirms=True)
    try:
        target = (channel.default_exchange if not exchange
                  else await channel.get_exchange(exchange, ensure=False))
        for i in range(0, len(bodies), batch):
            await asyncio.gather(*(target.publish(message(b), routing_key)
                                   for b in bodies[i:i + batch]))
    finally:
        await channel.close()
    return time.perf_counter() - started


class Drain:
    """Consumes a queue with auto-ack and records when each message arrived.

    ``parse`` keeps each body as JSON (for latency by event id); otherwise only the
    arrival times are kept, which is cheap enough not to slow the pipeline it drains.
    """

    def __init__(self, conn: AbstractRobustConnection, queue: str, *, parse: bool = False,
                 accept: Callable[[dict[str, Any]], bool] | None = None) -> None:
        self._conn = conn
        self._queue_name = queue
        self._parse = parse
        self._accept = accept
        self.times: list[float] = []
        self.bodies: list[dict[str, Any]] = []
        self._target = 0
        self._reached = asyncio.Event()
        self._channel: AbstractChannel | None = None

    async def start(self) -> None:
        self._channel = await self._conn.channel()
        await self._channel.set_qos(prefetch_count=2000)
        queue = await self._channel.get_queue(self._queue_name, ensure=False)
        await queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, msg: AbstractIncomingMessage) -> None:
        now = time.monotonic()
        if self._parse:
            body = json.loads(msg.body)
            if self._accept is not None and not self._accept(body):
                return
            body["_received"] = now
            self.bodies.append(body)
        self.times.append(now)
        if self._target and len(self.times) >= self._target:
            self._reached.set()

    async def wait_count(self, count: int, timeout_s: float) -> None:
        self._target = count
        if len(self.times) >= count:
            return
        self._reached.clear()
        try:
            async with asyncio.timeout(timeout_s):
                await self._reached.wait()
        except TimeoutError:
            raise TimeoutError(f"{self._queue_name}: {len(self.times)} of {count} messages "
                               f"after {timeout_s:g} s") from None

    async def measure(self, count: int, timeout_s: float, pids: dict[str, int | None],
                      ) -> dict[str, float]:
        """Wait for ``count`` messages; CPU ms per message of ``pids`` from the first on."""
        await wait_until(lambda: self.times, f"a first message on {self._queue_name}",
                         timeout_s, 0.005)
        live = {k: p for k, p in pids.items() if p is not None}
        before = {k: cpu_s(p) for k, p in live.items()}
        seen = len(self.times)
        await self.wait_count(count, timeout_s)
        after = {k: cpu_s(p) for k, p in live.items()}
        done = max(1, len(self.times) - seen)
        return {f"{k}_cpu_ms_per_event": (after[k] - before[k]) * 1000 / done for k in live}

    async def measure_from_here(self, publish: Callable[[], Awaitable[Any]], count: int,
                                timeout_s: float, pids: dict[str, int | None],
                                ) -> dict[str, float]:
        """CPU ms per message of ``pids`` for ``count`` more messages, counted from before
        ``publish`` (which sends what makes them) to the last of them: all the work they
        cause, whichever stage does it when, and none of a process's start-up."""
        live = {k: p for k, p in pids.items() if p is not None}
        target = len(self.times) + count
        before = {k: cpu_s(p) for k, p in live.items()}
        await publish()
        await self.wait_count(target, timeout_s)
        after = {k: cpu_s(p) for k, p in live.items()}
        return {f"{k}_cpu_ms_per_event": (after[k] - before[k]) * 1000 / count for k in live}

    def rate(self, skip: int = 0) -> float:
        """Messages per second between the first arrival (after ``skip``) and the last."""
        times = self.times[skip:]
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])

    async def close(self) -> None:
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close()


# --- processes -----------------------------------------------------------------------------


@dataclass
class Proc:
    """A subprocess with its stderr in a temp file; ``stop`` ends it (SIGTERM, then KILL)."""

    popen: subprocess.Popen[bytes]
    name: str
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def check(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")

    async def stop(self, timeout_s: float = 15.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.popen.wait, timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        await asyncio.to_thread(self.popen.wait)
        with contextlib.suppress(OSError):
            self.stderr_path.unlink()


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here, not in the forked child


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the bench dies, so no service outlives a killed run."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(name: str, args: Sequence[str], *, stdout: int | None = None,
          package_dir: Path | None = None) -> Proc:
    """``python ARGS`` from the repository root, or with ``package_dir`` (a folder holding
    another ``jasper_consumer`` package, e.g. a proposed fix) first on the path."""
    fd, path = tempfile.mkstemp(prefix=f"jcbench-{name}-", suffix=".log")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if package_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(package_dir), str(ROOT)])
    with os.fdopen(fd, "wb") as stderr:
        popen = subprocess.Popen(
            [PYTHON, *args], stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
            cwd=package_dir or ROOT, env=env,
            preexec_fn=_die_with_parent)
    return Proc(popen, name, Path(path))


def has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.asynccontextmanager
async def service(raw_config: dict[str, Any], *, profile: Path | None = None,
                  log_level: str = "INFO", loop: str = "asyncio",
                  package_dir: Path | None = None) -> AsyncIterator[Proc]:
    """``jasper-consumer run --config <tmp.yaml>`` in its own process; stopped on exit.

    ``loop="uvloop"`` runs the same command on uvloop's event loop (``bench.uvloop_run``);
    ``package_dir`` runs another copy of the package (see :func:`spawn`).
    """
    fd, path = tempfile.mkstemp(prefix="jcbench-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(raw_config, f)
    module = "bench.uvloop_run" if loop == "uvloop" else "jasper_consumer"
    args = ["-m", module, "run", "--config", path, "--log-level", log_level]
    if profile is not None:
        args = ["-m", "cProfile", "-o", str(profile), *args]
    proc = spawn("service", args, package_dir=package_dir)
    try:
        yield proc
    except BaseException:
        log(f"service stderr, last lines:\n{proc.tail(15)}")
        raise
    finally:
        await proc.stop()
        os.unlink(path)


@dataclass
class Sim:
    proc: Proc
    base_url: str
    admin: str
    session: aiohttp.ClientSession

    async def account(self, user: str, *, max_in_flight: int, rps: float,
                      down: str | None = None, api_key: str = SERVICE_KEY,
                      latency_s: float = 0.0) -> None:
        """Add or change an account; another ``api_key`` than the service's config has makes
        every call of the type answer 401 ``10000001`` (a paused type); ``latency_s`` holds
        every call that long (ended early when the caller hangs up)."""
        body = {"api_key": api_key, "max_in_flight": max_in_flight,
                "requests_per_second": rps, "down": down, "latency_s": latency_s}
        async with self.session.put(f"{self.admin}/accounts/{user}", json=body) as resp:
            resp.raise_for_status()

    async def reset(self) -> None:
        async with self.session.post(f"{self.admin}/reset") as resp:
            resp.raise_for_status()

    async def stats(self) -> dict[str, Any]:
        async with self.session.get(f"{self.admin}/stats") as resp:
            resp.raise_for_status()
            data: dict[str, Any] = await resp.json()
            return data

    def stalls(self, start: float, end: float) -> list[tuple[float, float]]:
        """``(when, ms)`` of the simulator's event-loop stalls between ``start`` and ``end``:
        requests that arrive during one are stamped late, which can look like a burst."""
        out = []
        try:
            lines = self.proc.stderr_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        for line in lines:
            if line.startswith("simulator loop stalled "):
                parts = line.split()
                when, ms = float(parts[-1]), float(parts[3])
                if start <= when <= end:
                    out.append((when, ms))
        return out

    async def requests(self, since: float | None = None) -> list[dict[str, Any]]:
        """Every request the simulator served (or is serving: ``finished`` 0), or those
        that started at or after ``since`` (a ``time.monotonic()``)."""
        params = {} if since is None else {"since": repr(since)}
        async with self.session.get(f"{self.admin}/requests", params=params) as resp:
            resp.raise_for_status()
            data: list[dict[str, Any]] = await resp.json()
            return data


@contextlib.asynccontextmanager
async def simulator() -> AsyncIterator[Sim]:
    """The simulator in its own process (``bench.simserver``: no per-request log line)."""
    proc = spawn("simulator", ["-m", "bench.simserver"], stdout=subprocess.PIPE)
    try:
        assert proc.popen.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.popen.stdout.readline), 30)
        base_url = line.decode().strip()
        if not base_url.startswith(f"http://{HOST}:"):
            raise RuntimeError(f"simulator did not start: {line!r}\n{proc.tail()}")
        admin = base_url.split("/rws/")[0] + "/_sim"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            yield Sim(proc, base_url, admin, session)
    finally:
        await proc.stop()


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP ``port`` (any address, IPv4 or IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f, None)
            for line in f:
                fields = line.split()
                # local address is HEXIP:HEXPORT; state 0A is LISTEN
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    inodes.add(fields[9])
    return inodes


def broker_pid(port: int = 5672) -> int | None:
    """The RabbitMQ node's process (``beam.smp``) that listens on ``port``: other nodes may run
    on this machine (a test cluster); without access to their sockets, the first one found."""
    nodes = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "beam.smp":
                    nodes.append(entry)
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    for node in nodes:
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in wanted for fd in (node / "fd").iterdir()):
                return int(node.name)
    return int(nodes[0].name) if nodes else None


def rss_kib(pid: int) -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of a process, in KiB."""
    values = {"VmRSS": 0, "VmHWM": 0}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in values:
                values[key] = int(line.split()[1])
    return values["VmRSS"], values["VmHWM"]


@contextlib.asynccontextmanager
async def connect() -> AsyncIterator[AbstractRobustConnection]:
    conn = await aio_pika.connect_robust(
        AMQP_URL, client_properties={"connection_name": "jasper-consumer bench"})
    try:
        yield conn
    finally:
        await conn.close()


# --- statistics ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
