"""The connection to RabbitMQ: one node or a cluster's nodes, reconnecting with back-off.

``amqp_url`` may list a cluster's nodes (README, Configuration reference; operator guide,
section 10).
:func:`connect` tries them in order until one answers, backing off (1 s doubling to 30 s) after
a round in which none did. The connection is aio-pika's robust one — after a loss it reconnects
and restores channels and consumers by itself — with one change: each reconnection attempt goes
to the *next* node, so when the node we were on stops, we move to one that is up instead of
waiting for it. Quorum queues keep their messages on the remaining nodes.

:class:`Watchdog` checks every few seconds that each consumer is still registered on the
broker (aio-pika can lose one silently across reconnects) and registers a lost one again.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractQueue, AbstractRobustConnection
from aio_pika.robust_connection import RobustConnection
from prometheus_client import Gauge
from yarl import URL

from .config import redact_url

log = logging.getLogger(__name__)

RECONNECT_MIN_S = 1.0
RECONNECT_MAX_S = 30.0


class ClusterConnection(RobustConnection):
    """A robust connection that moves to the next node on every reconnection attempt.

    aio-pika reads ``url`` once per connection attempt; here that read hands out the
    nodes in turn, starting with the one the first connection succeeded on.
    """

    def __init__(self, url: URL, *args: Any, nodes: Sequence[str] = (), **kwargs: Any):
        self._nodes = [URL(n) for n in nodes] or [URL(url)]
        self._next = 0
        self._current = self._nodes[0]
        super().__init__(url, *args, **kwargs)

    @property
    def url(self) -> URL:
        self._current = self._nodes[self._next % len(self._nodes)]
        self._next += 1
        return self._current

    @url.setter
    def url(self, value: URL) -> None:  # aio-pika sets it in __init__ and update_secret
        self._nodes = [n if n != self._current else URL(value) for n in self._nodes]

    def start_at(self, index: int) -> None:
        self._next = index

    def __str__(self) -> str:
        return redact_url(str(self._current))

    @property
    def node(self) -> str:
        """The node of the current (or last) connection, without its password."""
        return redact_url(str(self._current))


async def connect(urls: Sequence[str], name: str) -> AbstractRobustConnection:
    """Connect to the first node that answers, retrying rounds with back-off until one does."""
    delay = RECONNECT_MIN_S
    while True:
        for index, url in enumerate(urls):
            try:
                connection = ClusterConnection(
                    URL(url), nodes=urls, reconnect_interval=RECONNECT_MIN_S,
                    client_properties={"connection_name": name})
                connection.start_at(index)
                await connection.connect()
                log.info("connected to RabbitMQ at %s", connection.node)
                return connection
            except (OSError, aio_pika.exceptions.AMQPError, ConnectionError) as exc:
                log.warning("RabbitMQ at %s does not answer (%s)", redact_url(url),
                            type(exc).__name__)
        log.warning("no RabbitMQ node answers; trying again in %.0f s", delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, RECONNECT_MAX_S)


async def connect_once(urls: Sequence[str], *, timeout_s: float = 10,
                       name: str = "jasper-consumer tools") -> aio_pika.abc.AbstractConnection:
    """A plain connection (operator tools) to the first node that answers; raises the last
    node's error when none does."""
    error: BaseException | None = None
    for url in urls:
        try:
            return await aio_pika.connect(url, timeout=timeout_s,
                                          client_properties={"connection_name": name})
        except (OSError, TimeoutError, aio_pika.exceptions.AMQPError, ConnectionError) as exc:
            error = exc
    assert error is not None
    raise error


class Link:
    """Whether the connection is up (for ``/readyz`` and ``jasper_broker_connected``), and
    the back-off of reconnection attempts while it is not (aio-pika retries at a fixed
    interval: this doubles it, 1 s to 30 s, and resets it once connected)."""

    def __init__(self, connection: AbstractRobustConnection, gauge: Gauge) -> None:
        self._connection = connection
        self._gauge = gauge
        self.up = True
        self.closing = False
        self._backing_off: asyncio.Task[None] | None = None
        gauge.set(1)
        connection.reconnect_callbacks.add(self._reconnected)
        connection.close_callbacks.add(self._closed)

    def _reconnected(self, *_: object) -> None:
        self.up = True
        self._gauge.set(1)
        log.info("reconnected to RabbitMQ at %s", getattr(self._connection, "node", ""))

    def _closed(self, *_: object) -> None:
        self.up = False
        self._gauge.set(0)
        if self.closing:
            return
        log.warning("connection to RabbitMQ lost; reconnecting (next node first)")
        if self._backing_off is None or self._backing_off.done():
            self._backing_off = asyncio.create_task(self._back_off())

    async def _back_off(self) -> None:
        interval = RECONNECT_MIN_S
        while not self.up and not self.closing:
            self._connection.reconnect_interval = interval  # type: ignore[attr-defined]
            await asyncio.sleep(interval)
            interval = min(interval * 2, RECONNECT_MAX_S)
        self._connection.reconnect_interval = RECONNECT_MIN_S  # type: ignore[attr-defined]

    async def close(self) -> None:
        self.closing = True
        if self._backing_off is not None:
            self._backing_off.cancel()
        await self._connection.close()  # unacked messages return, in order
        self.up = False
        self._gauge.set(0)


