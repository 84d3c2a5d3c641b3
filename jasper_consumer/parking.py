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
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from .config import Command, CommunicatorType
from .errors import JasperConsumerError
from .events import Job
from .history import History, message_id
from .outcomes import ErrorInfo
from .signals import Kind
from .topology import Names

log = logging.getLogger(__name__)

TOKEN_HEADER = "x-jasper-token"  # a token on a work queue: "anchor" (the owner's) or "wake"
STAMP_HEADER = "x-jasper-stamp"
OCCURRED_HEADER = "x-jasper-occurred-at"
REPLAYED_HEADER = "x-jasper-job-replayed"
ORIGIN_HEADER = "x-jasper-origin"


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
    ) -> None:
        self.ct = ct
        self.queue_name = names.parked_queue(ct)
        self.work_queue = names.work_queue(ct)
        self._history = history
        self._open_channel = open_channel
        self._on_job = on_job
        self._prefetch = prefetch
        self._refresh_s = anchor_refresh_s
        self.count = 0  # parked messages not yet acked by us (as far as this owner knows)
        self._channel: AbstractChannel | None = None
        self._anchor: AbstractIncomingMessage | None = None
        self._anchor_since = 0.0
        self._anchoring = False
        self._renewal: asyncio.Task[None] | None = None
        self.renewals = 0  # anchors renewed before the consumer timeout (for tests, logs)

    @property
    def draining(self) -> bool:
        return self._channel is not None

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
        with contextlib.suppress(Exception):
            await message.ack()
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
                with contextlib.suppress(Exception):
                    await old.ack()
            self.renewals += 1

    async def _release_anchor(self) -> None:
        anchor, self._anchor = self._anchor, None
        if anchor is not None:
            with contextlib.suppress(Exception):
                await anchor.ack()

    # -- draining --------------------------------------------------------------------------

    async def start_draining(self) -> None:
        """Consume the parked queue (oldest first) and hand each job to ``on_job``."""
        if self._channel is not None or self.count <= 0:
            return
        self._channel = channel = await self._open_channel()
        await channel.set_qos(prefetch_count=self._prefetch)
        queue = await channel.get_queue(self.queue_name, ensure=False)
        await queue.consume(self._delivered)

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
