"""The owner's side of operator tools' calls: serve_call and the reply shapes (operator
guide, section 13)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from jasper_consumer import calls
from jasper_consumer.calls import INVALID_REQUEST, serve_call
from jasper_consumer.config import CommunicatorType
from jasper_consumer.jasper import JasperClient
from jasper_consumer.metrics import Metrics
from jasper_consumer.simulator import Simulator

ICCID = "89610185002345678901"


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    simulator = Simulator()
    simulator.add_account("nz", "nz-key", requests_per_second=1000)
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def client(sim: Simulator) -> AsyncIterator[JasperClient]:
    ct = CommunicatorType.model_validate({
        "name": "M2MOne NZ", "server_address": sim.base_url, "username": "nz",
        "api_key": "nz-key", "requests_per_second": 1000})
    async with JasperClient(ct, Metrics(CollectorRegistry())) as jasper:
        yield jasper


async def serve(client: JasperClient, body: dict[str, Any] | bytes) -> dict[str, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply: dict[str, Any] = json.loads(await serve_call(client, raw))
    return reply


async def test_search_devices_replies_with_control_centers_page(client, sim):
    """A search request is one Search Devices call; the reply carries the page as it came."""
    sim.add_sim_range("89610185000000000000", 60, "ACTIVATED")

    reply = await serve(client, {"op": "search_devices", "page_number": 2, "page_size": 50,
                                 "modified_since": "2000-01-01T00:00:00Z", "status": None})

    assert reply["ok"] is True
    assert (reply["result"]["pageNumber"], reply["result"]["lastPage"]) == (2, True)
    assert len(reply["result"]["devices"]) == 10
    assert [r.path for r in sim.requests] == ["/rws/api/v1/devices"]


async def test_get_device_replies_with_the_details(client, sim):
    """A get_device request replies with Get Device Details' JSON."""
    sim.set_status(ICCID, "DEACTIVATED")

    reply = await serve(client, {"op": "get_device", "iccid": ICCID})

    assert (reply["ok"], reply["result"]["iccid"], reply["result"]["status"]) == (
        True, ICCID, "DEACTIVATED")


async def test_control_centers_refusal_is_an_error_reply(client, sim):
    """An error from Control Center comes back in the signal's error shape."""
    reply = await serve(client, {"op": "get_device", "iccid": "89990000000000000001"})

    assert reply == {"ok": False, "error": {
        "code": "20000001", "http_status": 404,
        "message": "Resource not found - invalid ICCID", "retryable": False}}


async def test_a_rate_limited_call_is_a_retryable_error_reply(client, sim):
    """A rate-limited answer comes back retryable, for the tool to retry."""
    sim.accounts["nz"].max_in_flight = 0  # every call is over the limit

    reply = await serve(client, {"op": "search_devices", "page_number": 1})

    assert (reply["error"]["code"], reply["error"]["retryable"]) == ("40000029", True)


@pytest.mark.parametrize(("body", "names"), [
    (b"not json", "body"),
    ([1, 2], "body"),
    ({"op": "change_status", "iccid": ICCID}, "op"),
    ({"op": "search_devices"}, "page_number"),
    ({"op": "search_devices", "page_number": "1"}, "page_number"),
    ({"op": "search_devices", "page_number": 1, "page_size": 51}, "page_size"),
    ({"op": "search_devices", "page_number": 1, "modified_since": "yesterday"}, "modified_since"),
    ({"op": "search_devices", "page_number": 1, "status": "live; drop"}, "status"),
    ({"op": "get_device", "iccid": "8961-0185"}, "iccid"),
    ({"op": "get_device", "iccid": ICCID, "extra": 1}, "extra"),
    (b'{"op": "get_device", "iccid": "' + b"1" * 5000 + b'"}', "bytes"),
])
async def test_a_malformed_request_gets_invalid_request_without_a_call(client, sim, body, names):
    """A request of neither shape is answered INVALID_REQUEST naming the problem; no call."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    reply = await serve(client, raw)

    assert reply["ok"] is False
    assert (reply["error"]["code"], reply["error"]["http_status"]) == (INVALID_REQUEST, None)
    assert names in reply["error"]["message"]
    assert sim.requests == []


async def test_a_failing_call_never_raises(client, monkeypatch):
    """Whatever the call raises becomes a CALL_FAILED reply, without the exception's text."""
    async def broken(iccid: str) -> dict[str, Any]:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(client, "get_device", broken)

    reply = await serve(client, {"op": "get_device", "iccid": ICCID})

    assert reply["error"]["code"] == calls.CALL_FAILED
    assert "secret detail" not in reply["error"]["message"]
    assert "RuntimeError" in reply["error"]["message"]


async def test_an_echo_request_is_one_echo_call(client, sim):
    """An echo request (check-config --ping) is one Echo call; the reply is ok, empty."""
    reply = await serve(client, {"op": "echo"})

    assert reply == {"ok": True, "result": {}}
    assert [r.path for r in sim.requests] == ["/rws/api/v1/echo/jasper-consumer"]