class Consumer(Protocol):
    queue: AbstractQueue | None
    consumer_tag: str | None

    async def restart(self) -> None: ...  # register again (a worker gives its type back)


async def registered(consumer: Consumer) -> bool:
    """Whether the consumer's tag is live on an open channel as the client library sees it
    (aiormq keeps a closed channel's ``consumers``: the channel must be open too).

    On a single-active-consumer queue another replica's consumer keeps the broker's
    count above 0, so the count alone cannot tell that this one vanished.
    """
    if consumer.queue is None or consumer.consumer_tag is None:
        return False
    try:
        underlay = await asyncio.wait_for(consumer.queue.channel.get_underlay_channel(), 1)
    except Exception:  # channel closed or being restored
        return False
    if getattr(underlay, "is_closed", True):
        return False
    return consumer.consumer_tag in getattr(underlay, "consumers", {})


class Watchdog:
    """Re-registers consumers that vanished; ``problem`` feeds ``/readyz``."""

    def __init__(self, connection: AbstractRobustConnection,
                 consumers: Callable[[], Sequence[tuple[str, Consumer]]]) -> None:
        self._connection = connection
        self._consumers = consumers
        self._missing: set[str] = set()  # seen missing once (a quorum queue's count can lag)
        self._restarting: set[str] = set()

    async def check(self) -> str | None:
        """Ask the broker whether each queue we consume still has a consumer; repair."""
        if self._connection.is_closed:
            return "not connected to RabbitMQ"
        channel = await self._connection.channel()
        try:
            for name, consumer in self._consumers():
                queue = consumer.queue
                ok = queue is not None and (await channel.declare_queue(
                    queue.name, passive=True)).declaration_result.consumer_count
                if ok and await registered(consumer):
                    self._missing.discard(name)
                elif name not in self._missing:
                    self._missing.add(name)
                else:  # missing twice in a row: a quorum queue's count can lag once
                    log.error("consumer on %s vanished; registering it again", name,
                              extra={"fields": {"queue": queue.name if queue else name}})
                    self._missing.discard(name)
                    self._restarting.add(name)
                    _spawn_restart(consumer, functools.partial(self._restarting.discard, name))
            if self._restarting:
                return f"registering again: {', '.join(sorted(self._restarting))}"
        finally:
            await channel.close()
        return None


def _spawn_restart(consumer: Consumer, done: Callable[[], None]) -> None:
    """Register a vanished consumer again. A worker gives its type back first (closes its
    channel, dropping every bit of owner state), so that this process never goes on
    calling an account while the broker has handed its queue to another replica."""
    def finished(task: asyncio.Task[None]) -> None:
        done()
        if not task.cancelled() and task.exception() is not None:
            log.error("registering a consumer again failed", exc_info=task.exception())

    asyncio.create_task(consumer.restart(), name="re-register a consumer").add_done_callback(
        finished)


def event_message(body: bytes, *, priority: int | None = None, **properties: Any
                  ) -> aio_pika.Message:
    """A message as a producer publishes an event: persistent JSON, and no AMQP ``priority``
    unless one is given (1 to 4 marks bulk work: operator guide, section 13; aio-pika would
    send 0 for "none")."""
    message = aio_pika.Message(body, content_type="application/json",
                               delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **properties)
    message.priority = priority
    return message


async def publish_event(exchange: AbstractExchange, event: dict[str, Any],
                        priority: int | None = None) -> None:
    """Publish ``event`` as a producer does (persistent JSON, ``message_id`` = event id,
    routing key ``event.<code>``); returns once the broker confirms it, where the channel
    has confirms."""
    await exchange.publish(
        event_message(json.dumps(event).encode(), priority=priority,
                      message_id=event["event_id"]),
        routing_key=f"event.{event['event_code']}")
