"""The Control Center client: error mapping, retries, limits, secrets (operator guide,
sections 5 and 13)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aioresponses import aioresponses
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from yarl import URL

from jasper_consumer import errors
from jasper_consumer.config import Command, CommunicatorType, RetrySettings
from jasper_consumer.errors import (
    JASPER_ERROR_MEANINGS,
    CommunicatorMisconfigured,
    ConfigError,
    JasperError,
    JasperRejected,
    JasperRetryable,
    JasperUnreachable,
    RetriesExhausted,
    TypePaused,
)
from jasper_consumer.jasper.answers import (
    already_in_status,
    backoff_waits,
    classify,
    parse_retry_after,
    retry_wait,
)
from jasper_consumer.jasper.client import USER_AGENT, JasperClient
from jasper_consumer.jasper.limiter import Limiter
from jasper_consumer.jasper.retry import RetryLog, change_status, retrying
from jasper_consumer.metrics import Metrics
from jasper_consumer.outcomes import ErrorInfo, Outcome
from jasper_consumer.pause import Pause, PauseRules
from jasper_consumer.simulator import Simulator

BASE = "https://restapi1.jasper.com/rws/api/v1"
ICCID = "89610185002345678901"
DEVICE_URL = f"{BASE}/devices/{ICCID}"
KEY = "s3cr3t-KEY-4f9a7c"
RETRY = RetrySettings(
    max_attempts=3, initial_delay_seconds=0.001, max_delay_seconds=0.01, max_elapsed_seconds=5
)

# The operator guide's section 5, written out independently of errors.py:
# code -> (HTTP status, fate).
GUIDE_TABLE: dict[str, tuple[int, str]] = {
    "10000001": (401, "pause"),
    "10000005": (400, "rejected"),
    "10000008": (400, "rejected"),
    "10000009": (400, "rejected"),
    "10000010": (400, "rejected"),
    "10000011": (400, "rejected"),
    "10000012": (400, "rejected"),
    "10000015": (400, "rejected"),
    "10000023": (400, "rejected"),
    "10000024": (400, "pause"),
    "10000025": (400, "rejected"),
    "10000026": (400, "rejected"),
    "10000028": (400, "rejected"),
    "10000029": (400, "rejected"),
    "10000030": (400, "pause"),
    "10000031": (400, "rejected"),
    "20000001": (404, "rejected"),
    "30000001": (500, "retryable"),
    "40000029": (429, "retryable"),
}
FATE_CLASS = {
    "pause": CommunicatorMisconfigured,
    "rejected": JasperRejected,
    "retryable": JasperRetryable,
}


def make_ct(api_key: str = KEY, **overrides: object) -> CommunicatorType:
    fields: dict[str, object] = {
        "name": "M2MOne NZ", "server_address": BASE, "username": "u",
        "api_key": SecretStr(api_key), "requests_per_second": 1000,
    }
    fields.update(overrides)
    return CommunicatorType.model_validate(fields)


def basic(username: str, key: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{key}".encode()).decode()


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def jasper_error(code: str, message: str = "from the API") -> dict[str, str]:
    return {"errorMessage": message, "errorCode": code}


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


async def _nothing(*_: object) -> None:
    return None


def gate(client: JasperClient, metrics: Metrics, outage_streak: int = 10**6) -> Pause:
    """The type's pause; per-event retry tests run without the outage check by default."""
    return Pause("M2MOne NZ", metrics, echo=client.echo, on_pause=_nothing,
                 on_resume=_nothing, rules=PauseRules(outage_streak))


async def apply(client: JasperClient, *, retry: RetrySettings = RETRY,
                pause: Pause | None = None) -> Outcome:
    """Activate ICCID through the retry loop; the outcome (TypePaused propagates)."""
    metrics = client._metrics
    pause = pause or gate(client, metrics)
    try:
        return await change_status(client, ICCID, Command.ACTIVATE, retry, pause,
                                   on_retry=RetryLog("M2MOne NZ", metrics))
    finally:
        await pause.stop()


class _Response(aiohttp.ClientResponse):
    """aioresponses 0.7.9 builds responses without the ``stream_writer`` aiohttp 3.14 requires
    (pnuckowski/aioresponses#289); give it a finished writer."""

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


