"""Composition root and lifecycle: connect, declare, start stages, drain on SIGTERM.

Start order: broker connection → topology → workers (one channel each) → router
→ probe server. Stop order is the reverse: stop consuming, let in-flight messages
finish within ``shutdown_grace_seconds``, close channels (unacked messages go back
to their queues), close HTTP sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

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


@dataclass
class _Consumer:
    name: str
    queue: AbstractQueue
    tag: str


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
        self.probes = ProbeServer(self.metrics.registry, self.readiness)
        self._connection: AbstractRobustConnection | None = None
        self._channels: list[AbstractRobustChannel] = []
        self._consumers: list[_Consumer] = []
        self._inflight: set[asyncio.Task[Any]] = set()
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        log.info("starting", extra={"fields": {
            "amqp": s.amqp_url_redacted, "queue_prefix": s.queue_prefix,
            "communicator_types": [ct.name for ct in s.communicator_types]}})
        for client in self.clients.values():
            await client.start()
        self._connection = await aio_pika.connect_robust(
            s.amqp_url.get_secret_value(), client_properties={"connection_name": "jasper-consumer"})
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        self._connection.close_callbacks.add(self._on_close)
        self.metrics.broker_connected.set(1)

        setup = await self._connection.channel()
        await declare(setup, s)
        await setup.close()
        names = Names.from_settings(s)

        for ct in s.communicator_types:
            channel = await self._channel()
            worker = Worker(ct, s, self.clients[ct.name], Publisher(channel, names, self.metrics),
                            self.metrics)
            self.workers[ct.name] = worker
            queue = await channel.get_queue(names.work_queue(ct), ensure=False)
            await self._consume(f"work {ct.name}", queue, worker.on_message)

        channel = await self._channel()
        self.router = Router(s, Publisher(channel, names, self.metrics), self.metrics)
        queue = await channel.get_queue(names.events_queue, ensure=False)
        await self._consume("events", queue, self.router.on_message)

        await self.probes.start(self._http_host, s.http_port)
        log.info("started", extra={"fields": {"http_port": self.probes.port}})

    async def _channel(self) -> AbstractRobustChannel:
        assert self._connection is not None
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        self._channels.append(channel)
        return channel

    async def _consume(self, name: str, queue: AbstractQueue, callback: Handler) -> None:
        async def tracked(message: AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._inflight.add(task)
            try:
                await callback(message)
            finally:
                self._inflight.discard(task)

        tag = await queue.consume(tracked)
        self._consumers.append(_Consumer(name, queue, tag))

    async def stop(self) -> None:
        """Stop consuming, finish in-flight work within the grace period, close."""
        if self._stopping:
            return
        self._stopping = True
        log.info("stopping: no new messages; finishing %d in flight", len(self._inflight))
        for consumer in self._consumers:
            with contextlib.suppress(Exception):
                await consumer.queue.cancel(consumer.tag)
        deadline = time.monotonic() + self.settings.shutdown_grace_seconds
        pending = {t for t in self._inflight if not t.done()}
        while pending and time.monotonic() < deadline:
            _, pending = await asyncio.wait(pending, timeout=deadline - time.monotonic())
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
        conn = self._connection
        if conn is None or conn.is_closed or self._stopping:
            return False, "not connected to RabbitMQ"
        missing = [c.name for c in self._consumers if not c.tag]
        if missing:
            return False, f"consumers not registered: {', '.join(missing)}"
        return True, f"{len(self._consumers)} consumers registered"

    def _on_reconnect(self, *_: object) -> None:
        self.metrics.broker_connected.set(1)
        log.info("reconnected to RabbitMQ")

    def _on_close(self, *_: object) -> None:
        self.metrics.broker_connected.set(0)
        if not self._stopping:
            log.warning("connection to RabbitMQ lost; reconnecting")
