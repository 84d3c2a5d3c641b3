"""Composition root and lifecycle: connect, declare, start stages, watch, drain on SIGTERM.

Start order: HTTP clients → broker connection (robust: it reconnects with back-off
and restores channels and consumers) → topology → workers (one channel each) →
router → probe server → watchdog. Stop order is the reverse: stop consuming, hand
back jobs not yet sent to Control Center, let calls in flight finish within
``shutdown_grace_seconds``, close channels (anything unacked returns to its queue),
close HTTP sessions.

The watchdog checks every few seconds that each consumer is still registered on the
broker (aio-pika can lose one silently across reconnects); it re-registers a lost one,
and ``/readyz`` turns false while it cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import signal
import time
from typing import Any

import aio_pika
from aio_pika.abc import AbstractQueue, AbstractRobustChannel, AbstractRobustConnection

from .config import Settings
from .edge import Handler
from .history import Publisher
from .jasper import JasperClient
from .metrics import Metrics
from .probes import ProbeServer
from .router import Router
from .topology import Names, declare
from .worker import Worker

log = logging.getLogger(__name__)

RECONNECT_MIN_S = 1.0  # first retry after a lost connection; doubles up to the max
RECONNECT_MAX_S = 30.0


def _registered(consumer: Worker | _RouterConsumer) -> bool:
    """Whether the consumer's tag is live on its channel as the client library sees it.

    On a single-active-consumer queue another replica's consumer keeps the broker's
    count above 0, so the count alone cannot tell that this one vanished.
    """
    try:
        underlay = getattr(consumer.queue.channel, "channel")  # noqa: B009 (aiormq's, may raise)
    except Exception:  # channel closed or being restored
        return False
    return consumer.consumer_tag in getattr(underlay, "consumers", {})


class _RouterConsumer:
    """The router's consumer, with the same start/stop shape as a worker's."""

    def __init__(self, queue: AbstractQueue, callback: Handler) -> None:
        self.queue = queue
        self.callback = callback
        self.consumer_tag: str | None = None

    async def start(self) -> None:
        self.consumer_tag = await self.queue.consume(self.callback)

    async def stop_consuming(self) -> None:
        if self.consumer_tag is not None:
            tag, self.consumer_tag = self.consumer_tag, None
            with contextlib.suppress(Exception):
                await self.queue.cancel(tag)


class Service:
    """The whole service; ``await start()`` then ``await stop()`` (or ``run()``)."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        *,
        http_host: str = "0.0.0.0",
        clients: dict[str, JasperClient] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._http_host = http_host
        self.clients = clients or {
            ct.name: JasperClient(ct, settings.retry, self.metrics)
            for ct in settings.communicator_types
        }
        self.workers: dict[str, Worker] = {}
        self.router: Router | None = None
        self._router_consumer: _RouterConsumer | None = None
        self.probes = ProbeServer(self.metrics.registry, self.readiness)
        self._connection: AbstractRobustConnection | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._watchdog_problem: str | None = None
        self._watchdog_last_ok = 0.0
        self._missing: set[str] = set()  # consumers seen missing once
        self._inflight: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._broker_up = False
        self._reconnecting: asyncio.Task[None] | None = None

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
        self.metrics.prepare(s)
        # /healthz answers from the start, even while the broker is still away.
        await self.probes.start(self._http_host, s.http_port)
        for client in self.clients.values():
            await client.start()
        self._connection = await self._connect()
        self._broker_up = True
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        self._connection.close_callbacks.add(self._on_close)
        self.metrics.broker_connected.set(1)

        setup = await self._connection.channel()
        await declare(setup, s)
        await setup.close()
        names = Names.from_settings(s)

        for ct in s.communicator_types:
            # Prefetch what the account can start in about two seconds: enough to keep
            # it busy, few enough live objects (GC pauses, memory) for many types.
            prefetch = min(s.prefetch, max(
                4, 2 * ct.max_concurrency, math.ceil(2 * ct.requests_per_second)))
            channel = await self._channel(prefetch)
            queue = await channel.get_queue(names.work_queue(ct), ensure=False)
            worker = Worker(ct, s, self.clients[ct.name],
                            Publisher(channel, names, self.metrics), self.metrics,
                            channel=channel, queue=queue, track=self._tracked,
                            prefetch=prefetch)
            self.workers[ct.name] = worker
            await worker.start()

        channel = await self._channel()
        self.router = Router(s, Publisher(channel, names, self.metrics), self.metrics)
        queue = await channel.get_queue(names.events_queue, ensure=False)
        self._router_consumer = _RouterConsumer(queue, self._tracked(self.router.on_message))
        await self._router_consumer.start()

        self._watchdog_last_ok = time.monotonic()
        self._watchdog = asyncio.create_task(self._watch(), name="consumer watchdog")
        gc.freeze()  # start-up objects leave the collector's full passes (shorter pauses)
        log.info("started", extra={"fields": {"http_port": self.probes.port}})

    async def _connect(self) -> AbstractRobustConnection:
        """Connect to RabbitMQ, retrying with back-off (1 s doubling to 30 s) until it answers.

        Once connected, the robust connection reconnects by itself after a loss.
        """
        delay = 1.0
        while True:
            try:
                return await aio_pika.connect_robust(
                    self.settings.amqp_url.get_secret_value(),
                    reconnect_interval=RECONNECT_MIN_S,
                    client_properties={
                        "connection_name": f"jasper-consumer {self.settings.queue_prefix}"})
            except (OSError, aio_pika.exceptions.AMQPError) as exc:
                log.warning(
                    "RabbitMQ at %s does not answer (%s); retrying in %.0f s",
                    self.settings.amqp_url_redacted, type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _channel(self, prefetch: int | None = None) -> AbstractRobustChannel:
        assert self._connection is not None
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=prefetch or self.settings.prefetch)
        return channel

    def _tracked(self, callback: Handler) -> Handler:
        """Wrap a consumer callback so shutdown knows which messages are in flight."""

        async def tracked(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._inflight.add(task)
            try:
                await callback(message)
            finally:
                self._inflight.discard(task)

        return tracked

    async def stop(self) -> None:
        """Stop consuming, finish in-flight work within the grace period, close."""
        if self._stopping:
            return
        self._stopping = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self._router_consumer is not None:
            await self._router_consumer.stop_consuming()
        for worker in self.workers.values():
            await worker.begin_shutdown()
        pending = {t for t in self._inflight if not t.done()}
        log.info("stopping: no new messages; finishing %d in flight", len(pending))
        if pending:
            _, pending = await asyncio.wait(pending, timeout=self.settings.shutdown_grace_seconds)
        if pending:
            log.warning("grace period over: handing %d messages back to the broker", len(pending))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for worker in self.workers.values():
            await worker.close()
        await self.probes.stop()
        if self._connection is not None:
            await self._connection.close()
        for client in self.clients.values():
            await client.close()
        self.metrics.broker_connected.set(0)
        self.metrics.ready.set(0)
        log.info("stopped")

    async def run(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
            await stop.wait()
        finally:
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
        conn = self._connection
        if conn is None or conn.is_closed or self._stopping:
            return False, "not connected to RabbitMQ"
        if self._watchdog_problem is not None:
            return False, self._watchdog_problem
        stale = time.monotonic() - self._watchdog_last_ok
        if stale > 3 * self.settings.watchdog_interval_seconds + 10:
            return False, f"consumer check has not passed for {stale:.0f} s"
        return True, f"{len(self.workers) + 1} consumers registered"

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.watchdog_interval_seconds)
            try:
                self._watchdog_problem = await self._check_consumers()
            except Exception as exc:  # broker away: readiness shows it
                self._watchdog_problem = f"consumer check failed: {type(exc).__name__}"
                continue
            if self._watchdog_problem is None:
                self._watchdog_last_ok = time.monotonic()
            self.readiness()

    async def _check_consumers(self) -> str | None:
        """Ask the broker whether each queue we consume still has a consumer; repair."""
        conn = self._connection
        if conn is None or conn.is_closed:
            return "not connected to RabbitMQ"
        consumers: list[tuple[str, Worker | _RouterConsumer]] = [
            (f"work {name}", w) for name, w in self.workers.items()]
        if self._router_consumer is not None:
            consumers.append(("events", self._router_consumer))
        channel = await conn.channel()
        try:
            for name, consumer in consumers:
                if consumer.consumer_tag is None:
                    continue  # deliberately not consuming (handing back held messages)
                ok = await channel.declare_queue(consumer.queue.name, passive=True)
                if ok.declaration_result.consumer_count and _registered(consumer):
                    self._missing.discard(name)
                elif name not in self._missing:
                    self._missing.add(name)  # a quorum queue's count can lag: look again
                else:
                    log.error("consumer on %s vanished; registering it again", name,
                              extra={"fields": {"queue": consumer.queue.name}})
                    self._missing.discard(name)
                    await consumer.stop_consuming()
                    await consumer.start()
        finally:
            await channel.close()
        return None

    def _on_reconnect(self, *_: object) -> None:
        self._broker_up = True
        self.metrics.broker_connected.set(1)
        log.info("reconnected to RabbitMQ")

    def _on_close(self, *_: object) -> None:
        self._broker_up = False
        self.metrics.broker_connected.set(0)
        if self._stopping:
            return
        log.warning("connection to RabbitMQ lost; reconnecting")
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.create_task(self._back_off_reconnects())

    async def _back_off_reconnects(self) -> None:
        """aio-pika retries at a fixed interval: double it while the broker stays away."""
        conn = self._connection
        assert conn is not None
        interval = RECONNECT_MIN_S
        while not self._broker_up and not self._stopping:
            conn.reconnect_interval = interval  # type: ignore[attr-defined]
            await asyncio.sleep(interval)
            interval = min(interval * 2, RECONNECT_MAX_S)
        conn.reconnect_interval = RECONNECT_MIN_S  # type: ignore[attr-defined]
