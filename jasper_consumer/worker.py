"""Stage 2, one per communicator type: apply jobs to Control Center, in order per SIM.

The work queue has a single active consumer, so this process is the only one
talking to the account. Within it:

* **order per ICCID** — a job waits until the previous job for its ICCID is done;
  jobs for other ICCIDs run concurrently, within the client's :class:`~.jasper.Limiter`;
* **coalescing** — a job identical to the last queued or in-flight job for its
  ICCID joins that call instead of making its own; each job still gets a signal;
* **pause** — an error that says the type's settings are wrong (bad key, API
  version, role) stops calls: each waiting job gets one ``jasper.delayed`` signal,
  Echo probes (re-reading ``api_key_file``) run with back-off, and when one passes
  the jobs go on in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from . import log as jlog
from . import signals
from .config import Command, CommunicatorType, Settings
from .edge import settle
from .errors import (
    CommunicatorMisconfigured,
    JasperError,
    RetriesExhausted,
)
from .events import Job
from .history import Publisher
from .jasper import CallResult, JasperClient
from .metrics import Metrics
from .signals import Signal, SignalError

log = logging.getLogger(__name__)

PROBE_MIN_INTERVAL_S = 1.0
PROBE_MAX_INTERVAL_S = 30.0
PROBE_REPAUSE_MAX_S = 300.0


@dataclass(eq=False)
class _Call:
    """One API call that serves one or more identical jobs for an ICCID."""

    command: Command
    result: asyncio.Future[CallResult | JasperError]
    followers: int = 0
    previous: _Call | None = None


@dataclass
class _Pause:
    error: JasperError
    since: float = field(default_factory=time.monotonic)


class Worker:
    """Consumes ``<prefix>.work.<slug>`` for one communicator type."""

    def __init__(
        self,
        ct: CommunicatorType,
        settings: Settings,
        client: JasperClient,
        publisher: Publisher,
        metrics: Metrics,
    ) -> None:
        self.ct = ct
        self._settings = settings
        self._client = client
        self._publisher = publisher
        self._metrics = metrics
        self._tails: dict[str, _Call] = {}
        self._up = asyncio.Event()
        self._up.set()
        self._pause: _Pause | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._probe_floor_s = PROBE_MIN_INTERVAL_S
        self._succeeded_since_resume = True
        metrics.communicator_up.labels(ct.name).set(1)

    @property
    def paused(self) -> bool:
        return self._pause is not None

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        await settle(message, self._handle, self._metrics, "apply")

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task

    # -- one job ---------------------------------------------------------------------------

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        started = time.perf_counter()
        try:
            job = Job.model_validate_json(message.body)
        except ValidationError as exc:
            reason = f"work item is not a job: {exc.error_count()} problem(s), first: " \
                     f"{exc.errors()[0]['msg']}"
            await self._publisher.dead_letter(message.body, reason,
                                              message_id=message.message_id)
            self._metrics.dead_lettered.labels("invalid_job").inc()
            log.error(reason, extra={"fields": {"message_id": message.message_id}})
            return

        # Up to the first await this runs in delivery order: join or extend the chain here.
        tail = self._tails.get(job.iccid)
        if tail is not None and tail.command is job.command and not tail.result.done():
            tail.followers += 1
            self._metrics.coalesced.labels(self.ct.name).inc()
            outcome = await asyncio.shield(tail.result)
            await self._finish(job, outcome, started, attempts=0)
            return

        loop = asyncio.get_running_loop()
        call = _Call(job.command, loop.create_future(), previous=tail)
        self._tails[job.iccid] = call
        try:
            if tail is not None:
                await asyncio.wait([tail.result])
            call.previous = None
            outcome = await self._apply(job)
        except BaseException as exc:
            if not call.result.done():
                call.result.set_result(JasperError("INTERRUPTED", f"not applied: {exc!r}"))
            raise
        finally:
            if self._tails.get(job.iccid) is call:
                del self._tails[job.iccid]
        call.result.set_result(outcome)
        attempts = outcome.attempts
        await self._finish(job, outcome, started, attempts=attempts)

    async def _apply(self, job: Job) -> CallResult | JasperError:
        """Call Control Center until the job succeeds or fails for good; wait out pauses."""
        attempts = 0
        delayed_sent = job.delayed_signalled
        while True:
            if self._pause is not None:
                if not delayed_sent:
                    await self._send_delayed(job, self._pause.error, attempts)
                    delayed_sent = True
                await self._up.wait()
                continue
            try:
                result = await self._client.change_status(job.iccid, job.command)
            except CommunicatorMisconfigured as exc:
                attempts += exc.attempts
                self._enter_pause(exc)
                continue
            except JasperError as exc:
                attempts += exc.attempts
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
                _event_body(job), outcome.code, message_id=job.event_id,
                headers={"x-jasper-last-error": outcome.last.code},
                content_type="application/json",
            )
            self._metrics.dead_lettered.labels("retries_exhausted").inc()
        self._metrics.commands.labels(self.ct.name, job.command.value, signal.outcome).inc()
        if signal.outcome is signals.Outcome.SUCCEEDED:
            self._metrics.last_success.labels(self.ct.name).set(time.time())
        jlog.outcome(
            event_id=job.event_id, client_id=job.client_id, communicator_type=self.ct.name,
            command=job.command, outcome=signal.outcome, iccid=job.iccid,
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
        self._metrics.delayed.labels(self.ct.name).inc()
        jlog.outcome(
            event_id=job.event_id, client_id=job.client_id, communicator_type=self.ct.name,
            command=job.command, outcome="delayed", iccid=job.iccid, error_code=error.code,
            attempts=attempts,
        )

    # -- pause and probe -------------------------------------------------------------------

    def _enter_pause(self, error: JasperError) -> None:
        if self._pause is not None:
            return
        if not self._succeeded_since_resume:
            # Echo passed but real calls still fail (e.g. a role without SIM access).
            self._probe_floor_s = min(self._probe_floor_s * 2, PROBE_REPAUSE_MAX_S)
        self._pause = _Pause(error)
        self._up.clear()
        self._metrics.communicator_up.labels(self.ct.name).set(0)
        log.error(
            "communicator type %s paused: %s (%s)", self.ct.name, error.message, error.code,
            extra={"fields": {"communicator_type": self.ct.name, "error_code": error.code}},
        )
        self._probe_task = asyncio.create_task(self._probe_until_up(), name=f"probe {self.ct.name}")

    async def _probe_until_up(self) -> None:
        interval = self._probe_floor_s
        while True:
            await asyncio.sleep(interval)
            try:
                self._client.reload_credentials()
                await self._client.echo()
            except Exception as exc:  # any failure keeps the type paused
                code = getattr(exc, "code", type(exc).__name__)
                log.info("probe of %s failed: %s", self.ct.name, code,
                         extra={"fields": {"communicator_type": self.ct.name,
                                           "error_code": code}})
                interval = min(max(interval * 2, self._probe_floor_s), max(
                    PROBE_MAX_INTERVAL_S, self._probe_floor_s))
                continue
            break
        log.info("communicator type %s resumed", self.ct.name,
                 extra={"fields": {"communicator_type": self.ct.name}})
        self._pause = None
        self._succeeded_since_resume = False
        self._metrics.communicator_up.labels(self.ct.name).set(1)
        self._up.set()


def _event_body(job: Job) -> bytes:
    return json.dumps(job.to_event()).encode()