class _Mock(aioresponses):
    def add(  # type: ignore[override]
        self, url: Any, method: str = "GET", **kwargs: Any
    ) -> None:
        kwargs.setdefault("response_class", _Response)
        super().add(url, method, **kwargs)


@pytest.fixture
def http() -> Iterator[aioresponses]:
    with _Mock() as mocked:
        yield mocked


@pytest.fixture
async def client(metrics: Metrics) -> AsyncIterator[JasperClient]:
    async with JasperClient(make_ct(), metrics) as jasper:
        yield jasper


def test_spec_table_covers_every_documented_code() -> None:
    """The test table lists exactly the codes errors.py documents."""
    assert set(GUIDE_TABLE) == set(JASPER_ERROR_MEANINGS)


@pytest.mark.parametrize("code", sorted(GUIDE_TABLE))
def test_classify_maps_each_code_to_its_meaning_and_fate(code: str) -> None:
    """Each documented code gets its documented meaning and its retry decision."""
    status, fate = GUIDE_TABLE[code]
    err = classify(status, b'{"errorMessage": "x", "errorCode": "%s"}' % code.encode(),
                   "application/json")
    assert type(err) is FATE_CLASS[fate]
    assert (err.code, err.http_status, err.message) == (code, status, JASPER_ERROR_MEANINGS[code])
    assert err.pauses_type == (fate == "pause")


@pytest.mark.parametrize("code", sorted(GUIDE_TABLE))
async def test_change_status_applies_each_codes_fate(
    code: str, client: JasperClient, http: aioresponses
) -> None:
    """A change that keeps getting one code is paused, failed at once, or retried to the end."""
    status, fate = GUIDE_TABLE[code]
    http.put(DEVICE_URL, status=status, payload=jasper_error(code), repeat=True)

    if fate == "pause":
        with pytest.raises(TypePaused) as caught:
            await apply(client)
        assert (caught.value.error.code, caught.value.attempts) == (code, 1)
        attempts = 1
    else:
        outcome = await apply(client)
        assert outcome.error is not None
        attempts = outcome.attempts
        if fate == "retryable":
            assert (outcome.error.code, attempts) == (errors.RETRIES_EXHAUSTED,
                                                      RETRY.max_attempts)
            assert f"({code})" in outcome.error.message
        else:
            assert (outcome.error.code, attempts, outcome.error.message) == (
                code, 1, JASPER_ERROR_MEANINGS[code])
    assert len(http.requests[("PUT", URL(DEVICE_URL))]) == attempts


def test_rate_limit_code_with_http_400_is_retryable() -> None:
    """40000029 is retried whether it comes with HTTP 400 or 429."""
    err = classify(400, b'{"errorMessage": "slow down", "errorCode": "40000029"}',
                   "application/json")
    assert isinstance(err, JasperRetryable)


def test_unknown_code_keeps_the_api_message_truncated() -> None:
    """An undocumented code is rejected with the API's own words, cut to a readable length."""
    err = classify(400, b'{"errorMessage": "%s", "errorCode": "19999999"}' % (b"x" * 500),
                   "application/json")
    assert isinstance(err, JasperRejected)
    assert err.code == "19999999"
    assert 0 < len(err.message) <= 200


async def test_succeeds_first_time(client: JasperClient, http: aioresponses) -> None:
    """A 200 with the ICCID in its body is one successful attempt with the right request."""
    http.put(DEVICE_URL, status=200, payload={"iccid": ICCID})

    status = await client.put_status(ICCID, Command.DEACTIVATE)

    assert status == "DEACTIVATED"
    call = http.requests[("PUT", URL(DEVICE_URL))][0]
    assert call.kwargs["json"] == {"status": "DEACTIVATED"}
    assert call.kwargs["headers"]["Authorization"] == basic("u", KEY)
    assert call.kwargs["headers"]["Accept"] == "application/json"
    assert call.kwargs["headers"]["Content-Type"] == "application/json"


async def test_accepted_202_is_success(client: JasperClient, http: aioresponses) -> None:
    """A 202 (accepted for later) with the ICCID counts as success."""
    http.put(DEVICE_URL, status=202, payload={"iccid": ICCID})

    assert await apply(client) == Outcome.succeeded("ACTIVATED", 1)


