"""Composition root and lifecycle: connect, declare, start stages, watch, drain on SIGTERM.

Start order: probe server (``/healthz`` answers while the broker is still away) → HTTP
clients → broker connection (:mod:`.broker`: the first node that answers, robust) →
topology → workers (one channel each) → router → watchdog. A broker whose TLS certificate
does not verify stops start-up (:class:`~.errors.BrokerUntrusted`: the CLI exits 2).
SIGTERM in any phase ends the process with exit code 0: before the broker answers,
start-up is abandoned and the connection being made is closed; after,
:meth:`Service.stop` takes no new messages, lets calls under way finish and settle
within ``shutdown_grace_seconds``, then closes the channels, which returns every
message not acked to the head of its queue, in order, for the next owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection

from . import broker
from .bulk import BulkQueue
from .calls import OwnerCalls
from .config import CommunicatorType, Settings
from .edge import Acks, Handler
from .history import History
from .jasper.client import JasperClient
from .lanes import Lanes, Share
from .memory import Memory
from .metrics import Metrics
from .ownerlog import OwnerLog
from .parking import Parking
from .probes import ProbeServer
from .router import Router
from .status import Finals
from .statusboard import StatusBoard
from .statuspage import routes as status_routes
from .topology import Names, declare
from .worker import Parts, Worker

log = logging.getLogger(__name__)


CHECK_TIMEOUT_S = 3.0  # the watchdog's check; past it, no type starts a call until one passes


def work_prefetch(settings: Settings, max_concurrency: int, requests_per_second: float) -> int:
    """Jobs a work queue's consumer may hold: ``prefetch``, but never more than the account
    starts in 10 minutes (a held message must be acked within the consumer timeout)."""
    return max(1, min(settings.prefetch,
                      max_concurrency + math.floor(requests_per_second * 600)))


def parked_prefetch(settings: Settings, max_concurrency: int, requests_per_second: float) -> int:
    """Parked jobs taken at once while draining: what the account starts in about 2 s."""
    return min(settings.prefetch,
               max(4, 2 * max_concurrency, math.ceil(2 * requests_per_second)))


def worker_parts(ct: CommunicatorType, settings: Settings, names: Names, client: JasperClient,
                 history: History, metrics: Metrics,
                 open_channel: Callable[[], Awaitable[AbstractChannel]], acks: Acks, *,
                 parked_at_once: int | None = None) -> Parts:
    """What the owner of ``ct`` works with (:class:`~.worker.Parts`); ``parked_at_once``
    overrides :func:`parked_prefetch` (tests)."""
    return Parts(
        lanes=Lanes(Memory(settings.outcome_memory_bytes)),
        share=Share(settings.lanes.bulk_min_share),
        parking=Parking(ct, names, history, open_channel=open_channel, acks=acks,
                        prefetch=parked_at_once or parked_prefetch(
                            settings, ct.max_concurrency, ct.requests_per_second),
                        gauge=metrics.parked.labels(ct.name)),
        calls=OwnerCalls(client, names.calls_queue(ct), open_channel, acks),
        owner_log=OwnerLog(names.owner_queue(ct), history, open_channel, acks),
        bulk=BulkQueue(names.bulk_queue(ct), open_channel, acks),
        acks=acks)


class _Consumer:
    """The router's consumer, with the shape the watchdog expects."""

    def __init__(self, queue: AbstractQueue, callback: Handler) -> None:
        self.queue: AbstractQueue | None = queue
        self._queue = queue
        self.callback = callback
        self.consumer_tag: str | None = None

    async def start(self) -> None:
        self.consumer_tag = await self._queue.consume(self.callback)

    async def restart(self) -> None:
        """Register again on the same channel (the router keeps no owner state beyond the
        channel it sees deliveries on)."""
        tag, self.consumer_tag = self.consumer_tag, None
        if tag is not None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(tag)
        await self.start()


