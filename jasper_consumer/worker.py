"""Stage 2, one per communicator type: take jobs from its queues, apply them, settle.

The work queue has a single active consumer: the process whose consumer is active owns the
type, and only it calls the account (operator guide, section 13). A process learns that it
owns the type from a delivery on a channel it had not owned before (the owner always holds
one *anchor* token from the work queue, :mod:`.anchor`, so that a standby is woken when the
owner goes). It then takes the type over (:meth:`Worker._take_over`): reads the ownership
log (:mod:`.ownerlog`: did the previous owner let go cleanly? which guards hold?), writes
its own ``owned`` record, reads the parked queue's depth, and starts calling — at once after
a clean hand-over or on a first start, else after one call interval plus the request timeout
(the previous owner's last request, or an operator tool's, may still be open: :mod:`.hold`);
it takes from the bulk and parked queues once it holds the hold (:class:`~.hold.Hold`). The
take-over either finishes or gives the type back (closes its channel; a standby, or this
process again, takes it). Losing the channel loses the type: calls stop, probing stops, the
broker returns every unacked message.

Interactive jobs come from the work queue (pushed); bulk jobs from the bulk queue
(:mod:`.bulk`, pulled by :mod:`.feed`; pushed while the type is paused, to be parked); both
go to :class:`~.lanes.Lanes` (order per SIM, coalescing, outcomes, guards) and are applied
by ``max_concurrency`` runners, each taking the account's next start from the limiter and
only then choosing the job — interactive first, bulk its share (:class:`~.lanes.Share`). A
job's signal is published and confirmed before its message is acked. While the type is
paused, or jobs held up by a pause still wait, jobs go to :class:`~.parking.Parking`
instead, each with its delayed signal (and the anchor is swapped for a fresh token after
:data:`~.anchor.ANCHOR_BEHIND` of them, so that their acks can go out together). Nothing
here nacks: a message not done is returned by the broker when its channel closes, to the
head of its queue and in order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from pydantic import ValidationError

from .anchor import Anchor
from .bulk import BulkQueue
from .calls import OwnerCalls
from .config import CommunicatorType, Settings
from .edge import Acks
from .errors import TypePaused
from .events import Job, Lane
from .feed import Feed
from .history import History, message_id, until_confirmed
from .hold import Hold, tool_calls_directly
from .jasper.client import JasperClient
from .jasper.retry import RetryLog, change_status
from .lanes import Entry, Immediate, Lanes, Member, Share, Source, State
from .metrics import Metrics
from .outcomes import ErrorInfo, Outcome
from .ownerlog import OwnerLog
from .parking import Delivery, Parker, Parking
from .pause import Pause
from .topology import ATTEMPTS_HEADER, TOKEN_HEADER, Names

log = logging.getLogger(__name__)

GIVE_BACK_WAIT_S = 1.0  # after giving the type back, before consuming again


@dataclass(frozen=True, slots=True)
class Parts:
    """What the owner of a type works with; the service builds them (:mod:`.app`) and the
    worker ties them together (the pause, the parker and the feed, which call back into
    it, the worker builds itself)."""

    lanes: Lanes[Delivery]  # order per SIM, coalescing, outcomes, guards
    share: Share  # the bulk lane's least share
    parking: Parking  # the parked queue
    calls: OwnerCalls  # the tools' calls, served within the account's limits
    owner_log: OwnerLog  # who owned the type, how it was let go, the guards
    bulk: BulkQueue  # the bulk queue, pulled
    acks: Acks  # the service's one ack path


class Worker:
    """Consumes ``<prefix>.work.<slug>`` (and, while it owns the type, its bulk and parked
    queues) for one communicator type."""

    def __init__(
        self, ct: CommunicatorType, settings: Settings, client: JasperClient,
        history: History, metrics: Metrics, parts: Parts, *, names: Names,
        open_channel: Callable[..., Awaitable[AbstractChannel]], prefetch: int,
    ) -> None:
        self.ct, self.names, self.prefetch = ct, names, prefetch
        self.work_queue = names.work_queue(ct)
        self.queue: AbstractQueue | None = None
        self.consumer_tag: str | None = None
        self._open_channel, self._history, self._client = open_channel, history, client
        self._retry, self._refresh_s = settings.retry, settings.hold_refresh_seconds
        self._on_retry = RetryLog(ct.name, metrics)
        self._metrics = metrics
        self._coalesced = metrics.coalesced.labels(ct.name)
        self._processing = metrics.child(metrics.event_processing, "apply")
        self._acks = parts.acks
        self.lanes, self.share = parts.lanes, parts.share
        self.calls, self.owner_log = parts.calls, parts.owner_log
        self.parking = parts.parking
        self.parking.deliver_to(self._from_parking)
        self.pause = Pause(ct.name, metrics, echo=client.probe, on_pause=self._on_pause,
                           on_resume=self._on_resume)
        self.parker = Parker(self.lanes, self.parking, self._spawn,
                             error=lambda: self.pause.error,
                             last_error=lambda: self.pause.last_error,
                             on_moved=self._moved)
        self.feed = Feed(self, parts.bulk, lookahead=2 * ct.max_concurrency + 1)
        self._channel: AbstractChannel | None = None
        self.hold = Hold(names.hold_queue(ct), ct.name, open_channel)
        self._owner: object | None = None  # the underlying channel we own the type on
        self._ready = asyncio.Event()  # ownership taken over: jobs may be placed
        self._waiting: list[AbstractIncomingMessage] = []  # arrived during the take-over
        self._kick = asyncio.Event()  # a runner may have work
        self._progress = asyncio.Event()  # an entry settled or went back
        self._hooks = asyncio.Lock()  # the pause's hooks, one at a time
        self._tasks: set[asyncio.Task[Any]] = set()  # settles, moves: awaited at stop
        self._loops: set[asyncio.Task[Any]] = set()  # feed, anchor, start: cancelled at stop
        self._runners: list[asyncio.Task[None]] = []
        self.held: collections.Counter[Source] = collections.Counter()  # unsettled deliveries
        self.pending: collections.Counter[Source] = collections.Counter()  # settled at once
        self.anchor = Anchor(self.work_queue, ct.name, history, self._ack_work, self._spawn)
        self._stopping = False

    # -- consuming and ownership -----------------------------------------------------------

    async def start(self) -> None:
        """Consume the work queue, then wake its owner (which may not know it is one)."""
        channel = await self._open_channel(self.prefetch)
        try:
            self.queue = await channel.get_queue(self.work_queue)
            self.consumer_tag = await self.queue.consume(self._on_message)
        except BaseException:
            with contextlib.suppress(Exception):
                await channel.close()
            raise
        self._channel = channel
        channel.close_callbacks.add(self._lost)
        await self._history.to_queue(self.work_queue, b"{}", message_id(),
                                     {TOKEN_HEADER: "wake"})

    async def restart(self) -> None:
        """Give the type back and consume again: close the channel (every message not acked
        returns, in order; another replica may take the type), then a fresh consumer."""
        channel, self._channel, self.consumer_tag = self._channel, None, None
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()
        self._lost()
        wait = GIVE_BACK_WAIT_S
        while not self._stopping:
            await asyncio.sleep(wait)
            try:
                await self.start()
                return
            except Exception as exc:
                log.warning("cannot consume %s again (%r); retrying", self.work_queue, exc)
                wait = min(wait * 2, 30.0)

    def _give_back(self, why: str) -> None:
        log.error("giving %s back: %s", self.ct.name, why,
                  extra={"fields": {"communicator_type": self.ct.name}})
        self._spawn(self.restart(), tracked=False)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._acks.delivered(message)
        if self._stopping:
            return  # not acked: returned in order when the channel closes
        if message.channel is not self._owner:
            self._take(message.channel)
        self.held[Source.WORK] += 1
        if not self._ready.is_set():
            self._waiting.append(message)
            return
        await self._arrived(message, Source.WORK)

    def _take(self, channel: object) -> None:
        """A delivery on a channel we did not own: this process now owns the type."""
        self._reset()
        self._owner = channel
        self._spawn(self._take_over(channel))

    async def _take_over(self, channel: object) -> None:
        try:
            await self._let_go()  # whatever the previous ownership left, first
            reading = await self.owner_log.take_over(
                lambda r: [(i, s, e) for i, (s, e) in r.guards.items()])
            if channel is not self._owner:
                return
            self.lanes.load_guards((i, s, e) for i, (s, e) in reading.guards.items())
            parked = await self.parking.take_over()
            tool = await tool_calls_directly(self._open_channel,
                                             self.names.direct_queue(self.ct))
            limiter = self._client.limiter
            wait_s = limiter.interval_s + self.ct.request_timeout_seconds \
                if reading.must_wait or tool else \
                max(0.0, reading.not_before - time.time())  # the account's spacing
            limiter.reopen()
            limiter.unsuspend()  # a delivery just came: the broker answers
            limiter.hold_off(wait_s)
            log.info("took over %s (%s; %d jobs parked, %d guards)", self.ct.name,
                     f"waiting {wait_s:.1f} s: an operator tool calls the account itself"
                     if tool else
                     f"waiting {wait_s:.1f} s: {reading.previous or 'the previous owner'} "
                     "did not let go cleanly" if reading.must_wait else
                     "first owner" if reading.first_ever else "clean hand-over",
                     parked, len(reading.guards),
                     extra={"fields": {"communicator_type": self.ct.name, "parked": parked,
                                       "wait_s": wait_s}})
            self._runners = [asyncio.create_task(self._run(), name=f"apply {self.ct.name}")
                             for _ in range(self.ct.max_concurrency)]
            self._loop(self.feed.run())  # guards at once; the bulk queue once held
            self._loop(self._start_sources(channel, wait_s))
            await self.anchor.ask()  # one try: if it fails, the type is given back
        except Exception as exc:
            if channel is self._owner:
                self._give_back(f"taking it over failed: {type(exc).__name__}: {exc}")
            return
        self._ready.set()
        waiting, self._waiting = self._waiting, []
        for message in waiting:
            await self._arrived(message, Source.WORK)

    async def _start_sources(self, channel: object, wait_s: float) -> None:
        """After the wait, and once the previous owner has let go of the hold (so that what
        it held of the bulk and parked queues is back at their heads): parked, bulk, tools'
        calls."""
        await asyncio.sleep(wait_s)
        if channel is not self._owner:
            return
        if not await self.hold.take(lambda: channel is self._owner):
            return
        try:  # a pause that came meanwhile (the first call may precede this) drains at its end
            await self.parking.start_draining(paused=self.pause.error is not None)
        except Exception as exc:
            self._give_back(f"cannot drain its parked queue: {type(exc).__name__}: {exc}")
            return
        self.feed.pulling = True
        self.feed.kick()
        self._loop(self.anchor.keep(self._refresh_s))
        await self.calls.start()

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
        for task in [*self._runners, *self._tasks, *self._loops]:
            task.cancel()
        self._runners.clear()
        self._tasks.clear()
        self._loops.clear()
        self.parker.clear()
        self.lanes.clear()
        self.held.clear()
        self.pending.clear()
        self.anchor.clear()
        self._client.limiter.abort_waiting(TypePaused("ownership lost"))

    async def _let_go(self) -> None:
        """No probing, no parked or bulk queue, no tools' calls: another process may own
        the type. (The broker returns what their channels held.)"""
        await self.pause.stop()
        await self.parking.give_up()
        await self.feed.close()
        await self.hold.let_go()  # after the bulk and parked channels are closed
        await self.calls.stop()

    def _spawn(self, coro: Awaitable[Any], *, tracked: bool = True) -> None:
        spawn(coro, self._tasks if tracked else None)

    def _loop(self, coro: Awaitable[Any]) -> None:
        """A task of the ownership that runs until stopped (cancelled at stop and at loss)."""
        spawn(coro, self._loops)

    def calls_allowed(self, allowed: bool, why: str = "") -> None:
        """The broker does not answer (``allowed`` False): start no call, since the broker
        may have handed the type to another replica already; in-flight calls end as they
        will. Allowed again once the broker answers."""
        limiter = self._client.limiter
        if allowed == (not limiter.suspended):
            return
        if allowed:
            limiter.unsuspend()
            log.info("calls of %s allowed again: RabbitMQ answers", self.ct.name)
        elif self.owner:
            limiter.suspend()
            log.warning("no new call of %s while RabbitMQ does not answer: %s", self.ct.name,
                        why, extra={"fields": {"communicator_type": self.ct.name}})

    def kick(self) -> None:
        """A runner may have work (an entry was cleared or settled)."""
        self._kick.set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def owner(self) -> bool:
        return self._owner is not None and self._ready.is_set()

    @property
    def saturated(self) -> bool:
        """The work queue's prefetch window is (nearly) full: interactive jobs may wait
        beyond it (the broker pushes no more until some are acked)."""
        return self.held[Source.WORK] >= self.prefetch - 1

    # -- arriving jobs ---------------------------------------------------------------------

    async def _ack_work(self, message: AbstractIncomingMessage) -> bool:
        done = await self._acks.ack(message)
        self.held[Source.WORK] = max(0, self.held[Source.WORK] - 1)
        return done

    async def _arrived(self, message: AbstractIncomingMessage, source: Source) -> None:
        """A message from the work queue (or, via :mod:`.feed`, the bulk queue)."""
        if source is Source.BULK:
            self.held[Source.BULK] += 1
        elif (message.headers or {}).get(TOKEN_HEADER) is not None:
            await self.anchor.token(message)
            return
        started = time.perf_counter()
        try:
            job = Job.model_validate_json(message.body)
        except ValidationError as exc:
            await self._history.bad_job(message.body, message.message_id, (
                f"{source.value} item is not a job: {exc.error_count()} problem(s), first: "
                f"{exc.errors()[0]['msg']}"))
            await self._settled(Delivery(message, source, started))
            return
        delivery = Delivery(message, source, started)
        if self.parker.wants(job):
            self.parker.park(job, delivery, delivery.prior)
            return
        self._place(job, delivery)

    def _from_parking(self, job: Job, message: AbstractIncomingMessage) -> None:
        given = (message.headers or {}).get(ATTEMPTS_HEADER)
        prior = given if isinstance(given, int) and not isinstance(given, bool) else 0
        self._place(job, Delivery(message, Source.PARKED, time.perf_counter(), prior))

    def _doubts(self, source: Source) -> set[Source]:
        """Sources that may still deliver an older job for a SIM (see :mod:`.lanes`)."""
        doubts = set()
        if source is not Source.BULK:
            doubts.add(Source.BULK)  # until a pull finds the bulk queue empty
        if source is not Source.WORK and self.saturated:
            doubts.add(Source.WORK)
        rules = self.parking.rules
        if rules.more_behind() if source is Source.PARKED else not rules.drained():
            doubts.add(Source.PARKED)
        return doubts

    def _place(self, job: Job, delivery: Delivery) -> None:
        placed = self.lanes.deliver(job, delivery, self._doubts(delivery.source))
        if isinstance(placed, Immediate):
            self.pending[delivery.source] += 1
            self._spawn(self._settle(job, delivery, placed.outcome, delivery.prior))
            return
        if placed.joined:
            self._coalesced.inc()
        if placed.entry.doubts:
            self.feed.kick()
        self._kick.set()

    # -- applying --------------------------------------------------------------------------

    async def _run(self) -> None:
        lanes, limiter = self.lanes, self._client.limiter
        while not self._stopping:
            if self.pause.error is not None or not (lanes.waiting(Lane.INTERACTIVE)
                                                    or lanes.waiting(Lane.BULK)):
                self._kick.clear()
                await self._kick.wait()
                continue
            await limiter.acquire()  # the account's next start; then choose the job for it
            lane = self.share.pick(lanes.waiting(Lane.INTERACTIVE), lanes.waiting(Lane.BULK))
            entry = lanes.next_ready(lane) if lane and self.pause.error is None else None
            if entry is None:
                limiter.discard()
                continue
            lanes.start(entry)
            if entry.lane is Lane.BULK:
                self.feed.kick()  # the bulk lookahead may need a refill
            await self._apply(entry)

    async def _apply(self, entry: Entry[Delivery]) -> None:
        job = entry.leader
        try:
            outcome = await change_status(self._client, job.iccid, job.command,
                                          self._retry, self.pause,
                                          on_retry=self._on_retry, granted=True)
        except TypePaused as exc:
            entry.attempts += exc.attempts
            self.lanes.unstart(entry)  # it waits again; while paused it is parked
            self._progress.set()
            self.parker.park_queued(entry.iccid)
            return
        self.lanes.finish(entry, outcome)
        settles = [self._settle(m.job, m.payload, outcome,
                                m.payload.prior + (0 if i else outcome.attempts + entry.attempts),
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
        if job.received_at:
            self._metrics.child(self._metrics.time_to_final, self.ct.name,
                                job.lane.value).observe(max(0.0, time.time() - job.received_at))
        if await self._settled(delivery):
            self._processing.observe(time.perf_counter() - delivery.started)
        if entry is None:
            self.pending[delivery.source] -= 1
            self.feed.kick()
        elif member is not None and self.lanes.settled(entry, member):
            self._kick.set()
            self._progress.set()
            self.parker.park_queued(entry.iccid)
            if self.lanes.guards:
                self.feed.kick()

    async def _settled(self, delivery: Delivery) -> bool:
        """Ack a delivery where it came from; False when its channel is gone."""
        source = delivery.source
        if source is Source.PARKED:
            return await self.parking.acked(delivery.message)
        if source is Source.WORK:
            return await self._ack_work(delivery.message)
        self.held[source] = max(0, self.held[source] - 1)
        return await self._acks.ack(delivery.message)

    def _moved(self, delivery: Delivery) -> None:
        """A job was moved to the parked queue and acked where it came from."""
        if delivery.source is Source.WORK:
            self.held[Source.WORK] = max(0, self.held[Source.WORK] - 1)
            self.anchor.acked_behind()
        elif delivery.source is Source.BULK:
            self.held[Source.BULK] = max(0, self.held[Source.BULK] - 1)
        self.feed.kick()

    # -- the pause's hooks -----------------------------------------------------------------

    async def _on_pause(self, _: ErrorInfo) -> None:
        """Parked jobs not started go back to the head of their queue (once the parked calls
        under way have settled, so that none is acked on a closed channel); every other
        job not started moves to the parked queue with its delayed signal."""
        async with self._hooks:
            self.lanes.drop(lambda d: not d.parked)
            self.parker.park_all()
            self._spawn(self.parking.stop_draining(settled=self._parked_calls_ended))
            self.feed.kick()  # the bulk queue: every job to the parked queue too

    async def _parked_calls_ended(self) -> None:
        def under_way() -> bool:
            return any(e.state is not State.QUEUED and any(m.payload.parked for m in e.members)
                       for e in self.lanes.entries())

        while under_way():
            self._progress.clear()
            await self._progress.wait()
        self.lanes.drop(lambda d: not d.parked)  # those a paused call put back

    async def _on_resume(self) -> None:
        async with self._hooks:
            try:  # not before the take-over holds the hold: it opens the sources then
                if self.feed.pulling:
                    await self.parking.start_draining()
            except Exception as exc:
                self._give_back(f"cannot drain its parked queue after the resume: "
                                f"{type(exc).__name__}: {exc}")
                return
            self._kick.set()
            self.feed.kick()

    # -- stopping --------------------------------------------------------------------------

    async def stop(self, grace_s: float) -> None:
        """Start nothing new; let calls under way finish and settle within ``grace_s``; let
        go of everything (the broker returns what is not acked, in order); and if no call
        of ours is open any more, record in the ownership log that we let go cleanly."""
        self._stopping = True
        owned = self.owner
        self._kick.set()  # idle runners end; one applying finishes its job first
        self._client.limiter.abort_waiting(TypePaused("stopping"))
        for task in self._loops:
            task.cancel()
        pending = [t for t in (*self._tasks, *self._runners) if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=grace_s)
        self._reset()
        await self._let_go()
        if owned and self._client.limiter.in_flight == 0:
            try:
                async with asyncio.timeout(5):
                    await self.owner_log.release(
                        time.time() + self._client.limiter.next_start_in())
            except Exception as exc:  # the next owner waits, as after a crash
                log.warning("could not record that %s was let go cleanly: %r",
                            self.ct.name, exc)


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
