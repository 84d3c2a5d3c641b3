"""The Control Center client: Basic auth, requests, error mapping, backoff (SPEC §2, §5).

One :class:`JasperClient` per communicator type, with its own HTTP session,
credentials and :class:`Limiter`. Every answer that is not a success becomes a
:class:`~jasper_consumer.errors.JasperError` in :func:`classify`; no aiohttp
exception ever leaves this module, and no message carries the API key.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace, TracebackType
from typing import Any, Self
from urllib.parse import quote

import aiohttp
import backoff
from backoff.types import Details
from pydantic import SecretStr
from yarl import URL

from ..config import Command, CommunicatorType, RetrySettings
from ..errors import (
    CommunicatorDown,
    ConfigError,
    JasperError,
    JasperRejected,
    JasperRetryable,
    RetriesExhausted,
)
from ..metrics import Metrics
from .answers import (
    MAX_BODY_BYTES,
    CallResult,
    _api_error,
    _code_label,
    _json,
    backoff_waits,
    classify,
    retry_reason,
    transport_failure,
)
from .limiter import Limiter

_MIN_SCRUBBED_KEY = 4  # shorter keys are not scrubbed from bodies (it would mangle the text)
OUTAGE_STREAK = 3  # transient failures in a row (any events) before Echo is asked

log = logging.getLogger(__name__)

# --- the client -----------------------------------------------------------------------------


@dataclass
class _Attempts:
    """What one ``change_status`` call has done so far (shared by its retries)."""

    iccid: str
    command: Command
    started: float
    count: int = 0
    last: JasperError | None = None


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    content_type: str
    headers: Mapping[str, str]


class JasperClient:
    """Calls one communicator type's Control Center account within its limits."""

    def __init__(
        self,
        ct: CommunicatorType,
        retry: RetrySettings,
        metrics: Metrics,
        *,
        session: aiohttp.ClientSession | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self.ct = ct
        self.retry = retry
        # With our own session a trace hook tells the limiter when a request is written.
        self.limiter = limiter or Limiter(ct.max_concurrency, ct.requests_per_second,
                                          count_from_send=session is None)
        self._metrics = metrics
        self._session = session
        self._owns_session = session is None
        self._api_key: SecretStr | None = None
        self._authorization = SecretStr("")
        self._timeout = aiohttp.ClientTimeout(total=ct.request_timeout_seconds)
        self._host = URL(ct.server_address).host or ct.server_address
        self.outage_streak = OUTAGE_STREAK
        self._transient_streak = 0  # transient failures in a row, across events
        self._echo_lock = asyncio.Lock()
        self._suspended_by: JasperError | None = None
        # Built once, not per call: every change_status retries through this wrapper.
        self._retrying = backoff.on_exception(
            backoff_waits, JasperRetryable,
            factor=retry.initial_delay_seconds, max_value=retry.max_delay_seconds,
            jitter=None,  # applied in backoff_waits: full jitter, floored by Retry-After
            max_tries=retry.max_attempts, max_time=retry.max_elapsed_seconds,
            on_backoff=self._on_backoff, logger=None,
        )(self._attempt)

    # --- suspension (the worker pauses the type) ---

    def suspend(self, error: JasperError) -> None:
        """Stop calling: every attempt from now raises CommunicatorDown(error) at once."""
        self._suspended_by = error

    def resume(self) -> None:
        self._suspended_by = None
        self._transient_streak = 0

    @property
    def suspended(self) -> bool:
        return self._suspended_by is not None

    async def _check_outage(self, err: JasperError) -> None:
        """After a streak of transient failures, ask Echo whether the account is down.

        Echo failing too means the type is down: raise CommunicatorDown so the worker
        pauses it instead of spending every event's retry budget (SPEC §6). Echo
        passing means the problem is this event's: its own retries go on.
        """
        self._transient_streak += 1
        if self._transient_streak < self.outage_streak:
            return
        async with self._echo_lock:
            if self._suspended_by is not None:
                raise CommunicatorDown(self._suspended_by)
            if self._transient_streak < self.outage_streak:
                return  # another event's Echo just passed
            try:
                await self.echo()
            except JasperError as echo_err:
                if echo_err.pauses_type:
                    raise echo_err from None
                if echo_err.retryable:
                    raise CommunicatorDown(err) from None
            self._transient_streak = 0

    def __repr__(self) -> str:
        return f"JasperClient({self.ct.name!r}, {self.ct.server_address!r})"

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Read the credentials and open the HTTP session (if none was given)."""
        self.reload_credentials()
        if self._session is None:
            traces = aiohttp.TraceConfig()
            # A request with a body is written (headers and body) by aiohttp in a task of
            # its own, one loop pass after the headers are buffered: for it the body hook
            # marks the start; the hooks name the calling task through trace_request_ctx.
            traces.on_request_headers_sent.append(self._on_headers_sent)
            traces.on_request_chunk_sent.append(self._on_request_sent)
            self._session = aiohttp.ClientSession(
                trace_configs=[traces],
                connector=aiohttp.TCPConnector(limit=self.ct.max_concurrency),
                timeout=self._timeout,
            )

    async def _on_headers_sent(
        self, session: aiohttp.ClientSession, context: SimpleNamespace,
        params: aiohttp.TraceRequestHeadersSentParams,
    ) -> None:
        if params.method in ("GET", "HEAD"):
            await self._on_request_sent(session, context, params)

    async def _on_request_sent(
        self, _: aiohttp.ClientSession, context: SimpleNamespace, __: object
    ) -> None:
        task = getattr(context, "trace_request_ctx", None)
        self.limiter.mark_sent(task if isinstance(task, asyncio.Task) else None)

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def reload_credentials(self) -> None:
        """Re-read the API key (a rotated ``api_key_file`` applies); raises ConfigError."""
        key = self.ct.read_api_key()
        if ":" in self.ct.username:
            raise ConfigError([f"communicator type {self.ct.name!r}: username must not "
                               "contain ':' (HTTP Basic authentication)"])
        token = base64.b64encode(f"{self.ct.username}:{key}".encode()).decode("ascii")
        self._api_key = SecretStr(key)
        self._authorization = SecretStr(f"Basic {token}")

    # --- public calls ---

    async def change_status(self, iccid: str, command: Command) -> CallResult:
        """Set the SIM to ``command.target_status``, retrying transient failures (SPEC §5)."""
        state = _Attempts(iccid, command, started=time.monotonic())
        try:
            result: CallResult = await self._retrying(state)
        except JasperRetryable as exc:
            exc.attempts = state.count
            raise RetriesExhausted(exc, state.count, time.monotonic() - state.started) from None
        except JasperError as exc:
            exc.attempts = state.count
            raise
        return CallResult(result.sim_status, state.count)

    async def _attempt(self, state: _Attempts) -> CallResult:
        """One try of ``change_status``, wrapped with back-off once in ``__init__``."""
        if self._suspended_by is not None:
            raise CommunicatorDown(self._suspended_by)
        state.count += 1
        try:
            result = await self._put_status(state.iccid, state.command)
        except JasperRetryable as exc:
            state.last = exc
            await self._check_outage(exc)
            raise
        except JasperError as exc:
            if not exc.pauses_type:
                self._transient_streak = 0
            raise
        self._transient_streak = 0
        return result

    def _on_backoff(self, details: Details) -> None:
        state: _Attempts = details["args"][0]
        err = state.last
        assert err is not None
        self._metrics.retries.labels(self.ct.name, retry_reason(err)).inc()
        log.info("Jasper call failed, retrying: %s", err.message, extra={"fields": {
            "communicator_type": self.ct.name, "iccid": state.iccid, "code": err.code,
            "http_status": err.http_status, "attempt": details["tries"],
            "wait_s": round(details.get("wait", 0.0), 3)}})

    async def get_device(self, iccid: str) -> dict[str, Any]:
        """Get Device Details: one attempt."""
        answer = await self._single("GET", f"/devices/{quote(iccid, safe='')}", "get")
        data = _json(answer.body)
        if answer.status == 200 and isinstance(data, dict) and "iccid" in data:
            return data
        err = self._answer_error(answer)
        err.attempts = 1
        raise err

    async def search_devices(
        self,
        page_number: int,
        *,
        page_size: int = 50,
        modified_since: str = "2000-01-01T00:00:00Z",
        status: str | None = None,
    ) -> dict[str, Any]:
        """Search Devices: one page of the account's SIMs (``pageNumber``, ``lastPage``,
        ``devices``); one attempt."""
        path = (f"/devices?modifiedSince={quote(modified_since, safe='')}"
                f"&pageSize={int(page_size)}&pageNumber={int(page_number)}")
        if status is not None:
            path += f"&status={quote(status, safe='')}"
        answer = await self._single("GET", path, "search")
        data = _json(answer.body)
        if (answer.status == 200 and isinstance(data, dict)
                and isinstance(data.get("devices"), list)):
            return data
        err = self._answer_error(answer)
        err.attempts = 1
        raise err

    async def echo(self, word: str = "jasper-consumer") -> None:
        """Echo: checks the credentials without touching a SIM; one attempt."""
        answer = await self._single("GET", f"/echo/{quote(word, safe='')}", "echo")
        data = _json(answer.body)
        if answer.status == 200 and isinstance(data, dict) and data.get("context") == word:
            return
        err = self._answer_error(answer)
        err.attempts = 1
        raise err

    # --- internals ---

    async def _put_status(self, iccid: str, command: Command) -> CallResult:
        answer = await self._call(
            "PUT", f"/devices/{quote(iccid, safe='')}", command.value,
            {"status": command.target_status})
        data = _json(answer.body)
        if answer.status in (200, 202) and isinstance(data, dict) and "iccid" in data:
            return CallResult(command.target_status, 1)
        err = classify(answer.status, answer.body, answer.content_type, answer.headers)
        if isinstance(err, JasperRejected) and "already" in _api_error(answer.body)[1].lower():
            return CallResult(command.target_status, 1)  # already in that status: success
        raise self._count(err)

    async def _single(self, method: str, path: str, label: str) -> _Answer:
        try:
            return await self._call(method, path, label)
        except JasperError as exc:
            exc.attempts = 1
            raise

    def _answer_error(self, answer: _Answer) -> JasperError:
        return self._count(classify(answer.status, answer.body, answer.content_type,
                                    answer.headers))

    def _count(self, err: JasperError) -> JasperError:
        self._metrics.api_errors.labels(self.ct.name, _code_label(err.code)).inc()
        return err

    async def _call(
        self, method: str, path: str, label: str, payload: dict[str, str] | None = None
    ) -> _Answer:
        """One HTTP call through the limiter; network failures become JasperUnreachable."""
        if self._api_key is None or self._session is None:
            await self.start()
        assert self._api_key is not None
        assert self._session is not None
        key = self._api_key.get_secret_value()
        headers = {"Accept": "application/json",
                   "Authorization": self._authorization.get_secret_value()}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        async with self.limiter:
            inflight = self._metrics.inflight.labels(self.ct.name)
            inflight.inc()
            started = time.perf_counter()
            try:
                async with self._session.request(
                    method, f"{self.ct.server_address}{path}", json=payload, headers=headers,
                    timeout=self._timeout, allow_redirects=False,
                    trace_request_ctx=asyncio.current_task(),
                ) as resp:
                    body = await _read_capped(resp.content, MAX_BODY_BYTES)
                    if len(key) >= _MIN_SCRUBBED_KEY:  # an API echoing the key must not leak it
                        body = body.replace(key.encode(), b"***")
                    answer = _Answer(resp.status, body,
                                     resp.headers.get("Content-Type", "").split(";")[0].strip(),
                                     resp.headers)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                err = transport_failure(exc, self._host, self.ct.request_timeout_seconds)
                raise self._count(err) from None
            finally:
                self._metrics.api_request_duration.labels(self.ct.name, label).observe(
                    time.perf_counter() - started)
                inflight.dec()
        return answer


async def _read_capped(stream: aiohttp.StreamReader, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit and (chunk := await stream.read(limit - size)):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
