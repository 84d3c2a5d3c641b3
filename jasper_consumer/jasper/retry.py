"""Apply one status change, retrying transient failures (operator guide, section 5), under the
type's pause.

Retries use exponential back-off with full jitter (``backoff.expo`` +
``backoff.full_jitter``, raised to a ``Retry-After``), bounded by attempts and by total
time. Every answer is shown to the :class:`Gate` (the type's
:class:`~jasper_consumer.pause.Pause`) first: it may pause the type, and then this job
stops here with :class:`~jasper_consumer.errors.TypePaused` (carrying the calls made so
far) to be parked; a back-off wait ends early when the type pauses meanwhile.

:func:`retrying` is the same loop for a call with no pause around it (the operator
tools' Search Devices pages and Get Device Details).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import backoff

from ..config import Command, RetrySettings
from ..errors import JasperError, JasperRetryable, RetriesExhausted, TypePaused
from ..metrics import RETRY_REASONS, Metrics
from ..outcomes import ErrorInfo, Outcome
from .answers import backoff_waits, retry_reason
from .client import JasperClient

log = logging.getLogger(__name__)
T = TypeVar("T")


class RetryLog:
    """``on_retry`` for :func:`change_status`: counts ``jasper_retries_total`` and logs."""

    def __init__(self, communicator_type: str, metrics: Metrics) -> None:
        self._name = communicator_type
        self._counters = {r: metrics.retries.labels(communicator_type, r) for r in RETRY_REASONS}

    def __call__(self, err: JasperError, tries: int, wait: float) -> None:
        self._counters[retry_reason(err)].inc()
        log.info("Jasper call failed, retrying: %s", err.message, extra={"fields": {
            "communicator_type": self._name, "code": err.code,
            "http_status": err.http_status, "attempt": tries, "wait_s": round(wait, 3)}})


class Gate(Protocol):
    def check(self) -> None: ...  # raise TypePaused while paused

    async def observe(self, err: JasperError | None) -> None: ...  # may raise TypePaused

    async def sleep(self, seconds: float) -> None: ...  # ends early (TypePaused) on a pause


async def change_status(
    client: JasperClient,
    iccid: str,
    command: Command,
    policy: RetrySettings,
    gate: Gate,
    *,
    on_retry: Callable[[JasperError, int, float], None] = lambda err, tries, wait: None,
    jitter: Callable[[float], float] = backoff.full_jitter,
    clock: Callable[[], float] = time.monotonic,
    granted: bool = False,
) -> Outcome:
    """Set the SIM's status; the :class:`Outcome` says what came of it. Raises only
    :class:`TypePaused` (with ``attempts`` set).

    ``granted``: the caller holds the limiter's start for the first attempt. The retry
    budget (``max_elapsed_seconds``) counts from the first attempt's start: time spent
    waiting for the account (its limits, a new owner's wait) is not the event's."""
    attempts = 0
    started: float | None = None
    waits = backoff_waits(policy.initial_delay_seconds, policy.max_delay_seconds, jitter)
    next(waits)
    try:
        while True:
            err: JasperError | None = None
            if not granted:
                gate.check()
                await client.limiter.acquire()
            granted = False
            if started is None:
                started = clock()
            try:
                attempts += 1
                status = await client.put_status(iccid, command, admit=gate.check,
                                                 granted=True)
            except JasperError as exc:
                err = exc
            except TypePaused:
                attempts -= 1  # refused before sending: no call was made
                raise
            await gate.observe(err)
            if err is None:
                return Outcome.succeeded(status, attempts)
            if not isinstance(err, JasperRetryable):
                return Outcome.failed(ErrorInfo.of(err), attempts)
            assert started is not None
            elapsed = clock() - started
            wait = waits.send(err)
            if attempts >= policy.max_attempts or elapsed + wait > policy.max_elapsed_seconds:
                return Outcome.failed(ErrorInfo.of(RetriesExhausted(err, attempts, elapsed)),
                                      attempts)
            on_retry(err, attempts, wait)
            del err  # nothing of the failed answer outlives this iteration
            await gate.sleep(wait)
    except TypePaused as exc:
        exc.attempts = attempts
        raise


async def retrying(
    call: Callable[[], Awaitable[T]],
    policy: RetrySettings,
    *,
    jitter: Callable[[float], float] = backoff.full_jitter,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """``call()``, tried again after transient errors (:class:`JasperRetryable`) within
    ``policy``, with the service's back-off (:func:`~.answers.backoff_waits`: full jitter, at
    least ``Retry-After``), bounded by attempts and by time, waits included. Any other
    error is raised as it came; when the budget runs out, :class:`RetriesExhausted`
    carrying the last error."""
    started = clock()
    waits = backoff_waits(policy.initial_delay_seconds, policy.max_delay_seconds, jitter)
    next(waits)
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except JasperRetryable as err:
            elapsed = clock() - started
            wait = waits.send(err)
            if attempt >= policy.max_attempts or elapsed + wait > policy.max_elapsed_seconds:
                raise RetriesExhausted(err, attempt, elapsed) from None
        await sleep(wait)