async def test_already_in_status_is_success(client: JasperClient, http: aioresponses) -> None:
    """An error saying the SIM already has the status is success."""
    http.put(DEVICE_URL, status=400, payload=jasper_error(
        "10030000", "Cannot activate a SIM which is already activated"))

    assert await apply(client) == Outcome.succeeded("ACTIVATED", 1)


async def test_already_is_matched_by_code_not_by_any_message(
    client: JasperClient, http: aioresponses
) -> None:
    """A documented code whose message happens to say "already" stays a failure; the
    message match is only a fallback for codes this service does not know."""
    http.put(DEVICE_URL, status=400, payload=jasper_error("10000005", "SIM is already moving"))

    outcome = await apply(client)

    assert outcome.error is not None
    assert (outcome.result, outcome.error.code) == ("failed", "10000005")
    assert already_in_status("10030000", "")
    assert already_in_status("19999999", "Device is already in that state")
    assert not already_in_status("10000005", "already")
    assert not already_in_status("19999999", "alreadyish")


async def test_retries_then_succeeds(
    client: JasperClient, http: aioresponses, metrics: Metrics
) -> None:
    """Transient errors are retried and the attempts count every HTTP call."""
    http.put(DEVICE_URL, status=500, payload=jasper_error("30000001"))
    http.put(DEVICE_URL, status=503, body="<html>busy</html>", content_type="text/html")
    http.put(DEVICE_URL, status=200, payload={"iccid": ICCID})

    result = await apply(client)

    assert result == Outcome.succeeded("ACTIVATED", 3)
    ct = "M2MOne NZ"
    labels = {"communicator_type": ct}
    assert sample(metrics, "jasper_retries_total", **labels, reason="server_error") == 2
    assert sample(metrics, "jasper_api_errors_total", **labels, code="30000001") == 1
    assert sample(metrics, "jasper_api_errors_total", **labels,
                  code=errors.UNEXPECTED_RESPONSE) == 1
    assert sample(metrics, "jasper_api_request_duration_seconds_count", **labels,
                  command="activate") == 3
    assert sample(metrics, "jasper_inflight_commands", **labels) == 0


async def test_retryable_then_rejected_counts_all_attempts(
    client: JasperClient, http: aioresponses
) -> None:
    """A rejection after a retry carries both attempts."""
    http.put(DEVICE_URL, status=502, body="", content_type="text/html")
    http.put(DEVICE_URL, status=404, payload=jasper_error("20000001"))

    outcome = await apply(client)

    assert outcome.error is not None
    assert outcome.attempts == 2
    assert outcome.error.message == "Resource not found - invalid ICCID"


async def test_retries_exhausted_carries_last_error(
    client: JasperClient, http: aioresponses, metrics: Metrics
) -> None:
    """When every attempt is rate limited the event fails with RETRIES_EXHAUSTED and the cause."""
    http.put(DEVICE_URL, status=429, payload=jasper_error("40000029"), repeat=True)

    outcome = await apply(client)

    err = outcome.error
    assert err is not None
    assert (err.code, outcome.attempts, err.http_status, err.retryable) == (
        errors.RETRIES_EXHAUSTED, 3, 429, True)
    assert "Rate limit exceeded (40000029)" in err.message
    assert outcome.exhausted
    assert sample(metrics, "jasper_retries_total", communicator_type="M2MOne NZ",
                  reason="rate_limited") == 2


async def test_retries_stop_at_max_elapsed(metrics: Metrics, http: aioresponses) -> None:
    """The retry budget is bounded by time as well as by attempts."""
    retry = RetrySettings(max_attempts=100, initial_delay_seconds=0.01, max_delay_seconds=0.01,
                          max_elapsed_seconds=0.1)
    http.put(DEVICE_URL, status=500, payload=jasper_error("30000001"), repeat=True)

    async with JasperClient(make_ct(), metrics) as jasper:
        outcome = await apply(jasper, retry=retry)

    assert outcome.exhausted
    assert 1 < outcome.attempts < 100


class Calls:
    """A call that raises the given errors in turn, then answers ``"done"``; records its
    attempts and the waits between them."""

    def __init__(self, *failures: JasperError) -> None:
        self.failures = list(failures)
        self.attempts = 0
        self.waits: list[float] = []

    async def __call__(self) -> str:
        self.attempts += 1
        if self.failures:
            raise self.failures.pop(0)
        return "done"

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)


