"""One soak: start everything, publish and inject on the plan's schedule, heal, wait, observe.

Phases:

1. **Start**: the simulator (one account per type, enforcing the type's limits), a proxy
   per replica and broker node, the replicas (each ready), the history reader, the
   samplers (each replica's ``/readyz`` every second and ``/metrics`` every two, the
   soak's queue depths every two).
2. **Active** (``minutes``): events and poison published on schedule, each confirmed
   before the next; faults injected on schedule, each healed before the phase ends.
3. **Quiet**: every fault healed and checked (consumer timeout, nodes, accounts,
   proxies); every replica running; a bounded wait for every event's final signal; for a
   SIM whose newest event failed (a fault used up its retries) one closing event, so that
   every SIM's expected status is known; a bounded wait for the soak's queues to empty.
4. **Observe**: the simulator's request log, stats and SIM statuses, the dead letters;
   then SIGTERM to every replica (their exit codes count too) and clean-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp

from jasper_consumer.config import slugify
from tests.reliability.conftest import Harness, reached, wait_until

from . import brokers
from .faults import SIGTERM_BOUND_S, Injector, gather_faults, restart
from .invariants import (
    Injected,
    Observations,
    Published,
    QueueSample,
    ReplicaSample,
    Signal,
)
from .proxy import Proxy
from .replicas import READY_BOUND_S, Replica
from .schedule import EVENTS_EXCHANGE_CODES, TYPES, Plan, Publish

FINALS_BOUND_S = 300.0  # the quiet phase's wait for every final signal
CLOSING_BOUND_S = 120.0
DRAINED_BOUND_S = 60.0
PUBLISH_RETRY_BOUND_S = 120.0
COMMAND_OF = {code: command for command, code in EVENTS_EXCHANGE_CODES.items()}


def service_config(harness: Harness) -> dict[str, Any]:
    """The replicas' config (before each one's broker URLs and HTTP port)."""
    types = [{"name": tp.name, "username": tp.account, "api_key": f"k{tp.account}",
              "max_concurrency": tp.max_concurrency,
              "requests_per_second": tp.requests_per_second,
              "request_timeout_seconds": 2} for tp in TYPES]
    harness.write_config(types)
    return harness.config


class Soak:
    def __init__(self, plan: Plan, broker: brokers.Broker, workdir: Path,
                 say: Callable[[str], None] = print) -> None:
        self.plan = plan
        self.broker = broker
        self.workdir = workdir
        self.say = say
        self.started = 0.0
        self.harness: Harness | None = None
        self.replicas: list[Replica] = []
        self.proxies: list[Proxy] = []
        self.injector: Injector | None = None
        self.obs = Observations(
            types=[{"name": tp.name, "slug": slugify(tp.name), "account": tp.account,
                    "max_concurrency": tp.max_concurrency,
                    "requests_per_second": tp.requests_per_second} for tp in TYPES], prefix="")
        self._seen_bodies: set[bytes] = set()
        self._mono_minus_wall = time.monotonic() - time.time()
        self._tasks: list[asyncio.Task[Any]] = []
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._publish_channel: aio_pika.abc.AbstractChannel | None = None
        self.order = 0
        self._reader: tuple[aio_pika.abc.AbstractChannel, str] | None = None

    # -- the whole run ---------------------------------------------------------------

    async def run(self) -> Observations:
        connection = await aio_pika.connect_robust(self.broker.own_url)
        async with aiohttp.ClientSession() as http:
            self.harness = Harness(self.workdir, http, connection)
            self.harness.tag = f"chaos-{self.plan.seed}-{self.harness.tag[4:]}"
            self.obs.prefix = self.harness.tag
            try:
                await self._run(http)
            finally:
                await self._cleanup(connection)
        return self.obs

    async def _run(self, http: aiohttp.ClientSession) -> None:
        assert self.harness is not None
        await brokers.save_env(self.broker)
        sim = await self.harness.start_simulator(
            [f"{tp.account}:k{tp.account}:{tp.max_concurrency}:{tp.requests_per_second}"
             for tp in TYPES])
        # The simulator stands in for a server with CPUs of its own: on a loaded host it
        # should not be the process that waits, or it sees calls late and bunched up.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, sim.proc.popen.pid, -10)
        config = service_config(self.harness)
        for index in range(self.plan.replicas):
            proxies = []
            for node in self.broker.nodes[index % len(self.broker.nodes):] + \
                    self.broker.nodes[:index % len(self.broker.nodes)]:
                proxy = Proxy("127.0.0.1", node.port)
                await proxy.start()
                proxies.append(proxy)
            self.proxies += proxies
            self.replicas.append(Replica(index, self.workdir, config, proxies))
        for replica in self.replicas:
            replica.start()
        for replica in self.replicas:
            await replica.wait_ready(http)
        self.say(f"{len(self.replicas)} replicas ready (pids "
                 f"{[r.pid for r in self.replicas]}), queue prefix {self.harness.tag}, "
                 f"logs in {self.workdir}")
        await self._read_signals()

        self.started = self.obs.started = time.monotonic()
        self.obs.started_wall = time.time()
        self.injector = Injector(self.broker, sim, self.replicas, http, self.harness.tag,
                                 self.say, self.started)
        self._tasks = [asyncio.create_task(self._sample_replicas(http)),
                       asyncio.create_task(self._sample_queues())]
        publisher = asyncio.create_task(self._publish_all(self.plan.publishes))
        faults = asyncio.create_task(gather_faults(self.injector, list(self.plan.faults)))
        await asyncio.gather(publisher, faults)
        self.say(f"+{time.monotonic() - self.started:6.1f}s active phase over; quiet phase")

        self.obs.restored = await self.injector.heal_all()
        with contextlib.suppress(AssertionError):  # a restart still under way: noted there
            await wait_until(lambda: not any(r.busy for r in self.replicas),
                             "the replicas' restarts", READY_BOUND_S + 5, 0.2)
        for replica in self.replicas:
            if not replica.alive:
                replica.start()
        for replica in self.replicas:
            try:
                await replica.wait_ready(http)
            except AssertionError as exc:
                _, why = await replica.probe(http)
                self.obs.not_ready.append(f"replica {replica.index} pid {replica.pid}: {exc} "
                                          f"(/readyz: {why})")
                self.say(f"+{time.monotonic() - self.started:6.1f}s {self.obs.not_ready[-1]}")
        await self._wait_finals(FINALS_BOUND_S)
        await self._close_failed_sims()
        await self._wait_drained()
        self.say(f"+{time.monotonic() - self.started:6.1f}s quiet; reading the results")

        self.obs.requests = list(await sim.requests())
        self.obs.stats = dict(await sim.stats())
        for iccid in sorted({p.iccid for p in self.obs.published if p.iccid}):
            details = await sim.sim(iccid)
            self.obs.sim_status[iccid] = details["status"] if details else None
        self.obs.dead = dict(await self.harness.dead_letters())
        for task in self._tasks:
            task.cancel()
        for replica in self.replicas:
            if replica.alive:
                pid = replica.pid
                assert pid is not None
                code = await replica.sigterm(SIGTERM_BOUND_S)
                self.injector.sigterms.append((replica.index, pid, code))
        self.obs.faults += self.injector.injected
        self.obs.not_ready[:0] = self.injector.not_ready
        self._read_logs()
        self.obs.sigterms = list(self.injector.sigterms)

    def _read_logs(self) -> None:
        """Count what the replicas wrote besides their JSON log lines (warnings, tracebacks),
        and their lines at level error: not judged, printed for whoever reads the run."""
        for replica in self.replicas:
            for line in replica.log_path.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    self.obs.error_lines += '"level": "error"' in line
                elif line.strip() and not line.startswith("==="):
                    key = re.sub(r"0x[0-9a-f]+", "0x…", line.strip())[:160]
                    self.obs.log_notes[key] = self.obs.log_notes.get(key, 0) + 1

    async def _cleanup(self, connection: aio_pika.abc.AbstractRobustConnection) -> None:
        for task in self._tasks:
            task.cancel()
        if self.injector is not None:
            with contextlib.suppress(Exception):
                problems = await self.injector.heal_all()
                if problems:
                    self.say(f"NOT RESTORED: {problems}")
        for replica in self.replicas:
            replica.close()
        for proxy in self.proxies:
            await proxy.close()
        if self._reader is not None:  # before the history queue goes
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader[0].close(), 5)
        if self.harness is not None:
            with contextlib.suppress(Exception):
                await self.harness.cleanup()
            with contextlib.suppress(Exception):
                await self._delete_leftover_queues(connection)
        await connection.close()

    async def _delete_leftover_queues(self, connection: aio_pika.abc.AbstractConnection) -> None:
        """Queues of this soak's prefix that ``remove_topology`` does not know (yet)."""
        assert self.harness is not None
        left = await brokers.queue_depths(self.broker, self.harness.tag)
        channel = await connection.channel()
        for name in left:
            await channel.queue_delete(name)
        await channel.close()

    # -- publishing ------------------------------------------------------------------

    async def _channel(self) -> aio_pika.abc.AbstractChannel:
        assert self.harness is not None
        if self._publish_channel is None or self._publish_channel.is_closed:
            self._publish_channel = await self.harness.connection.channel(
                publisher_confirms=True)
            self._exchange = await self._publish_channel.get_exchange(
                f"{self.harness.tag}.events")
        return self._publish_channel

    async def _publish_one(self, p: Publish) -> None:
        """Publish (confirmed); after a broker failure try again, bounded, and note it."""
        assert self.harness is not None
        if p.event is not None:
            body, key = json.dumps(p.event).encode(), f"event.{p.event['event_code']}"
        else:
            assert p.raw is not None
            body, key = p.raw, "event.65516"
        message = aio_pika.Message(body, content_type="application/json",
                                   message_id=p.message_id, priority=p.priority,
                                   delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        failed_at: float | None = None
        deadline = time.monotonic() + PUBLISH_RETRY_BOUND_S
        while True:
            try:
                channel = await self._channel()
                if p.to_work_queue_of is not None:
                    queue = f"{self.harness.tag}.work.{slugify(p.to_work_queue_of)}"
                    await channel.default_exchange.publish(message, queue, timeout=10)
                else:
                    assert self._exchange is not None
                    await self._exchange.publish(message, key, timeout=10)
                break
            except Exception as exc:
                now = time.monotonic()
                if now > deadline:
                    raise
                if failed_at is None:
                    failed_at = now
                    self.say(f"+{now - self.started:6.1f}s publish failed "
                             f"({type(exc).__name__}); trying again")
                self._publish_channel = None
                await wait_until(lambda: not self.harness.connection.is_closed,  # type: ignore[union-attr]
                                 "the soak's own connection", PUBLISH_RETRY_BOUND_S, 0.2)
                await wait_until(reached(time.monotonic() + 0.5), "a pause", 5, 0.1)
        if failed_at is not None:  # it may have gone through twice
            self.obs.faults.append(Injected("publish_retried", failed_at, time.monotonic(),
                                            p.message_id))

    def _record(self, p: Publish) -> None:
        if p.event is None:
            self.obs.poison_ids.append(p.message_id)
            return
        code = p.event.get("event_code")
        self.obs.published.append(Published(
            self.order, p.message_id, p.what, p.iccid,
            str(p.event["device"]["communicator_type"]),
            COMMAND_OF.get(code if isinstance(code, int) else 0, "activate"),
            time.monotonic()))
        self.order += 1

    async def _publish_all(self, publishes: tuple[Publish, ...]) -> None:
        for p in publishes:
            await wait_until(reached(self.started + p.at_s), "the publish time",
                             p.at_s + PUBLISH_RETRY_BOUND_S, 0.01)
            await self._publish_one(p)
            self._record(p)

    # -- signals ---------------------------------------------------------------------

    async def _read_signals(self) -> None:
        """Consume the history queue; again whenever the broker cancelled the consumer (a
        quorum queue's leader node stopping does) or the channel went."""
        assert self.harness is not None
        name = f"{self.harness.tag}.history"
        if self._reader is not None:
            channel, _ = self._reader
            # Asked of the broker: aiormq keeps a channel's consumer tags after the broker
            # cancelled them or the channel closed, and a robust channel restores its
            # consumers only sometimes. The soak is the history queue's only consumer.
            # (On another channel: RabbitMQ 3.10 counts 0 on the consumer's own channel.)
            with contextlib.suppress(Exception):
                look = await asyncio.wait_for(self.harness.connection.channel(), 2)
                try:
                    look_at = await asyncio.wait_for(look.declare_queue(name, passive=True), 2)
                finally:
                    with contextlib.suppress(Exception):
                        await look.close()
                if (look_at.declaration_result.consumer_count or 0) > 0:
                    return
            self.say(f"+{time.monotonic() - self.started:6.1f}s the soak's history consumer "
                     "was cancelled; consuming again")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), 5)
        channel = await self.harness.connection.channel()
        await channel.set_qos(prefetch_count=200)
        queue = await channel.get_queue(name)

        async def on_signal(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            digest = hashlib.sha256(message.body).digest()
            # our own ack lost with a connection: the same message again, not a new signal
            if not (message.redelivered and digest in self._seen_bodies):
                self._seen_bodies.add(digest)
                self._add_signal(json.loads(message.body))
            with contextlib.suppress(Exception):
                await message.ack()

        self._reader = (channel, await queue.consume(on_signal))

    def _add_signal(self, body: dict[str, Any]) -> None:
        error = body.get("error") or {}
        try:
            wall = datetime.fromisoformat(str(body["completed_at"]).replace("Z", "+00:00"))
            completed = wall.timestamp() + self._mono_minus_wall
        except (KeyError, ValueError):
            completed = time.monotonic()
        self.obs.signals.setdefault(str(body.get("event_id")), []).append(Signal(
            str(body.get("event_id")), str(body.get("outcome")), error.get("code"),
            completed, time.monotonic()))

    def _has_final(self, event_id: str) -> bool:
        return any(s.outcome in ("succeeded", "failed")
                   for s in self.obs.signals.get(event_id, []))

    async def _wait_finals(self, bound_s: float) -> None:
        ids = [p.event_id for p in self.obs.published]
        try:
            await wait_until(lambda: all(self._has_final(e) for e in ids),
                             "every event's final signal", bound_s, 0.5)
        except AssertionError:
            missing = sum(1 for e in ids if not self._has_final(e))
            self.say(f"+{time.monotonic() - self.started:6.1f}s {missing} events still "
                     f"without a final signal after {bound_s:.0f} s")

    async def _close_failed_sims(self) -> None:
        """One more event for each SIM whose newest event did not succeed."""
        newest: dict[str, Published] = {}
        for p in self.obs.published:
            if p.what == "event" and p.iccid:
                newest[p.iccid] = p
        closing: list[tuple[Publish, Published]] = []
        for iccid, p in sorted(newest.items()):
            finals = [s for s in self.obs.signals.get(p.event_id, [])
                      if s.outcome in ("succeeded", "failed")]
            if finals and finals[-1].outcome != "succeeded":
                type_index = next(i for i, tp in enumerate(TYPES) if tp.name == p.type_name)
                event_id = f"closing-{p.event_id}"
                event = {"event_id": event_id,
                         "event_code": EVENTS_EXCHANGE_CODES[p.command],
                         "client_id": f"{type_index + 1}closing",
                         "occurred_at": "2026-11-25T10:15:00Z",
                         "device": {"ref_no": iccid, "communicator_type": p.type_name}}
                closing.append((Publish(0.0, event_id, event=event, what="closing"),
                                Published(0, event_id, "closing", iccid, p.type_name,
                                          p.command, 0.0)))
        if not closing:
            return
        self.say(f"+{time.monotonic() - self.started:6.1f}s {len(closing)} SIMs' newest event "
                 "failed: one closing event each")
        for message, published in closing:
            await self._publish_one(message)
            self.obs.published.append(dataclasses.replace(
                published, order=self.order, at=time.monotonic()))
            self.order += 1
        await self._wait_finals(CLOSING_BOUND_S)

    async def _wait_drained(self) -> None:
        assert self.harness is not None
        prefix = self.harness.tag
        kinds = (".events", ".work.", ".bulk.", ".parked.")

        async def drained() -> bool:
            try:
                depths = await brokers.queue_depths(self.broker, prefix)
            except Exception:
                return False
            return not any(n for q, n in depths.items() if any(k in q for k in kinds))

        try:
            await wait_until(drained, "the soak's queues to empty", DRAINED_BOUND_S, 1.0)
        except AssertionError as exc:
            self.say(f"+{time.monotonic() - self.started:6.1f}s {exc}")

    # -- sampling --------------------------------------------------------------------

    async def _sample_replicas(self, http: aiohttp.ClientSession) -> None:
        tick = 0
        while True:
            tick += 1
            for replica in self.replicas:
                now = time.monotonic()
                if not replica.alive:
                    if not replica.expected_exit and not replica.busy:
                        self._exited_by_itself(replica, http)
                    self.obs.replica_samples.append(ReplicaSample(now, replica.index, False,
                                                                  None))
                    continue
                ready, why = await replica.probe(http)
                up = await replica.communicator_up(http) if tick % 2 == 0 else None
                self.obs.replica_samples.append(ReplicaSample(
                    now, replica.index, replica.alive, ready, up, "" if ready else why))
            await wait_until(reached(time.monotonic() + 1.0), "the next sample", 5, 0.1)

    def _exited_by_itself(self, replica: Replica, http: aiohttp.ClientSession) -> None:
        assert replica.proc is not None
        code = replica.proc.popen.returncode
        now = time.monotonic()
        self.obs.unexpected_exits.append((replica.index, replica.pid or 0, code, now))
        self.obs.faults.append(Injected("unexpected_exit", now, now, f"replica {replica.index}"))
        self.say(f"+{now - self.started:6.1f}s replica {replica.index} pid {replica.pid} "
                 f"EXITED BY ITSELF ({code}); restarting it")
        replica.busy = True
        assert self.injector is not None
        self._tasks.append(asyncio.create_task(
            restart(replica, http, self.injector.not_ready, self.started)))

    async def _sample_queues(self) -> None:
        assert self.harness is not None
        while True:
            with contextlib.suppress(Exception):  # the node is away: no sample
                depths = await brokers.queue_depths(self.broker, self.harness.tag)
                self.obs.queue_samples.append(QueueSample(time.monotonic(), depths))
            with contextlib.suppress(Exception):  # the soak's own connection is away
                await self._read_signals()
            await wait_until(reached(time.monotonic() + 2.0), "the next sample", 5, 0.1)


def default_workdir(seed: int) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path("/tmp") / f"jasper-chaos-{seed}-{stamp}"
    path.mkdir(parents=True, exist_ok=True)
    return path
