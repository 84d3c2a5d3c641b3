"""The connection to RabbitMQ: one node or a cluster's nodes, reconnecting with back-off.

``amqp_url`` may list a cluster's nodes (README, Configuration reference; operator guide,
section 10). :func:`connect` tries them in order until one answers, backing off (1 s
doubling to 30 s) after a round in which none did. Every attempt — TCP, TLS and AMQP
handshakes together — is bounded by :data:`CONNECT_TIMEOUT_S`, so a node that drops packets
costs seconds, not the minutes of the kernel's SYN retries. The connection is aio-pika's
robust one — after a loss it reconnects and restores channels and consumers by itself — with
one change: each reconnection attempt goes to the *next* node, so when the node we were on
stops, we move to one that is up instead of waiting for it. Quorum queues keep their
messages on the remaining nodes.

TLS (``amqps://`` with ``cafile``, ``certfile``, ``keyfile``) is always verified. A
certificate that does not verify is a setting to fix, not an outage: at start-up
:func:`connect` raises :class:`~.errors.BrokerUntrusted` naming the host and what failed
(unknown CA, another host name, expired); once running, :class:`Link` keeps retrying and
says so in the log and in ``/readyz``. :func:`failure_words` puts every failed attempt
in words, without the password.

:class:`Watchdog` checks every few seconds that each consumer is still registered on the
broker (aio-pika can lose one silently across reconnects) and registers a lost one again.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange, AbstractQueue, AbstractRobustConnection
from aio_pika.robust_connection import RobustConnection
from prometheus_client import Gauge
from yarl import URL

from . import tls
from .errors import BrokerUnavailable, BrokerUntrusted
from .urls import node_name, redact_url

log = logging.getLogger(__name__)

RECONNECT_MIN_S = 1.0
RECONNECT_MAX_S = 30.0
#: The bound of one connection attempt (TCP connect, TLS and AMQP handshakes).
CONNECT_TIMEOUT_S = 5.0
_CONNECT_ERRORS = (OSError, TimeoutError, aio_pika.exceptions.AMQPError, ConnectionError)


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
    def url(self, value: URL) -> None:
        # aio-pika sets it in __init__ (one of the nodes: nothing to change) and in
        # update_secret (the same user's new password: it holds on every node).
        value = URL(value)
        if value in self._nodes:
            return
        self._nodes = [n.with_password(value.password) if n.user == value.user else n
                       for n in self._nodes]
        self._current = value

    def start_at(self, index: int) -> None:
        self._next = index

    def __str__(self) -> str:
        return redact_url(str(self._current))

    @property
    def node(self) -> str:
        """The node of the current (or last) connection, without its password."""
        return redact_url(str(self._current))

    @property
    def node_url(self) -> str:
        """The current (or last) node's URL, secrets included (for :func:`failure_words`)."""
        return str(self._current)


def failure_words(exc: BaseException | None, url: str) -> str:
    """Why a connection attempt to ``url`` failed, in words, naming the node: never the
    password, never a client library's raw message."""
    where = f"RabbitMQ at {node_name(url)}"
    host = urlsplit(url).hostname or ""
    with_cert = "certfile" in urlsplit(url).query
    cert = tls.verification_error(exc)
    words: str
    if cert is not None:
        words = tls.verification_words(cert, host)
        if words.startswith("signed by an unknown CA"):
            advice = "set cafile in amqp_url to the CA that signed the broker's certificate"
        elif words.startswith("issued for another host name"):
            advice = "use a host name the certificate is for in amqp_url"
        elif words == "expired":
            advice = "the broker's certificate must be renewed (or this host's clock is wrong)"
        else:
            advice = "check the broker's certificate"
        return _scrub(f"{where}: TLS certificate not trusted: {words}; {advice}", url)
    if isinstance(exc, TimeoutError):
        words = f"did not answer within {CONNECT_TIMEOUT_S:g} s"
    elif isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        words = "refused the login: check the user name and password in amqp_url"
    elif isinstance(exc, aiormq.exceptions.IncompatibleProtocolError):
        words = ("closed the connection before the AMQP handshake (for a TLS port, use "
                 "amqps://)")
    elif (handshake := tls.ssl_error(exc)) is not None:
        words = f"failed the TLS handshake: {tls.handshake_words(handshake, 'the broker')}"
    else:
        words = _os_words(exc, url)
        if with_cert and "reset" in words:
            words += (" (right after the TLS handshake: the broker may have refused the client "
                      "certificate; check certfile and keyfile, and that the broker trusts "
                      "their CA)")
        elif url.startswith("amqp://") and "reset" in words:
            words += " (if that port speaks TLS, use amqps://)"
    return _scrub(f"{where} {words}", url)