class Service:
    """The whole service; ``await start()`` then ``await stop()`` (or ``run()``)."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, *,
                 http_host: str = "0.0.0.0", clients: dict[str, JasperClient] | None = None,
                 ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._http_host = http_host
        self.clients = clients or {ct.name: JasperClient(ct, self.metrics)
                                   for ct in settings.communicator_types}
        self.workers: dict[str, Worker] = {}
        self.router: Router | None = None
        self._router_consumer: _Consumer | None = None
        self.finals = Finals()  # every final signal, for the status page
        self.acks = Acks()  # every ack, nack and reject of the service goes through it
        self.status = StatusBoard(settings, self.finals)
        self.probes = ProbeServer(self.metrics.registry, self.readiness,
                                  status_routes(self.status.snapshot))
        self._connection: AbstractRobustConnection | None = None
        self._connecting: AbstractRobustConnection | None = None  # while start-up connects
        self._link: broker.Link | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._problem: str | None = None
        self._last_ok = 0.0
        self._routing: set[asyncio.Task[Any]] = set()
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start everything; on failure close what was opened and re-raise."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        s = self.settings
        log.info("starting", extra={"fields": {
            "amqp": s.amqp_url_redacted, "queue_prefix": s.queue_prefix,
            "communicator_types": [ct.name for ct in s.communicator_types]}})
        if s.paused_prefetch is not None:
            log.warning("config key paused_prefetch has no effect any more: jobs of a paused "
                        "type wait in its parked queue; remove the key")
        self.metrics.prepare(s)
        await self.probes.start(self._http_host, s.http_port)
        for client in self.clients.values():
            await client.start()
        self._connection = connection = await broker.connect(
            s.amqp_urls, f"jasper-consumer {s.queue_prefix}", attempt=self._attempting)
        self._link = broker.Link(connection, self.metrics.broker_connected)

        setup = await connection.channel()
        await declare(setup, s)
        await setup.close()
        names = Names.from_settings(s)
        # The consumed queues are taken with a passive declare (``ensure=True``): only a
        # queue declared on a robust channel is restored, with its consumer, when the
        # connection comes back (on another node too); the watchdog is the backstop.
        for ct in s.communicator_types:
            history = History(await self._channel(), names, self.metrics,
                              on_final=self.finals.record_final)
            worker = Worker(
                ct, s, self.clients[ct.name], history, self.metrics,
                worker_parts(ct, s, names, self.clients[ct.name], history, self.metrics,
                             self._channel, self.acks),
                names=names, open_channel=self._channel,
                prefetch=work_prefetch(s, ct.max_concurrency, ct.requests_per_second))
            self.workers[ct.name] = worker
            await worker.start()

        channel = await self._channel()
        self.router = Router(s, History(channel, names, self.metrics), self.metrics, channel,
                             self.acks)
        queue = await channel.get_queue(names.events_queue)
        self._router_consumer = _Consumer(queue, self._tracked(self.router.on_message))
        await self._router_consumer.start()
        await self.status.start(connection, self.workers)

        self._last_ok = time.monotonic()
        self._watchdog = asyncio.create_task(self._watch(), name="consumer watchdog")
        gc.freeze()  # start-up objects leave the collector's full passes (shorter pauses)
        log.info("started", extra={"fields": {"http_port": self.probes.port}})

    def _attempting(self, connection: AbstractRobustConnection | None) -> None:
        self._connecting = connection

    async def _channel(self, prefetch: int | None = None) -> AbstractChannel:
        assert self._connection is not None
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=prefetch or self.settings.prefetch)
        return channel

    def _tracked(self, callback: Handler) -> Handler:
        """Wrap the router's callback so shutdown knows which messages are in flight."""

        async def tracked(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._routing.add(task)
            try:
                await callback(message)
            finally:
                self._routing.discard(task)

        return tracked

    async def stop(self) -> None:
        """Take no new messages, finish what is under way within the grace period, close."""
        if self._stopping:
            return
        self._stopping = True
        grace = self.settings.shutdown_grace_seconds
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self.router is not None:
            self.router.stopping = True
        log.info("stopping: no new messages; finishing %d in flight", len(self._routing))
        routing = [t for t in self._routing if not t.done()]
        await asyncio.gather(
            *(w.stop(grace) for w in self.workers.values()),
            asyncio.wait(routing, timeout=grace) if routing else asyncio.sleep(0))
        for task in self._routing:
            task.cancel()
        await self.status.stop()
        await self.acks.flush_all()
        await self.probes.stop()
        connecting, self._connecting = self._connecting, None
        if connecting is not None:  # SIGTERM while start-up was still connecting
            await connecting.close()
        if self._link is not None:
            await self._link.close()  # unacked messages return, in order
        elif self._connection is not None:
            await self._connection.close()
        for client in self.clients.values():
            await client.close()
        self.metrics.broker_connected.set(0)
        self.metrics.ready.set(0)
        log.info("stopped")

    async def run(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully — in any phase."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        starting = asyncio.create_task(self._start(), name="start")
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()  # a start-up error ends the process with it
                await stopped
            else:
                log.info("SIGTERM while starting: giving up the start")
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
        finally:
            stopped.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()

    # -- health ----------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        """What ``/readyz`` answers; also kept in ``jasper_ready``."""
        ready, why = self._readiness()
        self.metrics.ready.set(1 if ready else 0)
        return ready, why

    def _readiness(self) -> tuple[bool, str]:
        conn, link = self._connection, self._link
        if conn is None or conn.is_closed or self._stopping or link is None or not link.up:
            why = f": {link.problem}" if link is not None and link.problem else ""
            return False, f"not connected to RabbitMQ{why}"
        if self._problem is not None:
            return False, self._problem
        stale = time.monotonic() - self._last_ok
        if stale > 3 * self.settings.watchdog_interval_seconds + 10:
            return False, f"consumer check has not passed for {stale:.0f} s"
        return True, f"{len(self.workers) + 1} consumers registered"

    def _consumers(self) -> list[tuple[str, broker.Consumer]]:
        out: list[tuple[str, broker.Consumer]] = [
            (f"work {name}", w) for name, w in self.workers.items()]
        if self._router_consumer is not None:
            out.append(("events", self._router_consumer))
        return out

    async def _watch(self) -> None:
        """Every ``watchdog_interval_seconds``: ask the broker whether every consumer is
        still there (repairing one that vanished). A broker that does not answer within
        :data:`CHECK_TIMEOUT_S` may already have given this process's queues to another
        replica (it drops a silent client after two missed heartbeats; this client notices
        only later): until a check passes again, no type starts a call."""
        assert self._connection is not None
        watchdog = broker.Watchdog(self._connection, self._consumers)
        task = asyncio.current_task()
        while True:
            await asyncio.sleep(self.settings.watchdog_interval_seconds)
            try:
                async with asyncio.timeout(CHECK_TIMEOUT_S):
                    self._problem = await watchdog.check()
            except asyncio.CancelledError:
                if task is not None and task.cancelling():
                    raise  # stopping
                # aiormq gave up on a stuck connection under our check: the check failed
                self._check_failed("the connection to RabbitMQ was given up")
                continue
            except TimeoutError:
                self._check_failed(f"RabbitMQ did not answer within {CHECK_TIMEOUT_S:.0f} s")
                continue
            except Exception as exc:  # broker away: readiness shows it
                self._check_failed(f"consumer check failed: {type(exc).__name__}")
                continue
            self._calls_allowed(True)
            if self._problem is None:
                self._last_ok = time.monotonic()
            self.readiness()

    def _check_failed(self, why: str) -> None:
        self._problem = why
        self._calls_allowed(False, why)
        self.readiness()

    def _calls_allowed(self, allowed: bool, why: str = "") -> None:
        for worker in self.workers.values():
            worker.calls_allowed(allowed, why)
