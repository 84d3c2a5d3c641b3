"""A local stand-in for Cisco Jasper Control Center, for demos, tests and benchmarks.

It speaks the part of the REST API the service uses (operator guide, section 13), under
``/rws/api/v1``:

* ``PUT /devices/{iccid}`` ``{"status": "ACTIVATED"}`` → ``{"iccid": ...}``
* ``GET /devices/{iccid}`` → the SIM's details (``iccid``, ``status``, ``ratePlan``, …)
* ``GET /devices?modifiedSince=…&pageSize=…&pageNumber=…[&status=…]`` (Search Devices) →
  ``{"pageNumber", "lastPage", "devices": [{"iccid", "status", "ratePlan",
  "communicationPlan"}]}``, pages of at most 50 in ICCID order; ``modifiedSince`` is
  required (``10000011`` without it, ``10000012`` if it is not an ISO 8601 date-time)
* ``GET /echo/{word}`` → ``{"context": word}``

and answers like the real one: HTTP Basic auth (``username:api_key``), errors as
``{"errorMessage": ..., "errorCode": "NNNNNNNN"}`` with the HTTP status of operator guide,
section 5, ``10000024`` for another API version, and per-account rate limits — more than
``max_in_flight`` calls at once, or more calls starting in any one-second window than
``requests_per_second``, get ``40000029`` and count as a violation. (For a fractional rate the
window is ``n / requests_per_second`` seconds holding ``n = max(1, floor(rate))`` starts, so a
client that starts calls ``1 / rate`` apart never trips it.)

A SIM it has not seen is created ``ACTIVATION_READY`` on first use, unless it is in
``unknown_iccids`` or starts with ``8999``: those answer ``20000001``. A SIM may belong
to an account (``add_sims(..., account=...)``): then only that account reaches it and
lists it; a SIM of no account (made on first use, or without ``account``) is reached and
listed by every account. Faults per ICCID (latency, N failures, every call failing, HTML
error pages, an own ``errorMessage``, an ``errorMessage`` padded to a large body) and per
account (``down``:
``"refuse"`` drops the connection unanswered, ``"html503"`` answers a proxy's 503 page)
make the failure paths reachable; so do faults of a whole account (every call held
``latency_s`` — ended early when the caller hangs up — and every ``fail_every``-th call
answering ``fail_http_status``/``fail_code``: a 5xx storm, injected rate-limit answers,
which are not counted as violations). Every call is kept in ``requests``, with the
``User-Agent`` it came with (which process of the service made it).

It serves plain HTTP, or HTTPS when given a certificate and key (:func:`server_context`;
``jasper-consumer simulator --tls-cert FILE --tls-key FILE``), so demos, tests and the
bench can take the path production takes, through a private CA or a forward proxy.

In-process, drive it through :class:`Simulator`'s methods. In another process
(``jasper-consumer simulator --port N``), use the admin API — JSON, no auth:

=======================================  ==============================================
``GET /_sim/requests[?since=T]``         every request served (started at or after ``T``,
                                         a ``time.monotonic()``), as a list of records
``GET /_sim/stats``                      ``{"violations", "violations_by_account", "stalls",
                                         "max_in_flight_seen", "requests"}``
``POST /_sim/reset``                     forget SIMs, faults, requests and counters
``PUT /_sim/sims/{iccid}``               ``{"status": ..., "account"?: ...}``: create or
                                         overwrite a SIM
``POST /_sim/sims``                      many at once: ``{"account"?, "sims": {iccid:
                                         status}}`` or ``{"account"?, "first": iccid,
                                         "count": n, "status": ...}`` (consecutive ICCIDs)
``GET /_sim/sims/{iccid}``               the SIM's details, 404 if unknown
``PUT /_sim/faults/{iccid}``             :meth:`Simulator.set_fault` keyword arguments
``DELETE /_sim/faults``                  clear every fault
``PUT /_sim/accounts/{username}``        ``{"api_key"?, "max_in_flight"?,
                                         "requests_per_second"?, "down"?, "latency_s"?,
                                         "fail_every"?, "fail_http_status"?, "fail_code"?,
                                         "fail_html"?}``: add or change
=======================================  ==============================================
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hmac
import json
import logging
import math
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import Settings
from ..errors import JASPER_ERROR_MEANINGS

log = logging.getLogger(__name__)

API_PATH = "/rws/api/v1"
MAX_BODY_BYTES = 64 * 1024
MAX_PAGE_SIZE = 50  # Search Devices
SEARCH_PARAMETERS = frozenset({"modifiedSince", "pageSize", "pageNumber", "status"})
SIM_STATUSES = frozenset({
    "ACTIVATED", "ACTIVATION_READY", "DEACTIVATED", "INVENTORY",
    "PURGED", "REPLACED", "RETIRED", "TEST_READY",
})
PRE_ACTIVATION = frozenset({"ACTIVATION_READY", "TEST_READY", "INVENTORY"})
FINAL = frozenset({"PURGED", "RETIRED", "REPLACED"})
# Fields Edit Device Details accepts; anything else is 10000028.
EDITABLE = frozenset({"status", "ratePlan", "communicationPlan", "customer", "deviceID", "modemID"})
ALREADY_IN_STATUS = "10030000"
RATE_PLAN = "M2M One 10MB"
COMMUNICATION_PLAN = "M2M One Data + SMS"

_Body = TypeVar("_Body", bound=BaseModel)
Action = Callable[[web.Request, "RequestRecord"], Awaitable[dict[str, Any]]]


@dataclass
class Account:
    """One Control Center account: its credentials, its limits and whether it is up."""

    username: str
    api_key: str
    max_in_flight: int = 1
    requests_per_second: float = 5.0
    down: str | None = None  # None, "refuse" (drop the connection) or "html503"
    # Faults of every call of the account: held this long (a hanging API; the call ends
    # early, unanswered, when the caller hangs up), and every ``fail_every``-th admitted
    # call answering ``fail_http_status`` with ``fail_code`` (None: no code; ``fail_html``:
    # a proxy's HTML page). Injected answers are never counted as violations.
    latency_s: float = 0.0
    fail_every: int = 0
    fail_http_status: int = 500
    fail_code: str | None = "30000001"
    fail_html: bool = False


@dataclass
class RequestRecord:
    """One request as the simulator saw it; ``http_status`` 0 means dropped unanswered.

    ``started`` and ``finished`` are ``time.monotonic()`` (on Linux one clock for every
    process on the host, so a test can compare them with its own).
    """

    started: float
    finished: float
    account: str | None
    method: str
    path: str
    iccid: str | None
    requested_status: str | None
    http_status: int
    error_code: str | None
    user_agent: str | None = None
    violation: str | None = None  # "concurrency" or "rate": the call broke the account's limit


@dataclass(eq=False)
class _Call:
    """An admitted call, counted in its account's calls in flight until released (once)."""

    request: web.Request
    record: RequestRecord
    released: bool = False


