"""Every process's status, shared through the broker, so that any replica's status page
shows every communicator type (operator guide, section 14).

Every ``interval_s`` (2 s) each process reads its types' queue depths (passive declares:
work, bulk, parked, dead letters), collects the facts of the types it owns
(:func:`~.status.collect`), and publishes one :class:`~.status.Report` to the fanout
exchange ``<prefix>.status`` with a per-message expiration of ``ttl_s`` (10 s). Each
process reads every report through its own exclusive, auto-delete queue
``<prefix>.status.<hex>``; a report older than ``ttl_s`` counts as gone, so a dead
owner's facts age out and its types show "no owner for N s".

A process learns that it owns a type only from a delivery on the type's work queue; so
when a type has consumers but nobody has claimed it for two intervals, a process puts
one *wake* token on its work queue (as operator tools do, :mod:`.calls`), at most every
10 s, and the idle owner starts reporting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from pydantic import ValidationError

from . import __version__
from .calls import WAKE
from .config import Settings
from .status import (
    Backlog,
    Finals,
    OwnerFacts,
    Process,
    QueueDepth,
    Report,
    StatusReport,
    TypeQueues,
    assemble,
    collect,
    owns,
)
from .topology import TOKEN_HEADER, Names
from .worker import Worker

log = logging.getLogger(__name__)

INTERVAL_S = 2.0  # each process reports every 2 s ...
TTL_S = 10.0  # ... and a report older than 10 s counts as gone
REFRESH_S = 5  # the page reloads itself every 5 s
WAKE_EVERY_S = 10.0
MISSING_RECHECK_S = 30.0  # a queue that does not exist (yet) is looked for again after 30 s
_MIN_SCRUBBED = 4


class StatusBoard:
    """Publishes this process's report, keeps every process's, and builds the page's facts."""

    def __init__(self, settings: Settings, finals: Finals, *, interval_s: float = INTERVAL_S,
                 ttl_s: float = TTL_S) -> None:
        self.settings = settings
        self.finals = finals
        self.names = Names.from_settings(settings)
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self.me = Process(host=socket.gethostname(), pid=os.getpid())
        self.instance = uuid.uuid4().hex
        self.started_at = datetime.now(UTC)
        self._listening_since = time.monotonic()
        self._workers: Mapping[str, Worker] = {}
        self._backlogs = {ct.name: Backlog() for ct in settings.communicator_types}
        self._heard: dict[str, tuple[Report, float]] = {}  # instance -> (report, monotonic)
        self._owner_heard: dict[str, float] = {}  # type name -> monotonic
        self._woken: dict[str, float] = {}
        self._missing: dict[str, float] = {}  # queue name -> monotonic when found missing
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._declarer: AbstractChannel | None = None
        self._task: asyncio.Task[None] | None = None
        self.connected = False
        self._secrets = _secrets(settings)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, connection: AbstractConnection, workers: Mapping[str, Worker]) -> None:
        """Listen to every process's reports and start reporting (the exchange is declared
        with the rest of the topology)."""
        self._connection, self._workers = connection, workers
        self._channel = channel = await connection.channel()
        self._exchange = await channel.get_exchange(self.names.status_exchange, ensure=False)
        queue = await channel.declare_queue(self.names.status_queue(), durable=False,
                                            exclusive=True, auto_delete=True)
        await queue.bind(self.names.status_exchange)
        await queue.consume(self._heard_report, no_ack=True)
        self._listening_since = time.monotonic()
        self._task = asyncio.create_task(self._run(), name="status board")

    async def stop(self) -> None:
        """Stop reporting; tell the others this process is gone (best effort)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self._publish(self._report({}, None, owned=[], stopping=True))
        for channel in (self._declarer, self._channel):
            if channel is not None:
                with contextlib.suppress(Exception):
                    await channel.close()

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                await self.tick()
            except Exception as exc:  # the broker away, say: the next tick tries again
                self.connected = False
                if not failing:  # once per outage, not every 2 s
                    log.warning("status report not published (the status page shows only "
                                "this process until it is): %s: %s", type(exc).__name__, exc)
                failing = True
            else:
                if failing:
                    log.info("status report published again")
                failing = False
            await asyncio.sleep(self.interval_s)

    # -- reporting -------------------------------------------------------------------------

    async def tick(self) -> None:
        """Read the queues, collect the owned types' facts, publish this process's report."""
        try:
            queues, dead = await self._depths()
        except Exception:  # the broker away: this process's own facts are still worth showing
            queues, dead = {}, None
            self._declarer = None
        owned = [self._scrubbed(collect(worker, self.finals, queues.get(name, TypeQueues()),
                                        self._backlogs[name]))
                 for name, worker in self._workers.items() if owns(worker)]
        report = self._report(queues, dead, owned=owned)
        self._remember(report, time.monotonic())
        await self._publish(report)
        await self._wake(queues)

    def _report(self, queues: dict[str, TypeQueues], dead: int | None, *,
                owned: list[OwnerFacts], stopping: bool = False) -> Report:
        return Report(instance=self.instance, host=self.me.host, pid=self.me.pid,
                      version=__version__, started_at=self.started_at,
                      sent_at=datetime.now(UTC), owned=owned, queues=queues,
                      dead_letters=dead, stopping=stopping)

    async def _publish(self, report: Report) -> None:
        if self._exchange is None:
            return
        try:
            await self._exchange.publish(aio_pika.Message(
                report.model_dump_json().encode(), content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT, expiration=self.ttl_s),
                routing_key="")
        except Exception:
            self.connected = False
            raise
        self.connected = True

    async def _depths(self) -> tuple[dict[str, TypeQueues], int | None]:
        """Every type's queues and the dead letters, by passive declares."""
        out = {}
        for ct in self.settings.communicator_types:
            out[ct.name] = TypeQueues(
                work=await self._depth(self.names.work_queue(ct)),
                bulk=await self._depth(f"{self.names.prefix}.bulk.{ct.slug}"),
                parked=await self._depth(self.names.parked_queue(ct)))
        dead = await self._depth(self.names.dead_queue)
        return out, None if dead is None else dead.ready

    async def _depth(self, name: str) -> QueueDepth | None:
        """Ready messages and consumers of queue ``name``; None when it does not exist (it
        is then looked for again only after 30 s: a failed passive declare costs a channel)."""
        missing = self._missing.get(name)
        if missing is not None and time.monotonic() - missing < MISSING_RECHECK_S:
            return None
        if self._declarer is None or self._declarer.is_closed:
            assert self._connection is not None
            self._declarer = await self._connection.channel()
        try:
            queue = await self._declarer.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:  # NOT_FOUND closes the channel
            self._missing[name] = time.monotonic()
            with contextlib.suppress(Exception):
                await self._declarer.close()
            self._declarer = None
            return None
        self._missing.pop(name, None)
        result = queue.declaration_result
        return QueueDepth(ready=int(result.message_count or 0),
                          consumers=int(result.consumer_count or 0))

    async def _wake(self, queues: Mapping[str, TypeQueues]) -> None:
        """A wake token for each type with consumers that nobody has claimed for a while."""
        assert self._channel is not None
        now = time.monotonic()
        if now - self._listening_since < 2 * self.interval_s:
            return  # the others' reports have not all arrived yet
        claimed = {f.communicator_type for r, at in self._heard.values()
                   if now - at <= self.ttl_s for f in r.owned}
        for ct in self.settings.communicator_types:
            work = queues.get(ct.name, TypeQueues()).work
            if (ct.name in claimed or work is None or work.consumers == 0
                    or now - self._owner_heard.get(ct.name, float("-inf")) < 2 * self.interval_s
                    or now - self._woken.get(ct.name, float("-inf")) < WAKE_EVERY_S):
                continue
            self._woken[ct.name] = now
            await self._channel.default_exchange.publish(aio_pika.Message(
                b"{}", headers={TOKEN_HEADER: WAKE},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=self.names.work_queue(ct))

    # -- listening -------------------------------------------------------------------------

    async def _heard_report(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            report = Report.model_validate_json(message.body)
        except ValidationError as exc:
            log.warning("a status report that is not one (%d problems): ignored",
                        exc.error_count())
            return
        if report.instance != self.instance:
            self._remember(report, time.monotonic())

    def _remember(self, report: Report, at: float) -> None:
        if report.stopping:
            self._heard.pop(report.instance, None)
            return
        self._heard[report.instance] = (report, at)
        for facts in report.owned:
            self._owner_heard[facts.communicator_type] = at

    # -- the page --------------------------------------------------------------------------

    def snapshot(self) -> StatusReport:
        """The page's facts now (no broker I/O: what the reports said)."""
        now = time.monotonic()
        for instance, (_, at) in list(self._heard.items()):
            if now - at > self.ttl_s:
                del self._heard[instance]
        no_owner = {ct.name: now - max(self._owner_heard.get(ct.name, float("-inf")),
                                       self._listening_since)
                    for ct in self.settings.communicator_types}
        return assemble(
            self.settings, [(r, now - at) for r, at in self._heard.values()], me=self.me,
            no_owner_s=no_owner, broker_connected=self.connected, refresh_s=REFRESH_S,
            ttl_s=self.ttl_s)

    def _scrubbed(self, facts: OwnerFacts) -> OwnerFacts:
        """The facts with any configured user name, API key or AMQP password removed from
        the error texts (Control Center's own messages are shown)."""
        if not self._secrets:
            return facts
        failures = [f.model_copy(update={"message": self._scrub(f.message)})
                    for f in facts.failures]
        paused = facts.paused and facts.paused.model_copy(
            update={"message": self._scrub(facts.paused.message)})
        return facts.model_copy(update={"failures": failures, "paused": paused})

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _secrets(settings: Settings) -> list[str]:
    """The configuration's secrets (and user names) long enough to scrub safely."""
    out = []
    for ct in settings.communicator_types:
        out.append(ct.username)
        if ct.api_key is not None:
            out.append(ct.api_key.get_secret_value())
    for url in settings.amqp_urls:
        with contextlib.suppress(ValueError):
            parts = urlsplit(url)
            out += [parts.password or "", parts.username or ""]
    return sorted({s for s in out if len(s) >= _MIN_SCRUBBED}, key=len, reverse=True)
