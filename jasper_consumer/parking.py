"""Where a paused type's jobs wait: ``<prefix>.parked.<slug>``, in order, each with its
delayed signal already sent (SPEC §5).

Why a queue of its own: the work queue has a single active consumer whose prefetch is
fixed when it registers, and registering again hands the type to a standby replica.
So the owner never holds a paused type's jobs: it moves each one, as it arrives, to the
parked queue — the move *is* the delayed signal, one publish routed both to the history
exchange and (by a ``BCC`` key) to the parked queue — and acks it on the work queue.
Being in the parked queue is the fact "had its delayed signal": it survives a crash,
a hand-over and a restart, and nobody holds a paused job past the consumer timeout.

While the parked queue is not empty, later jobs of the type go there too (behind the
ones held up), with a delayed signal that says they wait behind the pause's backlog;
after the resume the owner drains it, oldest first, then takes jobs straight from the
work queue again.

A standby learns that it has become the owner only from a delivery on the work queue.
So while jobs are parked, the owner holds one *anchor* token taken from the work queue:
if the owner dies, the anchor returns and wakes the next owner, which then drains the
parked queue. The anchor is renewed before the broker's consumer timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from prometheus_client import Gauge

from .config import Command, CommunicatorType
from .edge import ack
from .errors import JasperConsumerError
from .events import Job
from .history import History, message_id, until_confirmed
from .lanes import Lanes, identity
from .outcomes import ErrorInfo
from .pause import Pause
from .signals import Kind
from .topology import TOKEN_HEADER, Names

log = logging.getLogger(__name__)

STAMP_HEADER = "x-jasper-stamp"
OCCURRED_HEADER = "x-jasper-occurred-at"
REPLAYED_HEADER = "x-jasper-job-replayed"
ORIGIN_HEADER = "x-jasper-origin"


@dataclass(eq=False, slots=True)
class Delivery:
    """A job's message and where it came from."""

    message: AbstractIncomingMessage
    parked: bool  # from the parked queue (else the work queue)
    started: float  # perf_counter when it arrived


class NotAJob(JasperConsumerError, ValueError):
    """A parked message that cannot be read back as a job (dead-lettered)."""


def job_headers(job: Job) -> dict[str, Any]:
    """What a parked job needs beyond its signal's fields to become the same job again."""
    return {STAMP_HEADER: job.stamp,
            OCCURRED_HEADER: job.occurred_at.isoformat() if job.occurred_at else "",
            REPLAYED_HEADER: job.replayed, ORIGIN_HEADER: job.origin or ""}


def read_parked(body: bytes, headers: dict[str, Any]) -> Job:
    """A parked message (a delayed signal plus :func:`job_headers`) → its job."""
    try:
        data = json.loads(body)
        occurred = headers.get(OCCURRED_HEADER) or None
        return Job(
            event_id=data["event_id"], event_code=data["event_code"],
            client_id=data["client_id"], command=Command(data["command"]),
            iccid=data["iccid"], communicator_type=data["communicator_type"],
            occurred_at=datetime.fromisoformat(str(occurred)) if occurred else None,
            stamp=int(headers.get(STAMP_HEADER) or 0),
            replayed=bool(headers.get(REPLAYED_HEADER)),
            origin=str(headers.get(ORIGIN_HEADER) or "") or None,
        )
    except Exception as exc:  # any shape problem: the message cannot be a job
        raise NotAJob(f"parked message is not a job: {type(exc).__name__}") from None