class _Fault(BaseModel):
    """What :meth:`Simulator.set_fault` set for one ICCID (also the admin API's body)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    latency_s: float = Field(0.0, ge=0)
    fail_times: int = Field(0, ge=0)
    always_fail: bool = False
    error_code: str = "30000001"
    http_status: int = Field(500, ge=100, le=599)
    html: bool = False
    error_message: str | None = None  # instead of the code's documented meaning
    body_pad_bytes: int = Field(0, ge=0)  # "x" characters appended to errorMessage


class _SimChange(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    status: str
    account: str | None = None


class _SimBatch(BaseModel):
    """The admin API's body for creating many SIMs: a map, or a run of consecutive ICCIDs."""

    model_config = ConfigDict(extra="forbid", strict=True)
    account: str | None = None
    sims: dict[str, str] = Field(default_factory=dict)
    first: str | None = Field(None, pattern=r"^[0-9]{1,22}$")
    count: int = Field(0, ge=0, le=1_000_000)
    status: str | None = None


class _AccountChange(BaseModel):
    """The admin API's body for adding or changing an account; only the keys sent apply."""

    model_config = ConfigDict(extra="forbid", strict=True)
    api_key: str = Field("", min_length=1)
    max_in_flight: int = Field(1, ge=1)
    requests_per_second: float = Field(5.0, gt=0)
    down: Literal["refuse", "html503"] | None = None
    latency_s: float = Field(0.0, ge=0)
    fail_every: int = Field(0, ge=0)
    fail_http_status: int = Field(500, ge=100, le=599)
    fail_code: str | None = None
    fail_html: bool = False


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class _Sim:
    status: str
    date_added: str = field(default_factory=_now)
    date_updated: str = field(default_factory=_now)
    date_activated: str | None = None
    account: str | None = None  # None: every account reaches and lists it


