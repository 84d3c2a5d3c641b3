"""Stage 2, one per communicator type: take jobs from its work queue, apply them, settle.

The work queue has a single active consumer: the process whose consumer is active owns
the type, and only it calls the account (SPEC §6). A process learns that it owns the
type from a delivery on a channel it had not owned before; it then waits one call
interval plus the request timeout before its first call (the previous owner's last
request may still be open) and reads the parked queue's depth. Losing the channel loses
the type: calls stop, probing stops, the broker returns every unacked message.

Each job goes to :class:`~.lanes.Lanes` (order per SIM, coalescing, outcomes) and is
applied by ``max_concurrency`` runners within the account's limits; its signal is
published and confirmed before its message is acked. While the type is paused, or jobs
held up by a pause still wait, jobs go to :class:`~.parking.Parking` instead, each with
its delayed signal. Nothing here ever nacks: a message not done is returned by the
broker when the channel closes, to the head of its queue and in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from pydantic import ValidationError

from .calls import OwnerCalls
from .config import CommunicatorType, Settings
from .edge import ACKS, ack
from .errors import TypePaused
from .events import Job
from .history import History, until_confirmed
from .jasper.client import JasperClient
from .jasper.retry import RetryLog, change_status
from .lanes import Entry, Immediate, Lanes, Member, Memory
from .metrics import Metrics
from .outcomes import ErrorInfo, Outcome
from .parking import Delivery, Parker, Parking
from .pause import Pause
from .topology import TOKEN_HEADER, Names

log = logging.getLogger(__name__)


class Worker:
    """Consumes ``<prefix>.work.<slug>`` for one communicator type."""

    def __init__(
        self, ct: CommunicatorType, settings: Settings, client: JasperClient,
        history: History, metrics: Metrics, *, queue: AbstractQueue, names: Names,
        open_channel: Callable[[], Awaitable[AbstractChannel]], parked_prefetch: int,
    ) -> None:
        self.ct, self.queue = ct, queue
        self.consumer_tag: str | None = None
        self._retry, self._client, self._history = settings.retry, client, history
        self._on_retry = RetryLog(ct.name, metrics)
        self._coalesced = metrics.coalesced.labels(ct.name)
        self._processing = metrics.child(metrics.event_processing, "apply")
        self.lanes: Lanes[Delivery] = Lanes(Memory(settings.outcome_memory_bytes))
        self.pause = Pause(ct.name, metrics, echo=client.probe, on_pause=self._on_pause,
                           on_resume=self._on_resume)
        self.parking = Parking(ct, names, history, open_channel=open_channel,
                               on_job=self._from_parking, prefetch=parked_prefetch,
                               anchor_refresh_s=settings.hold_refresh_seconds,
                               gauge=metrics.parked.labels(ct.name))
        self.parker = Parker(self.lanes, self.pause, self.parking, self._spawn)
        self.calls = OwnerCalls(client, names.calls_queue(ct), open_channel)
        self._owner: object | None = None  # the underlying channel we own the type on
        self._ready = asyncio.Event()  # ownership taken over: jobs may be placed
        self._waiting: list[AbstractIncomingMessage] = []  # arrived during the take-over
        self._kick = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runners: list[asyncio.Task[None]] = []
        self._stopping = False

    # -- consuming and ownership -----------------------------------------------------------

    async def start(self) -> None:
        self.queue.channel.close_callbacks.add(self._lost)
        self.consumer_tag = await self.queue.consume(self._on_message)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        ACKS.delivered(message)
        if self._stopping:
            return  # not acked: returned in order when the channel closes
        if message.channel is not self._owner:
            self._take(message.channel)
        if not self._ready.is_set():
            self._waiting.append(message)
            return
        await self._arrived(message)

    def _take(self, channel: object) -> None:
        """A delivery on a channel we did not own: this process now owns the type."""
        self._reset()
        self._owner = channel
        self._client.limiter.reopen()
        self._client.limiter.hold_off(self._client.limiter.interval_s
                                      + self.ct.request_timeout_seconds)
        self._spawn(self._take_over(channel))

    async def _take_over(self, channel: object) -> None:
        try:
            await self._let_go()  # whatever the previous ownership left, first
            count = await self.parking.take_over()
            if channel is not self._owner:
                return
            log.info("took over %s (%d jobs parked)", self.ct.name, count,
                     extra={"fields": {"communicator_type": self.ct.name, "parked": count}})
            self._runners = [asyncio.create_task(self._run(), name=f"apply {self.ct.name}")
                             for _ in range(self.ct.max_concurrency)]
            await self.parking.start_draining()
            await self.calls.start()
        except Exception:  # the broker failed us: its channel closes and _lost runs
            log.exception("taking over %s failed", self.ct.name)
            return
        self._ready.set()
        waiting, self._waiting = self._waiting, []
        for message in waiting:
            await self._arrived(message)

    def _lost(self, *_: object) -> None:
        """The work queue's channel closed: the type may have another owner now."""
        if self._owner is not None:
            log.warning("lost the work queue of %s; stopping its calls", self.ct.name)
        self._reset()
        self._spawn(self._let_go(), tracked=False)

    def _reset(self) -> None:
        self._owner = None
        self._ready.clear()
        self._waiting.clear()
        for task in [*self._runners, *self._tasks]:
            task.cancel()
        self._runners.clear()
        self._tasks.clear()
        self.parker.clear()
        self.lanes.clear()
        self._client.limiter.abort_waiting(TypePaused("ownership lost"))

    async def _let_go(self) -> None:
        """No probing, no parked queue, no tools' calls: another process may own the type."""
        await self.pause.stop()
        await self.parking.give_up()
        await self.calls.stop()

    def _spawn(self, coro: Awaitable[Any], *, tracked: bool = True) -> None:
        spawn(coro, self._tasks if tracked else None)

    async def _arrived(self, message: AbstractIncomingMessage) -> None:
        if (message.headers or {}).get(TOKEN_HEADER) is not None:
            await self.parking.token(message)
            return
        started = time.perf_counter()
        try:
            job = Job.model_validate_json(message.body)
        except ValidationError as exc:
            await self._history.bad_job(message.body, message.message_id, (
                f"work item is not a job: {exc.error_count()} problem(s), first: "
                f"{exc.errors()[0]['msg']}"))
            await ack(message)
            return
        delivery = Delivery(message, parked=False, started=started)
        if self.parker.wants(job):
            self.parker.park(job, delivery)
            return
        self._place(job, delivery)

    def _from_parking(self, job: Job, message: AbstractIncomingMessage) -> None:
        self.parker.seen(job)
        self._place(job, Delivery(message, parked=True, started=time.perf_counter()))

    def _place(self, job: Job, delivery: Delivery) -> None:
        placed = self.lanes.deliver(job, delivery)
        if isinstance(placed, Immediate):
            self._spawn(self._settle(job, delivery, placed.outcome, 0))
            return
        if placed.joined:
            self._coalesced.inc()
        self._kick.set()

    # -- applying --------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            entry = None if self.pause.error is not None else self.lanes.next_ready()
            if entry is None:
                self._kick.clear()
                await self._kick.wait()
                continue
            self.lanes.start(entry)
            await self._apply(entry)

    async def _apply(self, entry: Entry[Delivery]) -> None:
        job = entry.leader
        try:
            outcome = await change_status(self._client, job.iccid, job.command,
                                          self._retry, self.pause,
                                          on_retry=self._on_retry)
        except TypePaused as exc:
            entry.attempts += exc.attempts
            self.lanes.unstart(entry)  # it waits again; while paused its lane is parked
            self.parker.park_lane(entry.iccid)
            return
        self.lanes.finish(entry, outcome)
        settles = [self._settle(m.job, m.payload, outcome, 0 if i else outcome.attempts,
                                entry, m) for i, m in enumerate(entry.members)]
        await (settles[0] if len(settles) == 1 else asyncio.gather(*settles))

    async def _settle(self, job: Job, delivery: Delivery, outcome: Outcome, attempts: int,
                      entry: Entry[Delivery] | None = None,
                      member: Member[Delivery] | None = None) -> None:
        """Publish the job's final signal (and its dead-letter copy when retries ran out)
        until the broker confirms, then ack its message; then the next job of its SIM."""
        await until_confirmed(lambda: self._history.final(
            job, outcome, started=delivery.started, type_label=self.ct.name,
            attempts=attempts), f"a signal of {self.ct.name}")
        if delivery.parked:
            await self.parking.acked(delivery.message)
        elif await ack(delivery.message):
            self._processing.observe(time.perf_counter() - delivery.started)
        if entry is not None and member is not None and self.lanes.settled(entry, member):
            self._kick.set()
            self.parker.park_lane(entry.iccid)

    async def _on_pause(self, _: ErrorInfo) -> None:
        await self.parker.paused()

    async def _on_resume(self) -> None:
        await self.parking.start_draining()
        self._kick.set()

    async def stop(self, grace_s: float) -> None:
        """Start nothing new; let calls under way finish and settle within ``grace_s``;
        then let go of everything (the broker returns what is not acked, in order)."""
        self._stopping = True
        self._kick.set()  # idle runners end; one applying finishes its job first
        self._client.limiter.abort_waiting(TypePaused("stopping"))
        pending = [t for t in (*self._tasks, *self._runners) if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=grace_s)
        self._reset()
        await self._let_go()


def spawn(coro: Awaitable[Any], tasks: set[asyncio.Task[Any]] | None) -> None:
    """Run ``coro`` as a task (kept in ``tasks`` until done); a failure is logged."""
    task = asyncio.ensure_future(coro)
    if tasks is not None:
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("worker task failed", exc_info=task.exception())