def _os_words(exc: BaseException | None, url: str) -> str:
    chain: list[BaseException] = []
    while exc is not None and all(exc is not c for c in chain):  # aiormq wraps the OS error
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for kind, words in ((socket.gaierror, "cannot be found: DNS lookup of the host name failed"),
                        (ConnectionRefusedError,
                         "refused the connection (nothing listens on that port?)"),
                        (ConnectionResetError, "reset the connection")):
        if any(isinstance(c, kind) for c in chain):
            return words
    missing = next((c for c in chain if isinstance(c, FileNotFoundError | PermissionError)),
                   None)
    if missing is not None and any(f in url for f in ("cafile=", "certfile=", "keyfile=")):
        return (f"cannot be reached: a TLS file of amqp_url (cafile, certfile, keyfile) "
                f"cannot be read: {missing.strerror}")
    for c in chain:
        if isinstance(c, OSError) and c.strerror:
            return f"cannot be reached: {c.strerror}"
    return "closed the connection"


def _scrub(text: str, url: str) -> str:
    """A safety net (the words are built from fixed text and the node's name): the URL's
    password, if it is long enough to be told from ordinary words, becomes ``***``."""
    password = urlsplit(url).password
    return text.replace(password, "***") if password and len(password) >= 4 else text


async def connect(urls: Sequence[str], name: str, *,
                  attempt: Callable[[AbstractRobustConnection | None], None] = lambda c: None,
                  ) -> AbstractRobustConnection:
    """Connect to the first node that answers, retrying rounds with back-off until one does.

    ``attempt`` is told of each connection while it is being made (and of None after),
    so that a shutdown can close it; a cancelled start closes it here too. Raises
    :class:`BrokerUntrusted` when a round ends with no connection and a node's
    certificate did not verify.
    """
    delay = RECONNECT_MIN_S
    while True:
        untrusted: list[str] = []
        for index, url in enumerate(urls):
            connection = ClusterConnection(
                URL(url), nodes=urls, reconnect_interval=RECONNECT_MIN_S,
                client_properties={"connection_name": name})
            connection.start_at(index)
            attempt(connection)
            try:
                await connection.connect(timeout=CONNECT_TIMEOUT_S)
            except BaseException as exc:
                # Close it whatever happened: a cancelled attempt left alone keeps
                # aio-pika's reconnection task running, and that task swallows cancels.
                await asyncio.shield(connection.close())
                attempt(None)
                if not isinstance(exc, _CONNECT_ERRORS):
                    raise
                words = failure_words(exc, url)
                log.warning("cannot connect: %s", words)
                if tls.verification_error(exc) is not None:
                    untrusted.append(words)
                continue
            attempt(None)
            log.info("connected to RabbitMQ at %s", connection.node)
            return connection
        if untrusted:
            log.error("not starting: %s", "; ".join(untrusted))
            raise BrokerUntrusted("; ".join(untrusted))
        log.warning("no RabbitMQ node answers; will retry in %.0f s", delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, RECONNECT_MAX_S)


async def connect_once(urls: Sequence[str], *, timeout_s: float = CONNECT_TIMEOUT_S,
                       name: str = "jasper-consumer tools") -> aio_pika.abc.AbstractConnection:
    """A plain connection (operator tools) to the first node that answers; raises
    :class:`BrokerUntrusted` or :class:`BrokerUnavailable`, with every node's failure in
    words, when none does."""
    failures: list[str] = []
    untrusted = False
    for url in urls:
        try:
            return await aio_pika.connect(url, timeout=timeout_s,
                                          client_properties={"connection_name": name})
        except _CONNECT_ERRORS as exc:
            failures.append(failure_words(exc, url))
            untrusted = untrusted or tls.verification_error(exc) is not None
    raise (BrokerUntrusted if untrusted else BrokerUnavailable)("; ".join(failures))


class Link:
    """Whether the connection is up (for ``/readyz`` and ``jasper_broker_connected``), and
    the back-off of reconnection attempts while it is not (aio-pika retries at a fixed
    interval: this doubles it, 1 s to 30 s, and resets it once connected). ``problem``
    is why the last attempt failed, in words (a certificate that no longer verifies, say)."""

    def __init__(self, connection: AbstractRobustConnection, gauge: Gauge) -> None:
        self._connection = connection
        self._gauge = gauge
        self.up = True
        self.closing = False
        self.problem: str | None = None
        self._backing_off: asyncio.Task[None] | None = None
        gauge.set(1)
        connection.reconnect_callbacks.add(self._reconnected)
        connection.close_callbacks.add(self._closed)

    def _reconnected(self, *_: object) -> None:
        self.up = True
        self.problem = None
        self._gauge.set(1)
        log.info("reconnected to RabbitMQ at %s", getattr(self._connection, "node", ""))

    def _closed(self, _sender: object = None, exc: BaseException | None = None,
                *_: object) -> None:
        was_up, self.up = self.up, False
        self._gauge.set(0)
        if self.closing:
            return
        url = getattr(self._connection, "node_url", "")
        if was_up:
            log.warning("connection to RabbitMQ at %s lost; reconnecting (next node first)",
                        redact_url(url))
        elif exc is not None:  # a reconnection attempt failed
            self.problem = failure_words(exc, url)
            untrusted = tls.verification_error(exc) is not None
            log.log(logging.ERROR if untrusted else logging.WARNING,
                    "reconnection failed: %s; retrying", self.problem)
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