async def test_retrying_tries_transient_errors_again_with_back_off() -> None:
    """retrying() makes the call again after transient errors, waiting the back-off
    (at least Retry-After) in between, and returns the answer."""
    rate_limited = JasperRetryable("40000029", "Rate limit exceeded", 429, retry_after_s=0.5)
    call = Calls(rate_limited, JasperUnreachable("connection refused"))
    policy = RetrySettings(max_attempts=3, initial_delay_seconds=0.001, max_delay_seconds=1,
                           max_elapsed_seconds=5)

    answer = await retrying(call, policy, sleep=call.sleep)

    assert (answer, call.attempts, len(call.waits)) == ("done", 3, 2)
    assert call.waits[0] >= 0.5


@pytest.mark.parametrize("error", [
    JasperRejected("20000001", "Resource not found - invalid ICCID", 404),
    CommunicatorMisconfigured("10000001", "Invalid credentials", 401),
])
async def test_retrying_raises_at_once_what_retrying_cannot_help(error: JasperError) -> None:
    """A refusal, or an error that pauses the type, is raised after one call."""
    call = Calls(error)

    with pytest.raises(type(error)):
        await retrying(call, RETRY, sleep=call.sleep)

    assert (call.attempts, call.waits) == (1, [])


async def test_retrying_ends_with_retries_exhausted_carrying_the_last_error() -> None:
    """When the attempts run out, RETRIES_EXHAUSTED carries the last error's code."""
    call = Calls(*(JasperRetryable("30000001", "Unknown server error", 500) for _ in range(5)))

    with pytest.raises(RetriesExhausted) as caught:
        await retrying(call, RETRY, sleep=call.sleep)

    assert (call.attempts, caught.value.code) == (RETRY.max_attempts, errors.RETRIES_EXHAUSTED)
    assert "30000001" in caught.value.message


async def test_timeouts_are_unreachable_then_exhausted(
    client: JasperClient, http: aioresponses, metrics: Metrics
) -> None:
    """A request that times out is retried as unreachable, then exhausted."""
    http.put(DEVICE_URL, exception=TimeoutError(), repeat=True)

    outcome = await apply(client)

    assert outcome.error is not None
    assert outcome.error.http_status is None
    assert "timed out after 10.0 s waiting for restapi1.jasper.com (JASPER_UNREACHABLE)" \
        in outcome.error.message
    assert outcome.attempts == 3
    assert sample(metrics, "jasper_retries_total", communicator_type="M2MOne NZ",
                  reason="timeout") == 2


