"""Where a paused type's jobs wait: ``<prefix>.parked.<slug>``, in order, each with its
delayed signal already sent (operator guide, section 5).

Why a queue of its own: the work queue has a single active consumer whose prefetch is
fixed when it registers, and registering again hands the type to a standby replica.
So the owner never holds a paused type's jobs: it moves each one, as it arrives, to the
parked queue — the move *is* the delayed signal, one publish routed both to the history
exchange and (by a ``BCC`` key) to the parked queue — and then acks it where it came
from (the work queue or the bulk queue). Being in the parked queue is the fact "had its
delayed signal": it survives a crash, a hand-over and a restart, and nobody holds a
paused job past the consumer timeout. The only window: a crash after the publish is
confirmed and before the ack reaches the broker (one publish) — the job comes back and
is parked, and signalled, again.

While the parked queue is not empty, later jobs of the type go there too (behind the
ones held up), with a delayed signal that says they wait behind the pause's backlog;
after the resume the owner drains it, oldest first, then takes jobs straight from the
work and bulk queues again.

:class:`ParkRules` holds the decisions and does no I/O (tests/test_parking.py drives it
through pauses, resumes, re-pauses, crashes, hand-backs and failed publishes and acks);
:class:`Parking` performs them on the broker; :class:`Parker` keeps the moves of each SIM
in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from enum import Enum
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from prometheus_client import Gauge

from .config import CommunicatorType
from .edge import Acks
from .errors import NotAJob
from .events import Job, job_headers, read_parked
from .history import History, message_id, until_confirmed
from .lanes import Lanes, Source
from .memory import Identity, identity
from .outcomes import ErrorInfo
from .signals import Kind
from .topology import ATTEMPTS_HEADER, Names

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class Delivery:
    """A job's message and where it came from."""

    message: AbstractIncomingMessage
    source: Source
    started: float  # perf_counter when it arrived
    prior: int = 0  # calls made for it before it was parked (its signal counts them too)

    @property
    def parked(self) -> bool:
        return self.source is Source.PARKED


class BulkMode(Enum):
    """What the owner does with its bulk queue (see :meth:`ParkRules.bulk_mode`)."""

    PULL = "pull"  # take jobs for calls
    PARK = "park"  # paused: move every job to the parked queue, each with its signal
    HOLD = "hold"  # a pause's backlog drains: leave bulk jobs where they are, in order


class ParkRules:
    """The parking decisions of one owner; no I/O. The shell reports what happened
    (:meth:`parked`, :meth:`read_back`, :meth:`acked`, :meth:`returned`) and asks."""

    def __init__(self) -> None:
        self.count = 0  # parked jobs not yet acked, as far as this owner knows
        self.held = 0  # parked jobs delivered to this owner and not settled
        self.draining = False  # consuming the parked queue
        self._signalled: set[Identity] = set()  # parked with a signal, or read back

    def active(self, paused: bool) -> bool:
        """Jobs go to the parked queue: the type is paused, or others wait there."""
        return paused or self.count > 0

    def wants(self, job: Job, *, paused: bool, lane_here: bool, known: bool) -> bool:
        """Whether a job from the work or bulk queue is parked: while :meth:`active`,
        unless its SIM has work here from before the pause (``lane_here``: it joins that,
        in order), or it needs no call (``known``: a remembered duplicate, a superseded
        job)."""
        if not self.active(paused):
            self._signalled.clear()  # nothing parked: no duplicate of a parked job matters
            return False
        return not lane_here and not known

    def needs_signal(self, job: Job) -> bool:
        """A job parked again (a duplicate of a parked job) gets no second signal."""
        return identity(job) not in self._signalled

    def parked(self, job: Job) -> None:
        """Its move was confirmed: it is in the parked queue, signalled."""
        self.count += 1
        self._signalled.add(identity(job))

    def read_back(self, job: Job) -> None:
        """A parked job was delivered to this owner (it had its delayed signal)."""
        self._signalled.add(identity(job))
        self.held += 1

    def acked(self) -> None:
        """A parked job was acked: it left the parked queue."""
        self.count = max(0, self.count - 1)
        self.held = max(0, self.held - 1)

    def returned(self, jobs: int) -> None:
        """``jobs`` parked deliveries went back to the queue (their channel closed)."""
        self.held = max(0, self.held - jobs)

    def should_drain(self, paused: bool) -> bool:
        return not paused and self.count > 0 and not self.draining

    def bulk_mode(self, paused: bool) -> BulkMode:
        if paused:
            return BulkMode.PARK
        return BulkMode.HOLD if self.count > 0 else BulkMode.PULL

    def drained(self) -> bool:
        """No parked job is left here or in the queue (the parked queue is no source of
        older jobs any more)."""
        return self.count == 0 and self.held == 0

    def more_behind(self) -> bool:
        """The parked queue holds jobs beyond those delivered here."""
        return self.count > self.held

    def forget(self) -> None:
        """Ownership lost: the broker keeps everything."""
        self.count = self.held = 0
        self.draining = False
        self._signalled.clear()