class _Answer(Exception):
    """Stop handling and answer with this error (code ``None``: message only)."""

    def __init__(self, http_status: int, code: str | None, message: str = "",
                 *, html: bool = False) -> None:
        super().__init__(message)
        self.http_status, self.code, self.html = http_status, code, html
        self.message = message or JASPER_ERROR_MEANINGS.get(code or "", "Error")

    def response(self) -> web.Response:
        if self.html:
            page = (f"<html><head><title>{self.http_status}</title></head>"
                    f"<body><h1>{self.http_status}</h1><p>{self.message}</p></body></html>")
            return web.Response(status=self.http_status, content_type="text/html", text=page)
        body: dict[str, str] = {"errorMessage": self.message}
        if self.code is not None:
            body["errorCode"] = self.code
        return web.json_response(body, status=self.http_status)


def _error(code: str, message: str = "") -> _Answer:
    http_status = {"10000001": 401, "20000001": 404, "30000001": 500}.get(code, 400)
    return _Answer(http_status, code, message)


class Simulator:
    """Control Center's device API, in memory, with rate limits and injectable faults."""

    def __init__(self, *, rate_limit_http_status: int = 429,
                 already_in_status_error: bool = False) -> None:
        self.rate_limit_http_status = rate_limit_http_status
        self.already_in_status_error = already_in_status_error
        self.accounts: dict[str, Account] = {}
        self.unknown_iccids: set[str] = set()
        self.latency_s = 0.0
        self.requests: list[RequestRecord] = []
        self.violations = 0
        self.violations_by_account: dict[str, int] = collections.defaultdict(int)
        self.max_in_flight_seen: dict[str, int] = {}
        self.base_url = ""
        self.port = 0
        self._sims: dict[str, _Sim] = {}
        self._faults: dict[str, _Fault] = {}
        self._in_flight: dict[str, int] = collections.defaultdict(int)
        self._starts: dict[str, collections.deque[float]] = collections.defaultdict(
            collections.deque)
        self._admitted: dict[str, int] = collections.defaultdict(int)  # for fail_every
        self._holding: dict[str, set[_Call]] = collections.defaultdict(set)  # latency_s
        self._runner: web.AppRunner | None = None
        self._lag_watch: asyncio.Task[None] | None = None
        # (monotonic time it ended, seconds late) of each stall of this process's loop
        self.stalls: collections.deque[tuple[float, float]] = collections.deque(maxlen=10_000)

    # -- state, for tests and the admin API ------------------------------------------

    def add_account(self, username: str, api_key: str, *, max_in_flight: int = 1,
                    requests_per_second: float = 5.0) -> Account:
        account = Account(username, api_key, max_in_flight, requests_per_second)
        self.accounts[username] = account
        return account

    def set_status(self, iccid: str, status: str, *, account: str | None = None) -> None:
        """Create or change a SIM; ``account`` (when given) makes it that account's own."""
        if status not in SIM_STATUSES:
            raise ValueError(f"unknown SIM status {status!r}")
        sim = self._sims.setdefault(iccid, _Sim(status))
        if account is not None:
            sim.account = account
        self._change(sim, status)

    def add_sims(self, sims: Mapping[str, str], *, account: str | None = None) -> None:
        """Create (or overwrite) many SIMs at once: ICCID -> status, all of ``account``."""
        unknown = set(sims.values()) - SIM_STATUSES
        if unknown:
            raise ValueError(f"unknown SIM status {sorted(unknown)[0]!r}")
        for iccid, status in sims.items():
            self.set_status(iccid, status, account=account)

    def add_sim_range(self, first: str, count: int, status: str, *,
                      account: str | None = None) -> list[str]:
        """Create ``count`` SIMs with consecutive ICCIDs from ``first`` (same width), all
        ``status``; return their ICCIDs."""
        start, width = int(first), len(first)
        iccids = [str(start + i).zfill(width) for i in range(count)]
        self.add_sims(dict.fromkeys(iccids, status), account=account)
        return iccids

    def status(self, iccid: str) -> str | None:
        sim = self._sims.get(iccid)
        return sim.status if sim else None

    def set_fault(self, iccid: str, *, latency_s: float = 0.0, fail_times: int = 0,
                  always_fail: bool = False, error_code: str = "30000001",
                  http_status: int = 500, html: bool = False, error_message: str | None = None,
                  body_pad_bytes: int = 0) -> None:
        """Make calls for ``iccid`` slow (``latency_s``) and/or fail: the next
        ``fail_times`` calls, or every call with ``always_fail``, answering ``error_code``
        with ``error_message`` (default: the code's meaning) padded by ``body_pad_bytes``."""
        self._faults[iccid] = _Fault(
            latency_s=latency_s, fail_times=fail_times, always_fail=always_fail,
            error_code=error_code, http_status=http_status, html=html,
            error_message=error_message, body_pad_bytes=body_pad_bytes)

    def clear_faults(self) -> None:
        self._faults.clear()

    def calls(self, iccid: str | None = None, method: str | None = None) -> list[RequestRecord]:
        return [r for r in self.requests
                if (iccid is None or r.iccid == iccid) and (method is None or r.method == method)]

    def reset(self) -> None:
        """Forget SIMs (and ``unknown_iccids``), faults (and ``latency_s``), requests and
        counters; accounts and the calls in flight stay."""
        self._sims.clear()
        self._faults.clear()
        self.unknown_iccids.clear()
        self.latency_s = 0.0
        self.requests.clear()
        self.violations = 0
        self.violations_by_account.clear()
        self.max_in_flight_seen.clear()
        self._starts.clear()
        self._admitted.clear()

    # -- serving ---------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.add_routes([
            web.put(API_PATH + "/devices/{iccid}", self._api(self._put_device)),
            web.get(API_PATH + "/devices/{iccid}", self._api(self._get_device)),
            web.get(API_PATH + "/devices", self._api(self._search_devices)),
            web.get(API_PATH + "/echo/{word}", self._api(self._echo)),
            web.route("*", "/rws/api/{version}/{tail:.*}", self._api(self._elsewhere)),
            web.get("/_sim/requests", self._admin_requests),
            web.get("/_sim/stats", self._admin_stats),
            web.post("/_sim/reset", self._admin_reset),
            web.put("/_sim/sims/{iccid}", self._admin_put_sim),
            web.post("/_sim/sims", self._admin_post_sims),
            web.get("/_sim/sims/{iccid}", self._admin_get_sim),
            web.put("/_sim/faults/{iccid}", self._admin_put_fault),
            web.delete("/_sim/faults", self._admin_clear_faults),
            web.put("/_sim/accounts/{username}", self._admin_put_account),
        ])
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0, *,
                    tls_context: ssl.SSLContext | None = None) -> str:
        """Listen on ``host:port`` (0: any free port), over HTTPS with ``tls_context``
        (:func:`server_context`), and return the API base URL."""
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, ssl_context=tls_context).start()
        self.port = int(self._runner.addresses[0][1])
        self._lag_watch = asyncio.create_task(self._watch_lag(), name="simulator loop lag")
        scheme = "https" if tls_context is not None else "http"
        self.base_url = f"{scheme}://{host}:{self.port}{API_PATH}"
        return self.base_url

    async def stop(self) -> None:
        if self._lag_watch is not None:
            self._lag_watch.cancel()
            self._lag_watch = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _watch_lag(self, every_s: float = 0.01, over_s: float = 0.005) -> None:
        """Note each moment this process's event loop ran late by more than ``over_s``: a
        stalled simulator stamps the requests it then handles late, which can look like a
        burst of calls that never was (``stalls`` in ``/_sim/stats``)."""
        while True:
            before = time.monotonic()
            await asyncio.sleep(every_s)
            late = time.monotonic() - before - every_s
            if late > over_s:
                self.stalls.append((time.monotonic(), late))

    # -- the API pipeline: auth, down, rate limit, faults, then the action -----------

    def _api(self, action: Action) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self._serve(request, action)
        return handler

    async def _serve(self, request: web.Request, action: Action) -> web.StreamResponse:
        record = RequestRecord(
            started=time.monotonic(), finished=0.0, account=None, method=request.method,
            path=request.path, iccid=request.match_info.get("iccid"), requested_status=None,
            http_status=0, error_code=None, user_agent=request.headers.get("User-Agent"))
        self.requests.append(record)
        response: web.Response | None = None  # stays None when the account refuses
        try:
            account = self._authenticate(request, record)
            if account.down == "html503":
                raise _Answer(503, None, "Service Temporarily Unavailable", html=True)
            if account.down != "refuse":
                call = self._admit(account, request, record)
                try:
                    if await self._account_fault(call, account):
                        response = web.json_response(
                            await self._perform(request, record, action))
                finally:  # before the answer is sent: a client awaiting it never overlaps
                    self._release(account.username, call)
        except _Answer as answer:
            response, record.error_code = answer.response(), answer.code
        except web.HTTPException as exc:  # e.g. 413 for a body over MAX_BODY_BYTES
            record.http_status = exc.status
            raise
        finally:
            record.finished = record.finished or time.monotonic()  # set if released early
            if response is not None:
                record.http_status = response.status
            self._log(record)
        if response is None:
            if request.transport is not None:
                request.transport.abort()
            return web.Response()  # never reaches the client: the connection is gone
        return response

    def _authenticate(self, request: web.Request, record: RequestRecord) -> Account:
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("latin1")
        except (ValueError, binascii.Error):
            decoded = ""
        if scheme.lower() != "basic" or ":" not in decoded:
            raise _Answer(401, None, "Full authentication is required to access this resource")
        username, _, api_key = decoded.partition(":")
        record.account = username
        account = self.accounts.get(username)
        if account is None or not hmac.compare_digest(account.api_key.encode(), api_key.encode()):
            raise _error("10000001")
        return account

    def _admit(self, account: Account, request: web.Request, record: RequestRecord) -> _Call:
        """Count the call in, or answer 40000029 if it would break the account's limits."""
        now = time.monotonic()
        for held in list(self._holding[account.username]):  # callers gone: their calls ended
            if request.transport is not None and (held.request.transport is None
                                                  or held.request.transport.is_closing()):
                held.record.finished = now
                self._release(account.username, held)
        rate = account.requests_per_second
        allowed = max(1, math.floor(rate))
        window_s = allowed / rate
        starts = self._starts[account.username]
        while starts and now - starts[0] >= window_s:
            starts.popleft()
        busy = self._in_flight[account.username] >= account.max_in_flight
        if busy or len(starts) >= allowed:
            self.violations += 1
            self.violations_by_account[account.username] += 1
            record.violation = "concurrency" if busy else "rate"
            raise _Answer(self.rate_limit_http_status, "40000029")
        starts.append(now)
        self._in_flight[account.username] += 1
        seen = self.max_in_flight_seen.get(account.username, 0)
        self.max_in_flight_seen[account.username] = max(seen, self._in_flight[account.username])
        return _Call(request, record)

    def _release(self, username: str, call: _Call) -> None:
        if not call.released:
            call.released = True
            self._in_flight[username] -= 1
            self._holding[username].discard(call)

    async def _account_fault(self, call: _Call, account: Account) -> bool:
        """Apply the account's own faults: hold the call ``latency_s`` (False, unanswered,
        if the caller hangs up meanwhile: the call ends then, or at the latest when the
        account's next call arrives), answer every ``fail_every``-th call with the injected
        error; True when the call goes on."""
        self._admitted[account.username] += 1
        if account.latency_s > 0:
            until = time.monotonic() + account.latency_s
            self._holding[account.username].add(call)
            while (left := until - time.monotonic()) > 0:
                transport = call.request.transport
                if call.released or transport is None or transport.is_closing():
                    return False
                await asyncio.sleep(min(left, 0.05))
        if account.fail_every and self._admitted[account.username] % account.fail_every == 0:
            message = JASPER_ERROR_MEANINGS.get(account.fail_code or "", "Error")
            raise _Answer(account.fail_http_status, account.fail_code, message,
                          html=account.fail_html)
        return True

    async def _perform(self, request: web.Request, record: RequestRecord,
                       action: Action) -> dict[str, Any]:
        fault = self._faults.get(record.iccid or "")
        latency_s = self.latency_s + (fault.latency_s if fault else 0.0)
        if latency_s > 0:
            await asyncio.sleep(latency_s)
        if fault and (fault.always_fail or fault.fail_times > 0):
            fault.fail_times = max(0, fault.fail_times - 1)
            message = fault.error_message or JASPER_ERROR_MEANINGS.get(fault.error_code, "Error")
            raise _Answer(fault.http_status, None if fault.html else fault.error_code,
                          html=fault.html, message=message + "x" * fault.body_pad_bytes)
        return await action(request, record)

    def _unknown(self, iccid: str) -> bool:
        return iccid in self.unknown_iccids or iccid.startswith("8999")

    def _sim(self, iccid: str, account: str | None) -> _Sim:
        sim = None if self._unknown(iccid) else self._sims.setdefault(
            iccid, _Sim("ACTIVATION_READY"))
        if sim is None or sim.account not in (None, account):
            raise _error("20000001")
        return sim

    @staticmethod
    def _log(record: RequestRecord) -> None:
        outcome = str(record.http_status) if record.http_status else "dropped"
        code = f" {record.error_code}" if record.error_code else ""
        wanted = f" status={record.requested_status}" if record.requested_status else ""
        duration_ms = (record.finished - record.started) * 1000
        log.info("%s %s%s account=%s -> %s%s in %.0f ms", record.method, record.path, wanted,
                 record.account, outcome, code, duration_ms,
                 extra={"fields": {"method": record.method, "path": record.path,
                                   "account": record.account, "http_status": record.http_status,
                                   "error_code": record.error_code,
                                   "duration_ms": round(duration_ms, 1)}})

    @staticmethod
    def _change(sim: _Sim, status: str) -> None:
        sim.status, sim.date_updated = status, _now()
        if status == "ACTIVATED" and sim.date_activated is None:
            sim.date_activated = sim.date_updated

    # -- API actions -----------------------------------------------------------------

    async def _put_device(self, request: web.Request, record: RequestRecord) -> dict[str, Any]:
        iccid = request.match_info["iccid"]
        sim = self._sim(iccid, record.account)
        text = await request.text()
        if not text.strip():
            raise _error("10000005")
        try:
            body = json.loads(text)
        except ValueError:
            raise _error("10000023") from None
        if not isinstance(body, dict):
            raise _error("10000005")
        target = body.get("status")
        record.requested_status = target if isinstance(target, str) else None
        if set(body) - EDITABLE:
            raise _error("10000028")
        if target not in SIM_STATUSES:
            raise _error("10000005")
        if target == sim.status:
            if self.already_in_status_error:
                verb = {"ACTIVATED": "activate", "DEACTIVATED": "deactivate"}.get(target)
                raise _error(ALREADY_IN_STATUS,
                             f"Cannot {verb} a SIM which is already {target.lower()}"
                             if verb else f"SIM is already {target}")
        elif sim.status in FINAL:
            raise _error("10000005", f"A {sim.status} SIM cannot change status")
        elif target in PRE_ACTIVATION and sim.status in ("ACTIVATED", "DEACTIVATED"):
            raise _error("10000029")
        else:
            self._change(sim, target)
        return {"iccid": iccid}

    async def _get_device(self, request: web.Request, record: RequestRecord) -> dict[str, Any]:
        iccid = request.match_info["iccid"]
        return _details(iccid, self._sim(iccid, record.account))

    async def _search_devices(self, request: web.Request,
                              record: RequestRecord) -> dict[str, Any]:
        """Search Devices: one page of the SIMs the account has, in ICCID order."""
        query = request.query
        unknown = sorted(set(query) - SEARCH_PARAMETERS)
        if unknown:
            raise _error("10000028", f"Unrecognised parameters: {', '.join(unknown)}")
        since = query.get("modifiedSince", "").strip()
        if not since:
            raise _error("10000011", "modifiedSince is required")
        try:
            since_dt = datetime.fromisoformat(since.replace("Z", "+00:00"))
        except ValueError:
            raise _error("10000012", f"modifiedSince {since!r} is not a date-time") from None
        if since_dt.tzinfo is None:
            since_dt = since_dt.replace(tzinfo=UTC)
        since_text = since_dt.astimezone(UTC).isoformat(timespec="milliseconds")
        page_size = _int_parameter(query, "pageSize", MAX_PAGE_SIZE, MAX_PAGE_SIZE)
        page_number = _int_parameter(query, "pageNumber", 1, None)
        status = query.get("status")
        if status is not None and status not in SIM_STATUSES:
            raise _error("10000005", f"Invalid status {status!r}")
        listed = [
            (iccid, sim) for iccid, sim in sorted(self._sims.items())
            if sim.account in (None, record.account) and not self._unknown(iccid)
            # The dates share one format (UTC, milliseconds): text order is time order.
            and sim.date_updated >= since_text and status in (None, sim.status)
        ]
        start = (page_number - 1) * page_size
        return {
            "pageNumber": page_number,
            "lastPage": start + page_size >= len(listed),
            "devices": [
                {"iccid": iccid, "status": sim.status, "ratePlan": RATE_PLAN,
                 "communicationPlan": COMMUNICATION_PLAN}
                for iccid, sim in listed[start:start + page_size]
            ],
        }

    async def _echo(self, request: web.Request, record: RequestRecord) -> dict[str, Any]:
        return {"context": request.match_info["word"]}

    async def _elsewhere(self, request: web.Request, record: RequestRecord) -> dict[str, Any]:
        version = request.match_info["version"]
        if version != "v1" and version[:1] == "v" and version[1:].isdigit():
            raise _error("10000024")
        raise _Answer(404, None, f"No resource at {request.path}")

    # -- admin API -------------------------------------------------------------------

    async def _admin_requests(self, request: web.Request) -> web.Response:
        try:
            since = float(request.query.get("since", "-inf"))
        except ValueError:
            raise _bad_request("since must be a number (a time.monotonic())") from None
        return web.json_response([asdict(r) for r in self.requests if r.started >= since])

    async def _admin_stats(self, request: web.Request) -> web.Response:
        return web.json_response({"violations": self.violations,
                                  "violations_by_account": self.violations_by_account,
                                  "max_in_flight_seen": self.max_in_flight_seen,
                                  "requests": len(self.requests),
                                  "stalls": [list(x) for x in self.stalls]})

    async def _admin_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})

    async def _admin_put_sim(self, request: web.Request) -> web.Response:
        iccid = request.match_info["iccid"]
        change = await _admin_body(request, _SimChange)
        try:
            self.set_status(iccid, change.status, account=change.account)
        except ValueError as exc:
            raise _bad_request(str(exc)) from None
        return web.json_response(_details(iccid, self._sims[iccid]))

    async def _admin_post_sims(self, request: web.Request) -> web.Response:
        batch = await _admin_body(request, _SimBatch)
        ranged = batch.first is not None or batch.count or batch.status is not None
        if ranged and (batch.first is None or batch.status is None):
            raise _bad_request("a run of SIMs needs first, count and status")
        try:
            self.add_sims(batch.sims, account=batch.account)
            made = (self.add_sim_range(batch.first, batch.count, batch.status,
                                       account=batch.account)
                    if batch.first is not None and batch.status is not None else [])
        except ValueError as exc:
            raise _bad_request(str(exc)) from None
        return web.json_response({"created": len(batch.sims) + len(made),
                                  "last": made[-1] if made else None})

    async def _admin_get_sim(self, request: web.Request) -> web.Response:
        iccid = request.match_info["iccid"]
        sim = self._sims.get(iccid)
        if sim is None:
            return web.json_response({"error": f"no SIM {iccid}"}, status=404)
        return web.json_response(_details(iccid, sim))

    async def _admin_put_fault(self, request: web.Request) -> web.Response:
        iccid = request.match_info["iccid"]
        fault = await _admin_body(request, _Fault)
        self._faults[iccid] = fault
        return web.json_response({"iccid": iccid, **fault.model_dump()})

    async def _admin_clear_faults(self, request: web.Request) -> web.Response:
        self.clear_faults()
        return web.json_response({"cleared": True})

    async def _admin_put_account(self, request: web.Request) -> web.Response:
        username = request.match_info["username"]
        change = await _admin_body(request, _AccountChange)
        account = self.accounts.get(username)
        if account is None:
            if "api_key" not in change.model_fields_set:
                raise _bad_request("a new account needs an api_key")
            account = self.add_account(username, change.api_key)
        for key, value in change.model_dump(exclude_unset=True).items():
            setattr(account, key, value)
        return web.json_response({k: v for k, v in asdict(account).items() if k != "api_key"})