class Parking:
    """The parked queue of one type, seen from its owner."""

    def __init__(
        self,
        ct: CommunicatorType,
        names: Names,
        history: History,
        *,
        open_channel: Callable[[], Awaitable[AbstractChannel]],
        on_job: Callable[[Job, AbstractIncomingMessage], None],
        prefetch: int,
        anchor_refresh_s: float,
        gauge: Gauge | None = None,
    ) -> None:
        self.ct = ct
        self.queue_name = names.parked_queue(ct)
        self.work_queue = names.work_queue(ct)
        self._history = history
        self._open_channel = open_channel
        self._on_job = on_job
        self._prefetch = prefetch
        self._refresh_s = anchor_refresh_s
        self._gauge = gauge
        self._count = 0
        self._channel: AbstractChannel | None = None
        self._anchor: AbstractIncomingMessage | None = None
        self._anchor_since = 0.0
        self._anchoring = False
        self._renewal: asyncio.Task[None] | None = None
        self.renewals = 0  # anchors renewed before the consumer timeout (for tests, logs)

    @property
    def count(self) -> int:
        """Parked messages not yet acked by us (as far as this owner knows)."""
        return self._count

    @count.setter
    def count(self, value: int) -> None:
        self._count = value
        if self._gauge is not None:
            self._gauge.set(value)

    # -- ownership -------------------------------------------------------------------------

    async def take_over(self) -> int:
        """Read how many jobs wait in the parked queue (a new owner calls this first)."""
        channel = await self._open_channel()
        try:
            queue = await channel.declare_queue(self.queue_name, passive=True)
            self.count = int(queue.declaration_result.message_count or 0)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        return self.count

    async def give_up(self) -> None:
        """Ownership lost or shutting down: stop draining; the broker keeps everything."""
        await self.stop_draining()
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None
        self._anchor = None
        self.count = 0

    # -- parking ---------------------------------------------------------------------------

    async def park(self, job: Job, *, error: ErrorInfo, attempts: int, started: float,
                   signalled: bool, paused: bool) -> None:
        """Move ``job`` to the parked queue; unless ``signalled``, this publish is also its
        delayed signal. Returns once the broker has confirmed it."""
        self.count += 1
        try:
            if signalled:  # it had its delayed signal already (a duplicate of a parked job)
                body = json.dumps({"event_id": job.event_id, "event_code": job.event_code,
                                   "client_id": job.client_id, "command": job.command.value,
                                   "iccid": job.iccid,
                                   "communicator_type": job.communicator_type}).encode()
                await self._history.to_queue(self.queue_name, body, message_id(),
                                             job_headers(job))
            else:
                await self._history.report(
                    job, Kind.DELAYED, type_label=self.ct.name, attempts=attempts,
                    started=started, error=error, backlog=not paused,
                    park_key=self.queue_name, park_headers=job_headers(job))
        except BaseException:
            self.count -= 1
            raise
        await self._ensure_anchor()

    # -- the anchor ------------------------------------------------------------------------

    async def _ensure_anchor(self) -> None:
        if self._anchor is not None or self._anchoring or self.count <= 0:
            return
        self._anchoring = True
        try:
            await self._history.to_queue(self.work_queue, b"{}", message_id(),
                                         {TOKEN_HEADER: "anchor"})
        except Exception:
            self._anchoring = False
            raise

    async def token(self, message: AbstractIncomingMessage) -> None:
        """A token arrived on the work queue: keep it as the anchor while jobs are parked."""
        self._anchoring = False
        if self._anchor is None and self.count > 0:
            self._anchor = message
            self._anchor_since = time.monotonic()
            if self._renewal is None or self._renewal.done():
                self._renewal = asyncio.create_task(self._renew(), name=f"anchor {self.ct.name}")
            return
        await ack(message)
        if self.count > 0:
            await self._ensure_anchor()

    async def _renew(self) -> None:
        """Before the consumer timeout: put a fresh anchor in the queue, let the old go."""
        while self._anchor is not None:
            await asyncio.sleep(max(0.0, self._anchor_since + self._refresh_s - time.monotonic()))
            old, self._anchor = self._anchor, None
            if old is None:
                return
            try:
                await self._ensure_anchor()
            finally:
                await ack(old)
            self.renewals += 1

    async def _release_anchor(self) -> None:
        anchor, self._anchor = self._anchor, None
        if anchor is not None:
            await ack(anchor)

    # -- draining --------------------------------------------------------------------------

    async def start_draining(self) -> None:
        """Consume the parked queue (oldest first) and hand each job to ``on_job``."""
        if self._channel is not None or self.count <= 0:
            return
        self._channel = channel = await self._open_channel()
        await channel.set_qos(prefetch_count=self._prefetch)
        queue = await channel.get_queue(self.queue_name, ensure=False)
        await queue.consume(self._delivered)
        await self._ensure_anchor()  # also after a take-over: the next owner must wake up

    async def _delivered(self, message: AbstractIncomingMessage) -> None:
        try:
            job = read_parked(message.body, dict(message.headers or {}))
        except NotAJob as exc:
            await self._history.dead_letter(message.body, str(exc),
                                            message_id=message.message_id)
            await self.acked(message)
            return
        self._on_job(job, message)

    async def acked(self, message: AbstractIncomingMessage) -> bool:
        """Ack a parked job that is done; the last one lets the anchor go."""
        try:
            await message.ack()
        except Exception:
            return False
        self.count = max(0, self.count - 1)
        if self.count == 0:
            await self._release_anchor()
        return True

    async def stop_draining(self) -> None:
        """Close the parked queue's channel: jobs taken but not acked return to its head,
        in order (RabbitMQ returns a closed channel's deliveries in delivery order)."""
        channel, self._channel = self._channel, None
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()