class Parking:
    """The parked queue of one type, seen from its owner: moves and draining."""

    def __init__(
        self,
        ct: CommunicatorType,
        names: Names,
        history: History,
        *,
        open_channel: Callable[[], Awaitable[AbstractChannel]],
        acks: Acks,
        prefetch: int,
        gauge: Gauge | None = None,
    ) -> None:
        self.ct = ct
        self.acks = acks
        self.rules = ParkRules()
        self.queue_name = names.parked_queue(ct)
        self._history = history
        self._open_channel = open_channel
        self._on_job: Callable[[Job, AbstractIncomingMessage], None] | None = None
        self._prefetch = prefetch
        self._gauge = gauge
        self._channel: AbstractChannel | None = None
        self._tag: str | None = None

    def _show(self) -> None:
        if self._gauge is not None:
            self._gauge.set(self.rules.count)

    def deliver_to(self, on_job: Callable[[Job, AbstractIncomingMessage], None]) -> None:
        """Where drained jobs go (the worker, once it is built)."""
        self._on_job = on_job

    async def take_over(self) -> int:
        """Read how many jobs wait in the parked queue (a new owner calls this first)."""
        channel = await self._open_channel()
        try:
            queue = await channel.declare_queue(self.queue_name, passive=True)
            self.rules.count = int(queue.declaration_result.message_count or 0)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        self._show()
        return self.rules.count

    async def move(self, job: Job, *, error: ErrorInfo, attempts: int, started: float,
                   backlog: bool) -> None:
        """Put ``job`` in the parked queue with its delayed signal (one publish), or without
        one if it had it already; returns once the broker has confirmed it."""
        headers = {**job_headers(job), ATTEMPTS_HEADER: attempts}
        if not self.rules.needs_signal(job):
            body = json.dumps({"event_id": job.event_id, "event_code": job.event_code,
                               "client_id": job.client_id, "command": job.command.value,
                               "iccid": job.iccid,
                               "communicator_type": job.communicator_type}).encode()
            await self._history.to_queue(self.queue_name, body, message_id(), headers,
                                         pipelined=True)
        else:
            await self._history.report(
                job, Kind.DELAYED, type_label=self.ct.name, attempts=attempts,
                started=started, error=error, backlog=backlog, park_key=self.queue_name,
                park_headers=headers)
        self.rules.parked(job)
        self._show()

    async def start_draining(self, *, paused: bool = False) -> None:
        """Consume the parked queue (oldest first), handing each job to ``on_job`` — not
        while ``paused`` (the resume starts it then). On a failure nothing is left
        half-open: the channel is closed and the error raised."""
        if not self.rules.should_drain(paused=paused):
            return
        self.rules.draining = True
        try:
            channel = await self._open_channel()
            try:
                await channel.set_qos(prefetch_count=self._prefetch)
                queue = await channel.get_queue(self.queue_name, ensure=False)
                self._tag = await queue.consume(self._delivered)
            except BaseException:
                with contextlib.suppress(Exception):
                    await channel.close()
                raise
        except BaseException:
            self.rules.draining = False
            raise
        self._channel = channel

    async def _delivered(self, message: AbstractIncomingMessage) -> None:
        try:
            job = read_parked(message.body, dict(message.headers or {}))
        except NotAJob as exc:
            await self._history.dead_letter(message.body, str(exc),
                                            message_id=message.message_id)
            await self.acks.ack(message)
            self.rules.count = max(0, self.rules.count - 1)
            self._show()
            return
        self.rules.read_back(job)
        assert self._on_job is not None, "Parking.deliver_to was not called"
        self._on_job(job, message)

    async def acked(self, message: AbstractIncomingMessage) -> bool:
        """Ack a parked job that is done."""
        if not await self.acks.ack(message):
            return False
        self.rules.acked()
        self._show()
        return True

    async def stop_draining(self, settled: Callable[[], Awaitable[None]] | None = None,
                            returned: int = 0) -> None:
        """Stop taking parked jobs; wait for ``settled`` (the parked jobs whose calls are
        under way to settle, so that none is acked on a closed channel); then close the
        channel: jobs taken but not acked return to its head, in order (RabbitMQ returns
        a closed channel's deliveries in delivery order)."""
        channel, tag, self._channel, self._tag = self._channel, self._tag, None, None
        if channel is None:
            self.rules.draining = False
            return
        with contextlib.suppress(Exception):
            if tag is not None:
                await (await channel.get_queue(self.queue_name, ensure=False)).cancel(tag)
        try:
            if settled is not None:
                await settled()
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
            self.rules.returned(self.rules.held)
            self.rules.draining = False

    async def give_up(self) -> None:
        """Ownership lost or shutting down: stop draining; the broker keeps everything."""
        await self.stop_draining()
        self.rules.forget()
        self._show()


