"""The whole pause of a communicator type (operator guide, sections 5 and 13): when to pause,
how to probe, when to resume. The worker's side of it (parking waiting jobs with their delayed
signal, draining them after the resume) comes in through two hooks; this module never imports
the worker.

:class:`PauseRules` is the decision, with no I/O: fed every answer Control Center gives,
it says whether to go on, to ask Echo whether the account is down, or to pause; and once
paused, how long to wait between Echo probes. :class:`Pause` performs it: it runs the
probes (re-reading ``api_key_file`` first), calls ``on_pause`` / ``on_resume``, and keeps
``jasper_communicator_up`` right. Only the process that owns the type runs a ``Pause``
(operator guide, section 13): :meth:`Pause.stop` ends probing the moment ownership is lost.

::

    RUNNING ─ pause code (10000001/10000024/10000030, 401 without code) ─▶ PAUSED
    RUNNING ─ 3 transient failures in a row, and Echo fails too ────────▶ PAUSED
    PAUSED ── Echo probes: floor, doubling up to 30 s; one passes ───────▶ RUNNING
    the first real call after a resume pauses again: the floor doubles (1 s … 5 min)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from enum import Enum
from typing import Any

from .errors import JasperError, TypePaused
from .metrics import Metrics
from .outcomes import ErrorInfo

log = logging.getLogger(__name__)

PROBE_MIN_S = 1.0  # at most one Echo a second
PROBE_CAP_S = 30.0  # at least one every 30 s …
PROBE_REPAUSE_CAP_S = 300.0  # … or every 5 min once Echo passes but real calls still pause
OUTAGE_STREAK = 3  # transient failures in a row, across events, before Echo is asked
#: The delayed signal's error for a job that waits behind jobs parked by a pause this
#: process did not see (it took the type over with jobs already parked).
BACKLOG = ErrorInfo("PAUSE_BACKLOG", None, "jobs held up by an earlier pause of this "
                    "communicator type are applied first", True)


class Verdict(Enum):
    GO = "go"  # carry on with this job (retry if the error is retryable)
    ASK_ECHO = "ask_echo"  # many transient failures in a row: is the account down?
    PAUSE = "pause"


class PauseRules:
    """The pause as a state machine; see the module docstring."""

    def __init__(self, outage_streak: int = OUTAGE_STREAK) -> None:
        self.outage_streak = outage_streak
        self.error: ErrorInfo | None = None  # set while paused
        self.streak = 0
        self.floor_s = PROBE_MIN_S
        self._proven = True  # a real call succeeded since the last resume

    @property
    def paused(self) -> bool:
        return self.error is not None

    def answered(self, err: JasperError | None) -> Verdict:
        """A real call ended: ``err`` None for success."""
        if err is None:
            self.streak = 0
            self._proven = True
            self.floor_s = PROBE_MIN_S
            return Verdict.GO
        if err.pauses_type:
            self.enter(ErrorInfo.of(err, retryable=True))
            return Verdict.PAUSE
        if not err.retryable:
            self.streak = 0
            return Verdict.GO
        self.streak += 1
        return Verdict.ASK_ECHO if self.streak >= self.outage_streak else Verdict.GO

    def echo_answered(self, err: JasperError | None, last: JasperError) -> Verdict:
        """Echo after a streak of transient failures: ``last`` is the streak's last error."""
        if err is None:
            self.streak = 0
            return Verdict.GO
        if err.pauses_type:
            self.enter(ErrorInfo.of(err, retryable=True))
        else:
            self.enter(ErrorInfo.of(last, retryable=True))
        return Verdict.PAUSE

    def enter(self, error: ErrorInfo) -> bool:
        """Pause with ``error``; False if already paused."""
        if self.error is not None:
            return False
        if not self._proven:  # Echo passed, yet real calls still pause: probe less often
            self.floor_s = min(self.floor_s * 2, PROBE_REPAUSE_CAP_S)
        self.error = error
        return True

    def probe_waits(self) -> Iterator[float]:
        """Seconds before each Echo probe of this pause: floor, doubling up to the cap."""
        cap = max(PROBE_CAP_S, self.floor_s)
        wait = self.floor_s
        while True:
            yield wait
            wait = min(wait * 2, cap)

    def resumed(self) -> None:
        self.error = None
        self.streak = 0
        self._proven = False


