"""The Control Center client: Basic auth, one request per call, within the account's limits.

One :class:`JasperClient` per communicator type, with its own HTTP session, credentials
and :class:`~.limiter.Limiter`. Each method makes exactly one request; retrying is
:func:`~.retry.change_status`'s business. Every answer that is not a success becomes a
:class:`~jasper_consumer.errors.JasperError` in :mod:`.answers`; no aiohttp exception
leaves this module, and no message carries the API key or proxy credentials.

TLS is verified against the system's CAs, or the type's ``ca_file`` (re-read with the
API key before each Echo probe, so a replaced CA bundle applies without a restart). A
type's ``proxy`` (or the one the environment gave it, see :mod:`..config`) carries every
request (HTTP CONNECT for ``https://``), its credentials sent as ``Proxy-Authorization``.
Requests say who sends them
(``User-Agent: jasper-consumer/<version> (<host> pid <pid>)``), so Control Center's logs
and the simulator can tell the service's processes apart.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, urlencode

import aiohttp
from pydantic import SecretStr
from yarl import URL

from .. import __version__, tls
from ..config import Command, CommunicatorType
from ..errors import ConfigError, JasperError, JasperRejected
from ..metrics import Metrics
from .answers import (
    MAX_BODY_BYTES,
    already_in_status,
    api_error,
    classify,
    code_label,
    parse_json,
    proxy_refused,
    transport_failure,
)
from .limiter import Limiter

_MIN_SCRUBBED_KEY = 4  # shorter keys are not scrubbed from bodies (it would mangle the text)
USER_AGENT = f"jasper-consumer/{__version__} ({socket.gethostname()} pid {os.getpid()})"


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP answer, read up to :data:`MAX_BODY_BYTES`, the API key scrubbed from it."""

    status: int
    body: bytes
    content_type: str
    retry_after: str | None


