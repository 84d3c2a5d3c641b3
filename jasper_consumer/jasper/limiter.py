"""At most ``max_concurrency`` calls in flight and call starts spaced ``1 / requests_per_second``
apart, per Control Center account (operator guide, section 13)."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from types import SimpleNamespace, TracebackType
from typing import Any

import aiohttp


class Limiter:
    """At most ``max_concurrency`` calls in flight, and call starts at least
    ``1 / requests_per_second`` apart: no bursts, since the account may count calls in
    any one-second window (operator guide, section 13). Waiters get their start slots in FIFO order.

    While calls wait, starts fall on a grid ``interval_s`` apart (``1/rps`` plus a 0.8 %
    margin), so a loop that wakes a little late does not push every later start back:
    the next one comes on the grid again, though never closer than ``min_gap_s`` (``1/rps``
    plus 0.4 %) to the previous one. An idle account starts a new grid.

    With ``count_from_send`` a start counts from when the request is written
    (``mark_sent``, called from an aiohttp trace hook), not from when its slot was
    granted: the start lock is held in between, so a pause of the event loop (a GC pass,
    say) after a grant cannot let the next request leave right behind a late one.

    :meth:`acquire` grants a slot without a ``with`` block, for a caller that decides what
    to call only once its turn has come (the worker's runners); it then either makes the
    call with the grant (:class:`~.client.JasperClient` methods take ``granted=True``),
    which releases it, or gives the grant back unused with :meth:`discard`.
    """

    def __init__(
        self,
        max_concurrency: int,
        requests_per_second: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        margin: float = 0.008,
        count_from_send: bool = False,
    ) -> None:
        if max_concurrency < 1 or requests_per_second <= 0 or margin < 0:
            raise ValueError("max_concurrency >= 1, requests_per_second > 0 and margin >= 0")
        self.interval_s = (1.0 / requests_per_second) * (1.0 + margin)
        self.min_gap_s = (1.0 / requests_per_second) * (1.0 + margin / 2)
        self.count_from_send = count_from_send
        self._clock = clock
        self._slots = asyncio.Semaphore(max_concurrency)
        self._start_lock = asyncio.Lock()  # FIFO: one waiter at a time owns the next start
        self._last_start = float("-inf")  # when the last request was sent
        self._grid = float("-inf")  # the grid point of the last start
        self._not_before = float("-inf")  # hold_off
        self._in_flight = 0
        self._unsent: asyncio.Task[Any] | None = None  # granted, request not written yet
        self._abort: Exception | None = None
        self._waiting: set[asyncio.Task[Any]] = set()
        self._allowed = asyncio.Event()  # cleared while suspended
        self._allowed.set()
        # Recent call starts (clock times), enough for calls/s over 10 s (the status page).
        self._starts: deque[float] = deque(maxlen=math.ceil(10.0 / self.interval_s) + 1)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def calls_per_second(self, window_s: float = 10.0) -> float:
        """Calls started per second over the last ``window_s`` (at most 10 s)."""
        since = self._clock() - window_s
        return sum(1 for t in self._starts if t > since) / window_s

    @property
    def suspended(self) -> bool:
        return not self._allowed.is_set()

    def suspend(self) -> None:
        """No call starts until :meth:`unsuspend` (the owner cannot tell whether it still
        owns the account); a caller waiting for its start keeps waiting."""
        self._allowed.clear()

    def unsuspend(self) -> None:
        self._allowed.set()

    def hold_off(self, seconds: float) -> None:
        """No call starts before ``seconds`` from now (a new owner of the account waits for
        the previous owner's last request to end, operator guide, section 13)."""
        self._not_before = max(self._not_before, self._clock() + seconds)

    def next_start_in(self) -> float:
        """Seconds until a call may start, by the spacing alone (0: now)."""
        return max(0.0, self._last_start + self.min_gap_s - self._clock())

    def reopen(self) -> None:
        """Undo :meth:`abort_waiting`: calls may wait for their turn again."""
        self._abort = None

    def abort_waiting(self, error: Exception) -> None:
        """Make every caller still waiting for a slot (now or later) raise ``error``."""
        self._abort = error
        for task in self._waiting:
            task.cancel()

    def _next_slot(self) -> tuple[float, float]:
        """(the earliest start allowed now, the grid point it would take)."""
        on_grid = self._grid + self.interval_s
        return max(on_grid, self._last_start + self.min_gap_s, self._not_before), on_grid

    async def acquire(self) -> None:
        """Wait for a slot and the next start time; the caller then sends its request
        (or calls :meth:`discard`) and finally :meth:`release`."""
        if self._abort is not None:
            raise self._abort
        task = asyncio.current_task()
        assert task is not None
        self._waiting.add(task)
        try:
            await self._slots.acquire()
            try:
                await self._start_lock.acquire()
                try:
                    await self._allowed.wait()
                    while True:
                        slot, on_grid = self._next_slot()
                        now = self._clock()
                        if slot <= now:
                            break
                        await asyncio.sleep(slot - now)
                    # Late by less than an interval: stay on the grid (the next start
                    # catches up); idle or held off longer: a new grid from now.
                    self._grid = on_grid if now - on_grid <= self.interval_s else now
                except BaseException:
                    self._start_lock.release()
                    raise
            except BaseException:
                self._slots.release()
                raise
        except asyncio.CancelledError:
            if self._abort is not None and task.uncancel() == 0:
                raise self._abort from None
            raise
        finally:
            self._waiting.discard(task)
        self._unsent = task
        self._in_flight += 1
        if not self.count_from_send:
            self.mark_sent()

    def mark_sent(self, task: asyncio.Task[Any] | None = None) -> None:
        """``task``'s request (default: the current task's) has been written: its start
        counts from now. Idempotent."""
        task = task or asyncio.current_task()
        if self._unsent is not None and self._unsent is task:
            self._unsent = None
            self._last_start = self._clock()
            self._starts.append(self._last_start)
            self._start_lock.release()

    def discard(self) -> None:
        """Give back a grant of the current task without a request: no start counted."""
        task = asyncio.current_task()
        if self._unsent is not None and self._unsent is task:
            self._unsent = None
            self._grid -= self.interval_s  # the slot stays free for the next waiter
            self._start_lock.release()
        self._in_flight -= 1
        self._slots.release()

    def release(self) -> None:
        """The request of the current task ended (or was never written: counted now)."""
        self.mark_sent()
        self._in_flight -= 1
        self._slots.release()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def trace_config(self) -> aiohttp.TraceConfig:
        """aiohttp hooks that tell :meth:`mark_sent` when a request is written.

        A request with a body is written (headers and body) by aiohttp in a task of its
        own, one loop pass after the headers are buffered: for it the body hook marks the
        start; the hooks name the calling task through ``trace_request_ctx``.
        """
        traces = aiohttp.TraceConfig()

        async def headers_sent(_: aiohttp.ClientSession, context: SimpleNamespace,
                               params: aiohttp.TraceRequestHeadersSentParams) -> None:
            if params.method in ("GET", "HEAD"):
                await body_sent(_, context, params)

        async def body_sent(_: aiohttp.ClientSession, context: SimpleNamespace,
                            __: object) -> None:
            task = getattr(context, "trace_request_ctx", None)
            self.mark_sent(task if isinstance(task, asyncio.Task) else None)

        traces.on_request_headers_sent.append(headers_sent)
        traces.on_request_chunk_sent.append(body_sent)
        return traces