async def test_connection_refused_is_unreachable(metrics: Metrics) -> None:
    """Nothing listening on the port reads as a refused connection, retried then exhausted."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ct = make_ct(server_address=f"http://127.0.0.1:{port}/rws/api/v1")

    async with JasperClient(ct, metrics) as jasper:
        outcome = await apply(jasper)

    assert outcome.error is not None
    assert f"connection refused by 127.0.0.1:{port}" in outcome.error.message
    assert sample(metrics, "jasper_retries_total", communicator_type="M2MOne NZ",
                  reason="unreachable") == 2


async def test_html_502_is_retryable_unexpected_response(
    client: JasperClient, http: aioresponses
) -> None:
    """An HTML page from a proxy with 502 is UNEXPECTED_RESPONSE, retried, with its status."""
    page = "<html><body>Bad gateway</body></html>"
    http.put(DEVICE_URL, status=502, body=page, content_type="text/html", repeat=True)

    outcome = await apply(client)

    assert outcome.error is not None
    assert outcome.error.http_status == 502
    assert outcome.error.message.endswith(
        f"unexpected HTTP 502 answer (text/html, {len(page)} bytes) (UNEXPECTED_RESPONSE)")


async def test_html_404_is_rejected(client: JasperClient, http: aioresponses) -> None:
    """An HTML 404 (wrong host or path) fails at once as UNEXPECTED_RESPONSE."""
    http.put(DEVICE_URL, status=404, body="<html>Not Found</html>", content_type="text/html")

    outcome = await apply(client)

    assert outcome.error is not None
    assert (outcome.error.code, outcome.error.http_status, outcome.attempts) == (
        errors.UNEXPECTED_RESPONSE, 404, 1)


@pytest.mark.parametrize(("status", "expected"), [
    (400, JasperRejected), (500, JasperRetryable), (503, JasperRetryable),
])
def test_empty_body_is_unexpected_response(status: int, expected: type) -> None:
    """An empty body is UNEXPECTED_RESPONSE, retried only for transient statuses."""
    err = classify(status, b"", "")
    assert type(err) is expected
    assert err.message == f"unexpected HTTP {status} answer (empty body)"


async def test_ok_without_iccid_is_retried(client: JasperClient, http: aioresponses) -> None:
    """A 200 whose body lacks the ICCID is repeated, since the PUT is idempotent."""
    http.put(DEVICE_URL, status=200, body="OK", content_type="text/plain")
    http.put(DEVICE_URL, status=200, payload={"iccid": ICCID})

    assert await apply(client) == Outcome.succeeded("ACTIVATED", 2)


async def test_401_without_code_pauses(client: JasperClient, http: aioresponses) -> None:
    """A 401 with only errorMessage pauses the type with UNAUTHORIZED and no retry."""
    http.put(DEVICE_URL, status=401, payload={"errorMessage": "Bad credentials"}, repeat=True)

    with pytest.raises(TypePaused) as caught:
        await apply(client)

    err = caught.value.error
    assert (err.code, err.http_status, caught.value.attempts) == (errors.UNAUTHORIZED, 401, 1)
    assert err.message == "Control Center refused the credentials (HTTP 401): Bad credentials"
    assert len(http.requests[("PUT", URL(DEVICE_URL))]) == 1


def test_html_401_pauses() -> None:
    """A 401 page from a proxy also says the credentials are wrong."""
    err = classify(401, b"<html>denied</html>", "text/html")
    assert isinstance(err, CommunicatorMisconfigured)
    assert err.code == errors.UNAUTHORIZED


def test_retry_after_is_read_from_headers() -> None:
    """Retry-After in seconds or as an HTTP date becomes the error's retry_after_s."""
    err = classify(503, b"", "", "7")
    assert isinstance(err, JasperRetryable)
    assert err.retry_after_s == 7.0
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)
    assert 50 < (parse_retry_after(later) or 0) <= 60
    assert parse_retry_after("soon") is None


def test_retry_after_is_a_capped_lower_bound() -> None:
    """The wait is at least Retry-After, but never above max_delay_seconds."""
    assert retry_wait(0.2, None, 30) == 0.2
    assert retry_wait(0.2, 5, 30) == 5
    assert retry_wait(8, 5, 30) == 8
    assert retry_wait(0.2, 600, 30) == 30


def test_backoff_waits_honour_retry_after() -> None:
    """The wait generator fed a rate-limit error waits at least its Retry-After."""
    waits = backoff_waits(factor=0.5, max_value=30, jitter=lambda value: value)
    waits.send(None)
    assert waits.send(JasperRetryable("40000029", "x", 429, retry_after_s=4)) == 4
    assert waits.send(JasperRetryable("30000001", "x", 500)) == 1.0  # 0.5 * 2
    assert waits.send(JasperRetryable("40000029", "x", 429, retry_after_s=99)) == 30


async def test_retry_after_delays_the_next_attempt(
    client: JasperClient, http: aioresponses
) -> None:
    """A 503 with Retry-After holds the next attempt back that long (within max delay)."""
    retry = RetrySettings(max_attempts=3, initial_delay_seconds=0.001, max_delay_seconds=1,
                          max_elapsed_seconds=5)
    http.put(DEVICE_URL, status=503, payload={}, headers={"Retry-After": "0.2"})
    http.put(DEVICE_URL, status=200, payload={"iccid": ICCID})

    async with JasperClient(make_ct(), Metrics(CollectorRegistry())) as jasper:
        started = time.monotonic()
        result = await apply(jasper, retry=retry)

    assert result.attempts == 2
    assert time.monotonic() - started >= 0.2