class JasperClient:
    """Calls one communicator type's Control Center account within its limits."""

    def __init__(
        self,
        ct: CommunicatorType,
        metrics: Metrics,
        *,
        session: aiohttp.ClientSession | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self.ct = ct
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
        self._ssl: ssl.SSLContext | bool = True  # True: the system's CAs
        self._proxy: URL | None = None
        self._proxy_authorization: SecretStr | None = None
        if ct.proxy_url is not None:
            proxy = URL(ct.proxy_url)
            self._proxy = proxy.with_user(None)
            if proxy.user is not None:
                token = base64.b64encode(f"{proxy.user}:{proxy.password or ''}".encode())
                self._proxy_authorization = SecretStr(f"Basic {token.decode('ascii')}")
        self._inflight = metrics.inflight.labels(ct.name)
        self._durations = {label: metrics.api_request_duration.labels(ct.name, label)
                           for label in ("activate", "deactivate", "get", "echo", "search")}

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
        """Read the credentials and ``ca_file``, and open the HTTP session (if none was
        given); raises ConfigError."""
        self.reload_credentials()
        self.reload_ca_file()
        if self._session is None:
            self._session = aiohttp.ClientSession(
                trace_configs=[self.limiter.trace_config()],
                connector=aiohttp.TCPConnector(limit=self.ct.max_concurrency + 1),
                timeout=self._timeout,
                headers={"User-Agent": USER_AGENT},
            )

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

    def reload_ca_file(self) -> None:
        """Re-read ``ca_file`` (a replaced bundle applies); raises ConfigError."""
        if self.ct.ca_file is None:
            return
        try:
            self._ssl = tls.client_context(self.ct.ca_file)
        except (OSError, ssl.SSLError):
            problems = tls.file_problems(f"communicator type {self.ct.name!r}", self.ct.ca_file)
            raise ConfigError(problems or [f"communicator type {self.ct.name!r}: ca_file "
                                           f"{str(self.ct.ca_file)!r} cannot be used"]) from None

    # --- calls: one request each ----------------------------------------------------------

    async def put_status(
        self, iccid: str, command: Command, *, admit: Callable[[], None] | None = None,
        granted: bool = False,
    ) -> str:
        """Edit Device Details: set the SIM to ``command.target_status``; return that status.

        ``admit`` runs once the limiter grants the start, right before the request: it may
        raise (the type paused meanwhile) and the request is not sent. ``granted``: the
        caller already holds a start of the limiter (:meth:`Limiter.acquire`); this call
        uses it and gives it back.
        """
        answer = await self._call("PUT", f"/devices/{quote(iccid, safe='')}", command.value,
                                  {"status": command.target_status}, admit=admit,
                                  granted=granted)
        data = parse_json(answer.body)
        if answer.status in (200, 202) and isinstance(data, dict) and "iccid" in data:
            return command.target_status
        code, message = api_error(answer.body)
        if code is not None and already_in_status(code, message):
            return command.target_status  # already in that status: success
        raise self._error(answer)

    async def get_device(self, iccid: str) -> dict[str, Any]:
        """Get Device Details."""
        answer = await self._call("GET", f"/devices/{quote(iccid, safe='')}", "get")
        data = parse_json(answer.body)
        if answer.status == 200 and isinstance(data, dict) and "iccid" in data:
            return data
        raise self._error(answer)

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
        answer = await self._call("GET", path, "search")
        data = parse_json(answer.body)
        if (answer.status == 200 and isinstance(data, dict)
                and isinstance(data.get("devices"), list)):
            return data
        raise self._error(answer)

    async def echo(self, word: str = "jasper-consumer") -> None:
        """Echo: checks the credentials without touching a SIM."""
        answer = await self._call("GET", f"/echo/{quote(word, safe='')}", "echo")
        data = parse_json(answer.body)
        if answer.status == 200 and isinstance(data, dict) and data.get("context") == word:
            return
        raise self._error(answer)

    async def probe(self) -> None:
        """Echo with freshly read credentials (a rotated ``api_key_file`` applies)."""
        try:
            self.reload_credentials()
        except ConfigError as exc:  # an unreadable key file keeps the type paused, says why
            raise JasperRejected("UNREADABLE_API_KEY", "; ".join(exc.problems)) from None
        try:
            self.reload_ca_file()
        except ConfigError as exc:
            raise JasperRejected("UNREADABLE_CA_FILE", "; ".join(exc.problems)) from None
        await self.echo()

    # --- internals ------------------------------------------------------------------------

    def _error(self, answer: Answer) -> JasperError:
        if answer.status == 407:  # a proxy's answer (to a plain http:// address)
            err = proxy_refused(407, self.ct.proxy_shown or "a proxy on the way", self._host,
                                self._proxy_authorization is not None, self.ct.proxy_setting)
        else:
            err = classify(answer.status, answer.body, answer.content_type, answer.retry_after)
        return self._count(err)

    def _count(self, err: JasperError) -> JasperError:
        self._metrics.api_errors.labels(self.ct.name, code_label(err.code)).inc()
        err.attempts = 1  # each method makes one request
        return err

    async def _call(
        self, method: str, path: str, label: str, payload: dict[str, str] | None = None,
        *, query: dict[str, str] | None = None, admit: Callable[[], None] | None = None,
        granted: bool = False,
    ) -> Answer:
        """One HTTP call through the limiter; network failures become JasperUnreachable."""
        if not granted:
            await self.limiter.acquire()
        try:
            if admit is not None:
                admit()
        except BaseException:
            self.limiter.discard()
            raise
        try:
            return await self._request(method, path, label, payload, query)
        finally:
            self.limiter.release()

    async def _request(self, method: str, path: str, label: str,
                       payload: dict[str, str] | None, query: dict[str, str] | None) -> Answer:
        if self._api_key is None or self._session is None:
            await self.start()
        assert self._api_key is not None
        assert self._session is not None
        key = self._api_key.get_secret_value()
        headers = {"Accept": "application/json",
                   "Authorization": self._authorization.get_secret_value()}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        proxy_headers = None
        if self._proxy_authorization is not None:
            proxy_headers = {"Proxy-Authorization": self._proxy_authorization.get_secret_value()}
        url = f"{self.ct.server_address}{path}"
        if query:
            url = f"{url}?{urlencode(query)}"
        self._inflight.inc()
        started = time.perf_counter()
        try:
            async with self._session.request(
                method, url, json=payload, headers=headers, timeout=self._timeout,
                allow_redirects=False, trace_request_ctx=asyncio.current_task(),
                ssl=self._ssl, proxy=self._proxy, proxy_headers=proxy_headers,
            ) as resp:
                body = await _read_capped(resp.content, MAX_BODY_BYTES)
                if len(key) >= _MIN_SCRUBBED_KEY:  # an API echoing the key must not leak it
                    body = body.replace(key.encode(), b"***")
                answer = Answer(resp.status, body,
                                resp.headers.get("Content-Type", "").split(";")[0].strip(),
                                resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            err = transport_failure(exc, self._host, self.ct.request_timeout_seconds,
                                    self.ct.proxy_shown,
                                    self._proxy_authorization is not None,
                                    self.ct.proxy_setting)
            raise self._count(err) from None
        finally:
            self._durations[label].observe(time.perf_counter() - started)
            self._inflight.dec()
        return answer


async def _read_capped(stream: aiohttp.StreamReader, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit and (chunk := await stream.read(limit - size)):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