class Parker:
    """Moves jobs to the parked queue in order per SIM, for the owner of a type: a job that
    arrives while jobs are parked, and — when the type pauses — every entry whose call has
    not started (an entry whose call is under way follows once the call ends, if it did
    not apply)."""

    def __init__(self, lanes: Lanes[Delivery], parking: Parking,
                 spawn: Callable[[Coroutine[Any, Any, None]], None],
                 error: Callable[[], ErrorInfo | None], last_error: Callable[[], ErrorInfo],
                 on_moved: Callable[[Delivery], None]) -> None:
        self._lanes = lanes
        self._on_moved = on_moved
        self._parking = parking
        self._spawn = spawn
        self._error = error  # the pause's error, None while running
        self._last_error = last_error
        self._chains: dict[str, asyncio.Future[None]] = {}

    def wants(self, job: Job) -> bool:
        lane = self._lanes.lane(job.iccid)
        lane_here = bool(lane) and not any(m.payload.parked for e in lane for m in e.members)
        return self._parking.rules.wants(job, paused=self._error() is not None,
                                         lane_here=lane_here,
                                         known=self._lanes.known(job) is not None)

    def park(self, job: Job, delivery: Delivery, attempts: int = 0) -> None:
        self._spawn(self._chain(job.iccid, lambda: self._park(job, delivery, attempts)))

    def park_queued(self, iccid: str) -> None:
        """While paused, move the SIM's entries whose call has not started."""
        if self._error() is not None:
            self._spawn(self._chain(iccid, lambda: self._park_queued(iccid)))

    def park_all(self) -> None:
        for iccid in self._lanes.iccids():
            self.park_queued(iccid)

    def clear(self) -> None:
        self._chains.clear()

    async def _chain(self, iccid: str, step: Callable[[], Awaitable[None]]) -> None:
        """Run ``step()`` after every parking step already chained for the SIM (made only
        then: a chain cancelled while it waits leaves no coroutine never awaited)."""
        previous = self._chains.get(iccid)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._chains[iccid] = mine
        try:
            if previous is not None:
                await asyncio.shield(previous)
            await step()
        finally:
            mine.set_result(None)
            if self._chains.get(iccid) is mine:
                del self._chains[iccid]

    async def _park_queued(self, iccid: str) -> None:
        if self._error() is None:
            return
        for entry in self._lanes.take_queued(iccid):
            for i, member in enumerate(entry.members):
                await self._park(member.job, member.payload,
                                 member.payload.prior + (entry.attempts if i == 0 else 0))

    async def _park(self, job: Job, delivery: Delivery, attempts: int) -> None:
        if delivery.parked:
            return  # a parked job not started: its channel closes and returns it
        error = self._error()
        await until_confirmed(lambda: self._parking.move(
            job, error=error or self._last_error(), attempts=attempts,
            started=delivery.started, backlog=error is None),
            f"parking a job of {job.communicator_type}")
        await self._parking.acks.ack(delivery.message)
        self._on_moved(delivery)