@pytest.mark.parametrize("answer", [
    {"status": 401, "payload": {"errorMessage": f"key {KEY} is not valid"}},
    {"status": 400, "payload": jasper_error("19999999", f"bad {KEY}")},
    {"status": 502, "body": f"<html>{KEY}</html>", "content_type": "text/html"},
    {"exception": TimeoutError()},
    {"exception": aiohttp.ClientConnectionError(f"refused {KEY}")},
])
async def test_api_key_never_appears_in_errors(
    answer: dict[str, object], metrics: Metrics, http: aioresponses
) -> None:
    """No raised error, nor the client's repr, ever shows the API key."""
    http.put(DEVICE_URL, repeat=True, **answer)

    async with JasperClient(make_ct(), metrics) as jasper:
        try:
            result: Outcome | TypePaused = await apply(jasper)
        except TypePaused as paused:
            result = paused
        with pytest.raises(errors.JasperError) as caught:
            await jasper.put_status(ICCID, Command.ACTIVATE)
        shown = [repr(jasper), str(jasper.__dict__)]

    err = caught.value
    shown += [str(err), repr(err), err.message, str(err.as_dict()), repr(result), str(result)]
    assert all(KEY not in text for text in shown)
    assert err.__cause__ is None


async def test_get_device_returns_details(client: JasperClient, http: aioresponses) -> None:
    """Get Device Details returns Control Center's JSON."""
    http.get(DEVICE_URL, status=200, payload={"iccid": ICCID, "status": "ACTIVATED"})

    assert await client.get_device(ICCID) == {"iccid": ICCID, "status": "ACTIVATED"}


async def test_get_device_unknown_iccid_is_rejected(
    client: JasperClient, http: aioresponses
) -> None:
    """Get Device Details of an unknown ICCID raises the documented rejection, once."""
    http.get(DEVICE_URL, status=404, payload=jasper_error("20000001"))

    with pytest.raises(JasperRejected) as caught:
        await client.get_device(ICCID)

    assert (caught.value.code, caught.value.attempts) == ("20000001", 1)


SEARCH_URL = f"{BASE}/devices?modifiedSince=2000-01-01T00%3A00%3A00Z&pageSize=50&pageNumber=2"


async def test_search_devices_returns_one_page(client: JasperClient, http: aioresponses) -> None:
    """Search Devices asks for the page with modifiedSince and pageSize, and returns its JSON."""
    page = {"pageNumber": 2, "lastPage": True,
            "devices": [{"iccid": ICCID, "status": "ACTIVATED"}]}
    http.get(SEARCH_URL, status=200, payload=page)

    assert await client.search_devices(2) == page
    ((method, url), calls), = http.requests.items()
    assert (method, url.query["modifiedSince"], url.query["pageSize"]) == (
        "GET", "2000-01-01T00:00:00Z", "50")
    assert calls[0].kwargs["headers"]["Accept"] == "application/json"


async def test_search_devices_passes_the_status_filter(
    client: JasperClient, http: aioresponses
) -> None:
    """A status filter becomes the status= parameter."""
    http.get(f"{BASE}/devices?modifiedSince=2026-01-01T00%3A00%3A00Z&pageSize=10&pageNumber=1"
             "&status=ACTIVATED", status=200,
             payload={"pageNumber": 1, "lastPage": True, "devices": []})

    page = await client.search_devices(1, page_size=10, modified_since="2026-01-01T00:00:00Z",
                                       status="ACTIVATED")

    assert page["devices"] == []


async def test_search_devices_errors_are_one_attempt(
    client: JasperClient, http: aioresponses
) -> None:
    """A refused search raises its documented error after one call; a rate limit is not retried."""
    http.get(SEARCH_URL, status=400, payload=jasper_error("10000011"))
    http.get(SEARCH_URL, status=429, payload=jasper_error("40000029"))
    http.get(SEARCH_URL, status=200, payload={"pageNumber": 2})

    with pytest.raises(JasperRejected) as missing:
        await client.search_devices(2)
    with pytest.raises(JasperRetryable) as limited:
        await client.search_devices(2)
    with pytest.raises(JasperRetryable) as no_devices:
        await client.search_devices(2)

    assert (missing.value.code, missing.value.attempts) == ("10000011", 1)
    assert (limited.value.code, limited.value.attempts) == ("40000029", 1)
    assert no_devices.value.code == errors.UNEXPECTED_RESPONSE
    assert sum(len(calls) for calls in http.requests.values()) == 3


