"""Stage 2, one per communicator type: apply jobs to Control Center, in order per SIM.

The work queue has a single active consumer, so this process is the only one
talking to the account. Within it:

* **order per ICCID** — a job starts only when the previous job for its ICCID has
  been settled (signal confirmed and acked), so a crash can never leave a later job
  acked and an earlier one redelivered; jobs for other ICCIDs run concurrently,
  within the client's :class:`~.jasper.Limiter`;
* **stale redeliveries** — RabbitMQ 3.x quorum queues put a returned message at the
  back of the queue, so after a crash or a hand-back an older job for a SIM can arrive
  after a newer one. Jobs carry the router's stamp; a job older than one already
  applied here for its ICCID is not applied (``SUPERSEDED``), and a job whose event
  was already applied here gets that outcome again without a call;
* **coalescing** — a job identical to the last queued or in-flight job for its
  ICCID joins that call instead of making its own; each job still gets a signal;
* **pause** — an error that says the type's settings are wrong (key, API version,
  role), or an outage (transient errors and Echo failing too), stops calls. The
  consumer's prefetch is raised so queued jobs arrive too, and each waiting job gets
  one ``jasper.delayed`` signal. Echo probes (re-reading ``api_key_file``) run with
  back-off between 1 and 30 s; when one passes, the jobs go on in order. Held
  messages are handed back to the queue (in order, to its head) before the broker's
  consumer timeout would cancel them, and consumed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from pydantic import ValidationError

from . import errors, signals
from . import log as jlog
from .config import Command, CommunicatorType, Settings
from .edge import Handler, settle
from .errors import HandBack, JasperError, JasperRejected, RetriesExhausted
from .events import Job
from .history import Publisher
from .jasper import CallResult, JasperClient
from .metrics import Metrics
from .signals import Signal, SignalError

log = logging.getLogger(__name__)

PROBE_MIN_INTERVAL_S = 1.0
PROBE_MAX_INTERVAL_S = 30.0
PROBE_REPAUSE_MAX_S = 300.0
# Event ids remembered as having had their delayed signal: more than paused_prefetch can
# hold (at most 65,535), so only ids of long-gone messages are ever dropped.
DELAYED_MEMORY = 100_000

T = TypeVar("T")


@dataclass(eq=False)
class _Call:
    """One API call serving one or more identical jobs for an ICCID, and their settling.

    It stays the ICCID's tail until every member's message is settled, so the next
    job for the ICCID starts only after all of them are acked or handed back.
    """

    iccid: str
    command: Command
    tails: dict[str, _Call]
    result: asyncio.Future[CallResult | JasperError | HandBack]
    members: int = 1
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    def member_done(self) -> None:
        self.members -= 1
        if self.members == 0 and self.result.done():
            self.settled.set()
            if self.tails.get(self.iccid) is self:
                del self.tails[self.iccid]


class _Recent:
    """What this process applied lately: outcomes by event id, newest stamp by ICCID."""

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._outcomes: OrderedDict[str, CallResult | JasperError] = OrderedDict()
        self._newest: OrderedDict[str, tuple[int, str]] = OrderedDict()

    def outcome(self, job: Job) -> CallResult | JasperError | None:
        return self._outcomes.get(job.event_id)

    def newer_than(self, job: Job) -> str | None:
        """The event id of a newer job already applied for the ICCID, if any."""
        newest = self._newest.get(job.iccid)
        if newest is not None and job.routed_ns and newest[0] > job.routed_ns:
            return newest[1]
        return None

    def record(self, job: Job, outcome: CallResult | JasperError) -> None:
        self._outcomes[job.event_id] = outcome
        if job.routed_ns >= self._newest.get(job.iccid, (0, ""))[0]:
            self._newest[job.iccid] = (job.routed_ns, job.event_id)
            self._newest.move_to_end(job.iccid)
        for table in (self._outcomes, self._newest):
            while len(table) > self._size:
                table.popitem(last=False)


class Worker:
    """Consumes ``<prefix>.work.<slug>`` for one communicator type."""

    def __init__(
        self,
        ct: CommunicatorType,
        settings: Settings,
        client: JasperClient,
        publisher: Publisher,
        metrics: Metrics,
        *,
        channel: AbstractChannel,
        queue: AbstractQueue,
        track: Callable[[Handler], Handler] = lambda handler: handler,
        prefetch: int | None = None,
    ) -> None:
        self.ct = ct
        self._settings = settings
        self._client = client
        self._publisher = publisher
        self._metrics = metrics
        self._channel = channel
        self._prefetch = prefetch or settings.prefetch  # while not paused
        self.queue = queue
        self._callback = track(self.on_message)
        self.consumer_tag: str | None = None
        self._tails: dict[str, _Call] = {}
        self._recent = _Recent()
        self._unsettled = 0
        self._state = asyncio.Condition()
        self._pause: JasperError | None = None
        self._paused = asyncio.Event()  # set while _pause is not None
        self._paused_at = 0.0
        self._handing_back = False
        # Event ids that got their delayed signal (insertion-ordered, oldest dropped first:
        # ids handed to another replica never reach _finish here).
        self._delayed_sent: dict[str, None] = {}
        self._probe_task: asyncio.Task[None] | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._refreshing = False
        self._probe_floor_s = PROBE_MIN_INTERVAL_S
        self._succeeded_since_resume = True
        self.hand_backs = 0  # times held messages were handed back during a pause
        metrics.communicator_up.labels(ct.name).set(1)
        metrics.inflight.labels(ct.name).set(0)

    # -- consuming -------------------------------------------------------------------------

    async def start(self) -> None:
        self.consumer_tag = await self.queue.consume(self._callback)

    async def stop_consuming(self) -> None:
        if self.consumer_tag is not None:
            tag, self.consumer_tag = self.consumer_tag, None
            with contextlib.suppress(Exception):
                await self.queue.cancel(tag)

    async def begin_shutdown(self) -> None:
        """Stop consuming; jobs not yet sent to Control Center are handed back at once."""
        await self.stop_consuming()
        self._client.limiter.abort_waiting(
            JasperError("SHUTTING_DOWN", "the service is stopping"))
        await self._notify(handing_back=True)

    async def close(self) -> None:
        """Stop probing (after begin_shutdown and the drain)."""
        for task in (self._probe_task, self._refresh_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        started = time.perf_counter()
        try:
            job = Job.model_validate_json(message.body)
        except ValidationError as exc:
            reason = (f"work item is not a job: {exc.error_count()} problem(s), first: "
                      f"{exc.errors()[0]['msg']}")
            await settle(message, lambda m: self._dead_letter(m, reason), self._metrics, "apply")
            return

        # Until the first await this runs in delivery order: join or extend the chain here.
        self._unsettled += 1
        tail = self._tails.get(job.iccid)
        try:
            if tail is not None and tail.command is job.command and not tail.result.done():
                tail.members += 1
                self._metrics.coalesced.labels(self.ct.name).inc()
                try:
                    await settle(message, lambda m: self._follow(job, tail, started),
                                 self._metrics, "apply")
                finally:
                    tail.member_done()
                return
            call = _Call(job.iccid, job.command, self._tails,
                         asyncio.get_running_loop().create_future())
            self._tails[job.iccid] = call
            try:
                await settle(message, lambda m: self._lead(job, call, tail, started),
                             self._metrics, "apply")
            finally:
                if not call.result.done():
                    call.result.set_result(HandBack("the call was interrupted"))
                call.member_done()
        finally:
            self._unsettled -= 1
            await self._notify()

    # -- one job ---------------------------------------------------------------------------

    async def _lead(self, job: Job, call: _Call, previous: _Call | None, started: float) -> None:
        try:
            if previous is not None:
                await self._wait_signalling_delay(job, previous.settled.wait())
            known = None if job.replayed else self._recent.outcome(job)
            newer = self._recent.newer_than(job)
            if known is not None:  # a redelivered duplicate: same outcome, no call
                outcome, attempts = known, 0
            elif newer is not None:
                outcome, attempts = JasperRejected(
                    errors.SUPERSEDED,
                    f"not applied: a newer event for this SIM ({newer}) was applied already",
                ), 0
            else:
                outcome = await self._apply(job)
                attempts = outcome.attempts
        except HandBack as exc:
            call.result.set_result(exc)
            raise
        self._recent.record(job, outcome)
        call.result.set_result(outcome)
        await self._finish(job, outcome, started, attempts=attempts)

    async def _follow(self, job: Job, call: _Call, started: float) -> None:
        outcome = await self._wait_signalling_delay(job, asyncio.shield(call.result))
        if isinstance(outcome, HandBack):
            raise HandBack(str(outcome))
        await self._finish(job, outcome, started, attempts=0)

    async def _wait_signalling_delay(self, job: Job, waitable: Awaitable[T]) -> T:
        """Wait for ``waitable`` (the job's turn, or a shared call); if the type is paused
        meanwhile, the job gets its one delayed signal while it waits."""
        target = asyncio.ensure_future(waitable)
        try:
            while not target.done():
                if self._pause is not None and job.event_id not in self._delayed_sent:
                    await self._send_delayed(job, self._pause, 0)
                    continue
                watch: set[asyncio.Future[Any]] = {target}
                if self._pause is None:
                    watch.add(asyncio.ensure_future(self._paused.wait()))
                await asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED)
                for other in watch - {target}:
                    other.cancel()
        finally:
            if not target.done():
                target.cancel()
        return target.result()

    async def _apply(self, job: Job) -> CallResult | JasperError:
        """Call Control Center until the job succeeds or fails for good; wait out pauses."""
        attempts = 0
        while True:
            if self._handing_back:
                raise HandBack("handing held jobs back to the queue")
            if self._pause is not None:
                if job.event_id not in self._delayed_sent:
                    await self._send_delayed(job, self._pause, attempts)
                await self._wait_while_paused()
                continue
            try:
                result = await self._client.change_status(job.iccid, job.command)
            except JasperError as exc:
                attempts += exc.attempts
                if self._handing_back:
                    raise HandBack("handing held jobs back to the queue") from None
                if exc.pauses_type:
                    self._enter_pause(exc)
                    continue
                exc.attempts = attempts
                return exc
            self._succeeded_since_resume = True
            self._probe_floor_s = PROBE_MIN_INTERVAL_S
            return CallResult(result.sim_status, attempts + result.attempts)

    async def _finish(
        self, job: Job, outcome: CallResult | JasperError, started: float, *, attempts: int
    ) -> None:
        duration_ms = (time.perf_counter() - started) * 1000
        signal: Signal
        if isinstance(outcome, CallResult):
            signal = signals.succeeded(job, outcome.sim_status, attempts, duration_ms)
        else:
            signal = signals.failed(job, SignalError(**outcome.as_dict()), attempts, duration_ms)
        await self._publisher.signal(signal)
        if isinstance(outcome, RetriesExhausted) and attempts > 0:
            await self._publisher.dead_letter(
                json.dumps(job.to_event()).encode(), outcome.code, message_id=job.event_id,
                headers={"x-jasper-last-error": outcome.last.code},
                content_type="application/json",
            )
            self._metrics.dead_lettered.labels("retries_exhausted").inc()
        self._delayed_sent.pop(job.event_id, None)
        self._metrics.commands.labels(self.ct.name, job.command.value, signal.outcome).inc()
        if signal.outcome is signals.Outcome.SUCCEEDED:
            self._metrics.last_success.labels(self.ct.name).set(time.time())
        jlog.outcome(
            event_id=job.event_id, client_id=job.client_id, communicator_type=self.ct.name,
            command=job.command, outcome=signal.outcome,
            error_code=signal.error.code if signal.error else None,
            attempts=attempts, duration_ms=signal.duration_ms,
        )

    async def _send_delayed(self, job: Job, error: JasperError, attempts: int) -> None:
        signal = signals.delayed(
            job,
            SignalError(code=error.code, http_status=error.http_status, message=error.message,
                        retryable=True),
            attempts,
            duration_ms=0.0,
        )
        await self._publisher.signal(signal)
        self._delayed_sent[job.event_id] = None
        if len(self._delayed_sent) > DELAYED_MEMORY:
            del self._delayed_sent[next(iter(self._delayed_sent))]
        self._metrics.delayed.labels(self.ct.name).inc()
        jlog.outcome(
            event_id=job.event_id, client_id=job.client_id, communicator_type=self.ct.name,
            command=job.command, outcome="delayed", error_code=error.code, attempts=attempts,
        )

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        await self._publisher.dead_letter(message.body, reason, message_id=message.message_id)
        self._metrics.dead_lettered.labels("invalid_job").inc()
        log.error(reason, extra={"fields": {"message_id": message.message_id}})

    # -- pause, probe, hand back -----------------------------------------------------------

    async def _notify(self, *, handing_back: bool | None = None) -> None:
        async with self._state:
            if handing_back is not None:
                self._handing_back = handing_back
            self._state.notify_all()

    async def _wait_while_paused(self) -> None:
        async with self._state:
            await self._state.wait_for(lambda: self._pause is None or self._handing_back)

    def _enter_pause(self, error: JasperError) -> None:
        if self._pause is not None:
            return
        if not self._succeeded_since_resume:
            # Echo passed but real calls still fail (e.g. a role without SIM access).
            self._probe_floor_s = min(self._probe_floor_s * 2, PROBE_REPAUSE_MAX_S)
        self._pause = error
        self._paused.set()
        self._paused_at = time.monotonic()
        self._client.suspend(error)
        self._metrics.communicator_up.labels(self.ct.name).set(0)
        log.error(
            "communicator type %s paused: %s (%s)", self.ct.name, error.message, error.code,
            extra={"fields": {"communicator_type": self.ct.name, "error_code": error.code,
                              "http_status": error.http_status}},
        )
        self._probe_task = asyncio.create_task(self._probe_until_up(),
                                               name=f"probe {self.ct.name}")
        self._refresh_task = asyncio.create_task(self._refresh_while_paused(),
                                                 name=f"refresh {self.ct.name}")

    async def _probe_until_up(self) -> None:
        # Let queued jobs reach this process while paused, so each gets its delayed signal.
        with contextlib.suppress(Exception):
            await self._channel.set_qos(prefetch_count=self._settings.paused_prefetch)
        interval = self._probe_floor_s
        while True:
            await asyncio.sleep(interval)
            try:
                self._client.reload_credentials()
                await self._client.echo()
            except Exception as exc:  # any failure keeps the type paused
                self._metrics.echo_probes.labels(self.ct.name, "failed").inc()
                code = getattr(exc, "code", type(exc).__name__)
                log.info("probe of %s failed: %s", self.ct.name, code,
                         extra={"fields": {"communicator_type": self.ct.name,
                                           "error_code": code}})
                interval = max(self._probe_floor_s, min(interval * 2, PROBE_MAX_INTERVAL_S))
                continue
            self._metrics.echo_probes.labels(self.ct.name, "passed").inc()
            break
        log.info("communicator type %s resumed after %.1f s", self.ct.name,
                 time.monotonic() - self._paused_at,
                 extra={"fields": {"communicator_type": self.ct.name}})
        if self._refresh_task is not None and not self._refreshing:
            self._refresh_task.cancel()  # asleep; a hand-back under way finishes by itself
        with contextlib.suppress(Exception):
            await self._channel.set_qos(prefetch_count=self._prefetch)
        self._succeeded_since_resume = False
        self._metrics.communicator_up.labels(self.ct.name).set(1)
        self._client.resume()
        async with self._state:
            self._pause = None
            self._paused.clear()
            self._state.notify_all()

    async def _refresh_while_paused(self) -> None:
        """Before the broker's consumer timeout, hand held messages back and consume again."""
        while True:
            await asyncio.sleep(self._settings.hold_refresh_seconds)
            if self._pause is None:
                return
            log.info("handing %d held messages of %s back to the queue", self._unsettled,
                     self.ct.name, extra={"fields": {"communicator_type": self.ct.name}})
            self._refreshing = True
            try:
                await self.stop_consuming()
                await self._notify(handing_back=True)
                async with self._state:
                    await self._state.wait_for(lambda: self._unsettled == 0)
                    self._handing_back = False
                self.hand_backs += 1
                await self.start()
            finally:
                self._refreshing = False