class Parker:
    """Moves jobs to the parked queue in order per SIM, for the owner of a type: a job that
    arrives while jobs are parked, and — when the type pauses — every lane whose call is not
    under way, whole (a lane with a call under way follows once the call ends)."""

    def __init__(self, lanes: Lanes[Delivery], pause: Pause, parking: Parking,
                 spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self._lanes = lanes
        self._pause = pause
        self._parking = parking
        self._spawn = spawn
        self._chains: dict[str, asyncio.Future[None]] = {}
        self._signalled: set[tuple[str, str, str]] = set()  # parked with a signal, or seen there

    @property
    def active(self) -> bool:
        """Jobs go to the parked queue: the type is paused, or others wait there."""
        return self._pause.error is not None or self._parking.count > 0

    def wants(self, job: Job) -> bool:
        """A job from the work queue is parked while :attr:`active`, unless its SIM has
        work here from before the pause (it joins that, in order), or it needs no call
        (a remembered duplicate, a superseded job)."""
        if not self.active:
            self._signalled.clear()  # nothing parked: no duplicate of a parked job can matter
            return False
        lane = self._lanes.lane(job.iccid)
        if lane and not any(m.payload.parked for e in lane for m in e.members):
            return False
        return self._lanes.known(job) is None

    def seen(self, job: Job) -> None:
        """A job read back from the parked queue had its delayed signal."""
        self._signalled.add(identity(job))

    def park(self, job: Job, delivery: Delivery) -> None:
        self._spawn(self._chain(job.iccid, self._park(job, delivery, 0)))

    def park_lane(self, iccid: str) -> None:
        """While paused, move the SIM's lane once no call of it is under way."""
        if self._pause.error is not None:
            self._spawn(self._chain(iccid, self._park_lane(iccid)))

    async def paused(self) -> None:
        """The type paused: parked jobs taken but not started go back to the head of their
        queue (closing its channel), every other lane is moved."""
        await self._parking.stop_draining()
        self._lanes.drop(lambda delivery: not delivery.parked)
        for iccid in self._lanes.iccids():
            self.park_lane(iccid)

    def clear(self) -> None:
        self._chains.clear()
        self._signalled.clear()

    async def _chain(self, iccid: str, step: Awaitable[None]) -> None:
        """Run ``step`` after every parking step already chained for the SIM."""
        previous = self._chains.get(iccid)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._chains[iccid] = mine
        try:
            if previous is not None:
                await asyncio.shield(previous)
            await step
        finally:
            mine.set_result(None)
            if self._chains.get(iccid) is mine:
                del self._chains[iccid]

    async def _park_lane(self, iccid: str) -> None:
        if self._pause.error is None:
            return
        for entry in self._lanes.take_lane(iccid):
            for i, member in enumerate(entry.members):
                await self._park(member.job, member.payload, entry.attempts if i == 0 else 0)

    async def _park(self, job: Job, delivery: Delivery, attempts: int) -> None:
        if delivery.parked:
            return  # a parked job not started: its channel closed and returned it
        key = identity(job)
        await until_confirmed(lambda: self._parking.park(
            job, error=self._pause.error or self._pause.last_error, attempts=attempts,
            started=delivery.started, signalled=key in self._signalled,
            paused=self._pause.error is not None), f"parking a job of {job.communicator_type}")
        self._signalled.add(key)
        await ack(delivery.message)