async def test_search_devices_goes_through_the_limiter(metrics: Metrics) -> None:
    """Search pages are started 1 / requests_per_second apart, like every other call."""
    sim = Simulator()
    sim.add_account("u", KEY, requests_per_second=20)
    sim.add_sim_range("89610185000000000000", 120, "ACTIVATED")
    base = await sim.start()
    try:
        ct = make_ct(server_address=base, requests_per_second=20)
        async with JasperClient(ct, metrics) as jasper:
            pages = await asyncio.gather(*(jasper.search_devices(n) for n in (1, 2, 3)))
    finally:
        await sim.stop()

    assert [len(p["devices"]) for p in pages] == [50, 50, 20]
    assert [p["lastPage"] for p in pages] == [False, False, True]
    starts = [r.started for r in sim.requests]
    assert min(b - a for a, b in itertools.pairwise(starts)) >= 0.045
    assert sim.violations == 0


async def test_echo_checks_the_context(client: JasperClient, http: aioresponses) -> None:
    """Echo passes when the word comes back and fails as unexpected otherwise."""
    http.get(f"{BASE}/echo/jasper-consumer", status=200, payload={"context": "jasper-consumer"})
    http.get(f"{BASE}/echo/jasper-consumer", status=200, payload={"context": "other"})

    await client.echo()
    with pytest.raises(JasperRetryable) as caught:
        await client.echo()
    assert caught.value.code == errors.UNEXPECTED_RESPONSE


async def test_echo_with_bad_credentials_pauses(client: JasperClient, http: aioresponses) -> None:
    """Echo answered with invalid credentials raises CommunicatorMisconfigured."""
    http.get(f"{BASE}/echo/jasper-consumer", status=401, payload=jasper_error("10000001"))

    with pytest.raises(CommunicatorMisconfigured):
        await client.echo()


async def test_reload_credentials_reads_a_rotated_key_file(
    tmp_path: Path, metrics: Metrics, http: aioresponses
) -> None:
    """A rotated api_key_file is used after reload_credentials; a missing one is a ConfigError."""
    key_file = tmp_path / "api-key"
    key_file.write_text("old-key\n")
    ct = CommunicatorType(name="M2MOne NZ", server_address=BASE, username="u",
                          api_key_file=key_file)
    http.get(f"{BASE}/echo/jasper-consumer", status=200, payload={"context": "jasper-consumer"},
             repeat=True)

    async with JasperClient(ct, metrics) as jasper:
        await jasper.echo()
        key_file.write_text("  new-key  ")
        jasper.reload_credentials()
        await jasper.echo()
        key_file.unlink()
        with pytest.raises(ConfigError):
            jasper.reload_credentials()

    calls = http.requests[("GET", URL(f"{BASE}/echo/jasper-consumer"))]
    assert [c.kwargs["headers"]["Authorization"] for c in calls] == [
        basic("u", "old-key"), basic("u", "new-key")]


async def test_injected_session_is_left_open(metrics: Metrics) -> None:
    """A session passed in belongs to the caller and is not closed by the client."""
    async with aiohttp.ClientSession() as session:
        async with JasperClient(make_ct(), metrics, session=session):
            pass
        assert not session.closed


async def test_limiter_spaces_starts_and_bounds_concurrency() -> None:
    """Calls start at least 1/rps apart, in FIFO order, with at most max_concurrency in flight."""
    limiter = Limiter(3, 200)
    starts: list[tuple[float, int]] = []
    peak = 0

    async def call(index: int) -> None:
        nonlocal peak
        async with limiter:
            starts.append((time.monotonic(), index))
            peak = max(peak, limiter.in_flight)
            await asyncio.sleep(0.02)

    await asyncio.gather(*(call(i) for i in range(10)))

    times = [t for t, _ in starts]
    assert [i for _, i in starts] == list(range(10))
    assert min(b - a for a, b in itertools.pairwise(times)) >= 1 / 200
    assert peak == 3
    assert limiter.in_flight == 0


async def test_limiter_cancelled_waiter_frees_its_slot() -> None:
    """A call cancelled while waiting for its start gives back its concurrency slot."""
    limiter = Limiter(1, 2)  # 0.5 s between starts
    async with limiter:
        pass
    waiter = asyncio.create_task(limiter.__aenter__())
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter

    assert limiter.in_flight == 0
    async with asyncio.timeout(1):
        async with limiter:
            assert limiter.in_flight == 1