class Pause:
    """Runs :class:`PauseRules` for one communicator type in the owning process."""

    def __init__(
        self,
        name: str,
        metrics: Metrics,
        *,
        echo: Callable[[], Awaitable[None]],
        on_pause: Callable[[ErrorInfo], Awaitable[None]],
        on_resume: Callable[[], Awaitable[None]],
        rules: PauseRules | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.name = name
        self._sleep = sleep  # the wait before each probe (a test drives it)
        self.rules = rules or PauseRules()
        self._echo = echo  # one Echo call with freshly read credentials; raises JasperError
        self._on_pause = on_pause
        self._on_resume = on_resume
        self._up = metrics.communicator_up.labels(name)
        self._probes = {r: metrics.echo_probes.labels(name, r) for r in ("passed", "failed")}
        self._pausing = asyncio.Event()  # set while the type is paused
        self._echo_lock = asyncio.Lock()
        self._probing: asyncio.Task[None] | None = None
        self._resuming: asyncio.Task[Any] | None = None
        self._since = 0.0
        self._since_unix: float | None = None  # the status page's "paused since"
        self._next_probe_unix: float | None = None
        self._last: ErrorInfo | None = None
        self._up.set(1)

    @property
    def error(self) -> ErrorInfo | None:
        """The error that paused the type; None while it runs."""
        return self.rules.error

    @property
    def since(self) -> float | None:
        """Unix time the current pause began; None while the type runs."""
        return self._since_unix if self.rules.error is not None else None

    @property
    def next_probe_at(self) -> float | None:
        """Unix time of the next Echo probe while paused; None otherwise."""
        return self._next_probe_unix if self.rules.error is not None else None

    @property
    def last_error(self) -> ErrorInfo:
        """The error of the latest pause (for jobs that wait behind its backlog)."""
        return self._last or BACKLOG

    def check(self) -> None:
        """Raise :class:`TypePaused` while the type is paused (before each attempt)."""
        if self.rules.error is not None:
            raise TypePaused(self.rules.error)

    async def sleep(self, seconds: float) -> None:
        """A back-off wait that ends early when the type pauses meanwhile (at once if it
        already is)."""
        self.check()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._pausing.wait()
        self.check()

    async def observe(self, err: JasperError | None) -> None:
        """A real call ended; raise :class:`TypePaused` if the type is (now) paused."""
        verdict = self.rules.answered(err)
        if verdict is Verdict.ASK_ECHO:
            assert err is not None
            async with self._echo_lock:
                self.check()  # another job's Echo may have paused it meanwhile
                if self.rules.streak >= self.rules.outage_streak:
                    verdict = self.rules.echo_answered(await self._try_echo(), err)
        if verdict is Verdict.PAUSE:
            await self._paused()
        self.check()

    async def _try_echo(self) -> JasperError | None:
        try:
            await self._echo()
        except JasperError as exc:
            return exc
        return None

    async def _paused(self) -> None:
        error = self.rules.error
        assert error is not None
        if self._probing is not None and not self._probing.done():
            return
        self._since = time.monotonic()
        self._since_unix = time.time()
        self._last = error
        self._pausing.set()
        self._up.set(0)
        log.error("communicator type %s paused: %s (%s)", self.name, error.message, error.code,
                  extra={"fields": {"communicator_type": self.name, "error_code": error.code,
                                    "http_status": error.http_status}})
        self._probing = asyncio.create_task(self._probe(), name=f"probe {self.name}")
        await self._on_pause(error)

    async def _probe(self) -> None:
        for wait in self.rules.probe_waits():
            self._next_probe_unix = time.time() + wait
            await self._sleep(wait)
            err = await self._try_echo()
            if err is None:
                self._probes["passed"].inc()
                break
            self._probes["failed"].inc()
            log.info("probe of %s failed: %s", self.name, err.code,
                     extra={"fields": {"communicator_type": self.name, "error_code": err.code}})
        log.info("communicator type %s resumed after %.1f s", self.name,
                 time.monotonic() - self._since,
                 extra={"fields": {"communicator_type": self.name}})
        self.rules.resumed()
        self._pausing.clear()
        self._up.set(1)
        # From here this task is no longer the prober: a pause that lands while the hook
        # runs starts a prober of its own (it would wait for this one otherwise, for ever).
        self._probing, self._resuming = None, asyncio.current_task()
        try:
            await self._on_resume()
        except Exception:  # the hook gives the type back itself; this is a backstop
            log.exception("resuming %s failed", self.name)
        finally:
            self._resuming = None

    async def stop(self) -> None:
        """No more probes (ownership lost, or shutting down); the pause is forgotten."""
        for task in (self._probing, self._resuming):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                # A probe whose Echo was refused a start (the limiter is aborted when the
                # type is let go) ends with that refusal: it is over either way.
                with contextlib.suppress(asyncio.CancelledError, TypePaused):
                    await task
        self._probing = self._resuming = None
        self.rules = PauseRules(self.rules.outage_streak)
        self._pausing.clear()
        self._up.set(1)