def _details(iccid: str, sim: _Sim) -> dict[str, Any]:
    """A Get Device Details answer."""
    return {
        "iccid": iccid,
        "status": sim.status,
        "ratePlan": RATE_PLAN,
        "communicationPlan": COMMUNICATION_PLAN,
        "customer": "Patriot Monitoring",
        "dateActivated": sim.date_activated,
        "dateAdded": sim.date_added,
        "dateUpdated": sim.date_updated,
    }


def _int_parameter(query: Mapping[str, str], name: str, default: int,
                   maximum: int | None) -> int:
    text = query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or (maximum is not None and value > maximum):
        most = f" to {maximum}" if maximum is not None else " or more"
        raise _error("10000028", f"{name} must be a whole number 1{most} (got {text!r})")
    return value


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


async def _admin_body(request: web.Request, model: type[_Body]) -> _Body:
    try:
        return model.model_validate_json(await request.read())
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()]
        raise _bad_request("; ".join(problems)) from None


def accounts_from_settings(settings: Settings) -> list[Account]:
    """One account per communicator type, with its credentials and limits."""
    return [
        Account(ct.username, ct.read_api_key(), max_in_flight=ct.max_concurrency,
                requests_per_second=ct.requests_per_second)
        for ct in settings.communicator_types
    ]


def server_context(certfile: str | Path, keyfile: str | Path) -> ssl.SSLContext:
    """A server-side TLS context for :meth:`Simulator.start` from PEM files."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(certfile), str(keyfile))
    return context


async def serve(host: str, port: int, accounts: list[Account], *,
                tls_context: ssl.SSLContext | None = None) -> None:
    """Run a simulator with ``accounts`` until cancelled, logging each request to stderr;
    over HTTPS with ``tls_context``."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.INFO)
    sim = Simulator()
    for account in accounts:
        sim.accounts[account.username] = account
    base_url = await sim.start(host, port, tls_context=tls_context)
    log.info("Jasper simulator at %s (admin API under /_sim/), accounts: %s",
             base_url, ", ".join(sim.accounts) or "none")
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()