async def test_large_error_body_is_read_only_up_to_the_cap(metrics: Metrics) -> None:
    """A huge proxy page is read only up to 64 KiB over a real connection."""
    async def bad_gateway(request: web.Request) -> web.Response:
        return web.Response(status=502, body=b"x" * 300_000, content_type="text/html")

    app = web.Application()
    app.router.add_put("/rws/api/v1/devices/{iccid}", bad_gateway)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        ct = make_ct(server_address=f"http://127.0.0.1:{port}/rws/api/v1")
        async with JasperClient(ct, metrics) as jasper:
            with pytest.raises(JasperRetryable) as caught:
                await jasper.put_status(ICCID, Command.ACTIVATE)
    finally:
        await runner.cleanup()

    assert caught.value.message == "unexpected HTTP 502 answer (text/html, 65536 bytes)"


async def test_outage_with_echo_failing_pauses_the_type(
    client: JasperClient, http: aioresponses, metrics: Metrics
) -> None:
    """Transient failures in a row with Echo failing too pause the type (no failure)."""
    http.put(DEVICE_URL, status=503, body="<html>down</html>", content_type="text/html",
             repeat=True)
    http.get(f"{BASE}/echo/jasper-consumer", status=503, body="<html>down</html>",
             content_type="text/html", repeat=True)

    with pytest.raises(TypePaused) as caught:
        await apply(client, pause=gate(client, metrics, outage_streak=2))

    err = caught.value.error
    assert (err.code, err.http_status, err.retryable, caught.value.attempts) == \
        ("UNEXPECTED_RESPONSE", 503, True, 2)


async def test_outage_check_passing_leaves_the_event_its_own_retries(
    client: JasperClient, http: aioresponses, metrics: Metrics
) -> None:
    """When Echo answers, a SIM that keeps failing exhausts its own retries."""
    http.put(DEVICE_URL, status=500, payload=jasper_error("30000001"), repeat=True)
    http.get(f"{BASE}/echo/jasper-consumer", payload={"context": "jasper-consumer"},
             repeat=True)

    outcome = await apply(client, pause=gate(client, metrics, outage_streak=2))

    assert (outcome.exhausted, outcome.attempts) == (True, RETRY.max_attempts)


async def test_paused_type_makes_no_call(
    client: JasperClient, http: aioresponses, metrics: Metrics
) -> None:
    """While the type is paused a change stops before any request, with 0 attempts."""
    pause = gate(client, metrics)
    pause.rules.enter(ErrorInfo("10000001", 401, "Invalid credentials", True))

    with pytest.raises(TypePaused) as caught:
        await change_status(client, ICCID, Command.ACTIVATE, RETRY, pause)

    assert (caught.value.error.code, caught.value.attempts) == ("10000001", 0)
    assert not http.requests
    pause.rules.resumed()
    http.put(DEVICE_URL, payload={"iccid": ICCID})
    assert (await apply(client, pause=pause)).attempts == 1


async def test_requests_name_the_sending_process(metrics: Metrics) -> None:
    """Every request reaches Control Center with a User-Agent naming version, host and pid."""
    sim = Simulator()
    sim.add_account("u", KEY)
    base = await sim.start()
    try:
        async with JasperClient(make_ct(server_address=base), metrics) as jasper:
            await jasper.echo()
    finally:
        await sim.stop()

    assert [r.user_agent for r in sim.requests] == [USER_AGENT]
    assert USER_AGENT.startswith("jasper-consumer/")
    assert f" pid {os.getpid()})" in USER_AGENT


async def test_limiter_abort_releases_waiters() -> None:
    """abort_waiting makes callers still waiting for a start slot fail at once."""
    limiter = Limiter(1, 0.5)
    async with limiter:
        pass
    waiter = asyncio.ensure_future(limiter.__aenter__())
    await asyncio.sleep(0)
    limiter.abort_waiting(errors.JasperError("SHUTTING_DOWN", "stopping"))
    with pytest.raises(errors.JasperError, match="SHUTTING_DOWN"):
        await asyncio.wait_for(waiter, 1)
    assert limiter.in_flight == 0


async def test_limiter_counts_a_start_from_the_write() -> None:
    """With count_from_send, a request written late pushes the next one back too."""
    limiter = Limiter(2, 50, count_from_send=True)
    written: list[float] = []

    async def call(write_delay_s: float) -> None:
        async with limiter:
            await asyncio.sleep(write_delay_s)  # the loop was busy before the write
            limiter.mark_sent()
            written.append(time.monotonic())

    await asyncio.gather(call(0.05), call(0.0))

    assert written[1] - written[0] >= limiter.interval_s
    assert limiter.in_flight == 0
