"""What the owner of a type does beside its calls: pull the bulk queue, clear doubts, guard.

* **bulk** — while the type runs and no pause's backlog drains, keep a few bulk jobs in
  hand (``lookahead``: enough for the next bulk calls, never thousands); while it is
  paused, consume the bulk queue by push (:meth:`.BulkQueue.consume`: a few hundred in
  flight) so that each job is parked with its delayed signal within seconds (operator
  guide, section 5), and pull again once it runs; while a pause's backlog drains, leave
  the bulk queue alone (its jobs stay behind the parked ones, in order). An empty bulk
  queue is polled every :data:`POLL_S`.
* **doubts** (:mod:`.lanes`, *cleared*) — a job may start only when no other source can
  still deliver an older job for its SIM. An empty pull clears the bulk queue's doubts; a
  work-queue window that is not full clears the work queue's; an empty parked queue the
  parked queue's. Whatever is still in doubt gets a *guard* in the ownership log
  (:mod:`.ownerlog`), written before its call and in batches.
* **guards** — once every source was seen drained after a guard was made, no older job
  can come any more: the guard goes, and the log is compacted now and then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from aio_pika.abc import AbstractIncomingMessage

from .bulk import BulkQueue
from .lanes import Source
from .parking import BulkMode

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger(__name__)

POLL_S = 1.0  # an empty bulk queue is asked again this often (< 5 s while paused)
COMPACT_EVERY_S = 10.0  # the ownership log is compacted at most this often
COMPACT_AFTER = 1000  # ... or once this many guard records were written since


class Feed:
    """The owner's background loop for one type (started after the take-over's wait)."""

    def __init__(self, worker: Worker, bulk: BulkQueue, *, lookahead: int) -> None:
        self._w = worker
        self.bulk = bulk
        self._lookahead = lookahead
        self._kick = asyncio.Event()
        self._bulk_busy = True  # the last pull found a job (or none was made yet)
        self.pulling = False  # the owner holds the hold: it may take from the bulk queue
        self.drained_at: dict[Source, int] = {}
        self._compacted = 0.0

    def kick(self) -> None:
        self._kick.set()

    async def close(self) -> None:
        """Ownership lost or stopping: the bulk jobs taken and not acked go back."""
        self.pulling = False
        await self.bulk.close()
        self.drained_at.clear()
        self._bulk_busy = True

    async def run(self) -> None:
        while True:
            self._kick.clear()
            try:
                again = await self._round()
            except Exception as exc:  # the broker failed us: said, and tried again
                log.warning("feeding %s failed (%s: %s); trying again", self._w.ct.name,
                            type(exc).__name__, exc)
                await self.bulk.close()
                again = False
            if not again:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_S):
                        await self._kick.wait()

    async def _round(self) -> bool:
        """One pass; True when it should run again at once (it took a bulk job)."""
        w, lanes = self._w, self._w.lanes
        mode = w.parking.rules.bulk_mode(paused=w.pause.error is not None)
        in_doubt = any(Source.BULK in e.doubts for e in lanes.uncleared())
        if self.pulling and mode is BulkMode.PARK:
            await self.bulk.consume(self._pushed)
        elif self.bulk.consuming:
            await self.bulk.stop_consuming()
        if self.pulling and mode is BulkMode.PULL and (
                w.held[Source.BULK] < self._lookahead or (in_doubt and not self._bulk_busy)):
            clock = lanes.clock
            message = await self.bulk.pull()
            if message is not None:
                self._bulk_busy = True
                await w._arrived(message, Source.BULK)
                return True
            self._bulk_busy = False
            if w.pending[Source.BULK] == 0:
                self._drained(Source.BULK, clock)
        if not w.saturated and w.pending[Source.WORK] == 0:
            self._drained(Source.WORK, lanes.clock)
        if w.parking.rules.drained() and w.pending[Source.PARKED] == 0:
            self._drained(Source.PARKED, lanes.clock)
        await self._guard()
        await self._compact()
        return False

    async def _pushed(self, message: AbstractIncomingMessage) -> None:
        """A bulk job pushed while paused: parked like a pulled one. If that fails, the bulk
        channel closes (every job in hand back at the queue's head, in order)."""
        if self._w.stopping:
            return  # not acked: returned in order when the channel closes
        try:
            await self._w._arrived(message, Source.BULK)
        except Exception as exc:
            log.warning("parking a bulk job of %s failed (%s: %s); trying again",
                        self._w.ct.name, type(exc).__name__, exc)
            await self.bulk.close()
            self.kick()

    def _drained(self, source: Source, clock: int) -> None:
        lanes = self._w.lanes
        lanes.resolve(source, clock)
        self.drained_at[source] = clock
        if lanes.guards:
            lanes.forget_guards(self.drained_at)
        self._w.kick()

    async def _guard(self) -> None:
        """One guard record for every entry still in doubt, then they may start."""
        lanes = self._w.lanes
        waiting = lanes.uncleared()
        if not waiting:
            return
        guards = [(entry, lanes.guard_for(entry)) for entry in waiting]
        await self._w.owner_log.append(
            [(entry.iccid, stamp, event_id) for entry, (_, stamp, event_id) in guards])
        for entry, (clock, stamp, event_id) in guards:
            lanes.guarded(entry, clock, stamp, event_id)
        self._w.kick()

    async def _compact(self) -> None:
        owner_log, lanes = self._w.owner_log, self._w.lanes
        if not owner_log.appended or time.monotonic() - self._compacted < COMPACT_EVERY_S:
            return
        if lanes.guards and owner_log.appended < COMPACT_AFTER:
            return
        self._compacted = time.monotonic()
        await owner_log.compact((i, g.stamp, g.event_id) for i, g in lanes.guards.items())
