"""Malformed input generated with hypothesis never crashes the service or blocks the queue."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from .conftest import Harness, iccid, make_event, type_, wait_until

_json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | \
    st.text(max_size=30)
_json = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_wrong_for_str = st.none() | st.integers() | st.booleans() | st.lists(_json_scalars, max_size=2)


@st.composite
def broken_event(draw: st.DrawFn) -> dict[str, Any]:
    """A valid-looking event with one thing wrong that the router must name."""
    event = make_event(iccid(draw(st.integers(0, 10**6))), "Type A")
    flaw = draw(st.sampled_from(
        ["event_id", "event_code", "device", "ref_no", "type", "code", "command", "iccid"]))
    if flaw == "event_id":
        event["event_id"] = draw(_wrong_for_str)
    elif flaw == "event_code":
        event["event_code"] = draw(st.text(max_size=6) | st.floats() | st.none())
    elif flaw == "device":
        event["device"] = draw(_json_scalars | st.lists(_json_scalars, max_size=2))
    elif flaw == "ref_no":
        event["device"]["ref_no"] = draw(st.none() | st.just("") | st.just(" - "))
    elif flaw == "type":
        event["device"]["communicator_type"] = draw(st.text(max_size=12).filter(
            lambda t: t != "Type A"))
    elif flaw == "code":
        event["event_code"] = draw(st.integers().filter(lambda c: c not in (65516, 65517)))
    elif flaw == "command":
        event["command"] = draw(_json.filter(lambda c: c not in (None, "activate", "deactivate")))
    else:
        event["device"]["ref_no"] = draw(st.text(max_size=30).filter(
            lambda t: not 18 <= len(t.replace(" ", "").replace("-", "")) <= 22
            or not t.replace(" ", "").replace("-", "").isdigit()))
    return event


_headers = st.dictionaries(
    st.text(min_size=1, max_size=10).filter(lambda k: not k.startswith("x-")),
    st.text(max_size=20) | st.integers(-2**31, 2**31 - 1), max_size=3)
_input = st.tuples(
    st.one_of(
        st.binary(max_size=200),
        _json.map(lambda v: json.dumps(v).encode()),
        broken_event(),
        st.dictionaries(st.text(max_size=8), _json, max_size=5).map(
            lambda d: json.dumps({**d, "client_id": 42}).encode()),
    ),
    _headers,
)


def generate(n: int) -> list[tuple[dict[str, Any] | bytes, dict[str, Any]]]:
    out: list[tuple[dict[str, Any] | bytes, dict[str, Any]]] = []

    @settings(max_examples=n, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(_input)
    def collect(item: tuple[dict[str, Any] | bytes, dict[str, Any]]) -> None:
        out.append(item)

    collect()
    return out[:n]


async def test_malformed_inputs_end_dead_lettered_or_failed(harness: Harness):
    """100 generated malformed messages: the service lives; each is dead-lettered or failed."""
    await harness.setup([type_("a", 2, 200)])
    service = await harness.start_service()
    port = harness.ports[-1]
    await harness.read_signals()
    inputs = generate(100)
    assert len(inputs) == 100
    bodies, headers = [], []
    for i, (body, hdrs) in enumerate(inputs):
        mid = f"malformed-{i}"
        if isinstance(body, dict) and isinstance(body.get("event_id"), str):
            body["event_id"] = mid
        bodies.append(body)
        headers.append({**hdrs, "x-test-id": mid})
    await harness.publish(bodies, headers=headers,
                          message_ids=[h["x-test-id"] for h in headers],
                          routing_key="event.65516")
    canary = make_event(iccid(1), "Type A")
    await harness.publish([canary])
    await harness.wait_final([canary["event_id"]], 30)

    channel = await harness.channel()
    dead_queue = await channel.get_queue(f"{harness.tag}.dead")
    dead: dict[str, str] = {}

    async def unexplained() -> list[tuple[str, Any]]:
        while (message := await dead_queue.get(no_ack=True, fail=False)) is not None:
            dead[str(message.message_id)] = str((message.headers or {}).get("x-jasper-error"))
        left = []
        for i in range(100):
            mid = f"malformed-{i}"
            finals = harness.signals.finals(mid)
            failed_with_reason = finals and finals[0]["outcome"] == "failed" and \
                finals[0]["error"]["message"]
            if not (failed_with_reason or dead.get(mid)):
                left.append((mid, inputs[i]))
        return left

    async def all_explained() -> bool:
        return not await unexplained()

    with contextlib.suppress(AssertionError):
        await wait_until(all_explained, "every input explained", 20, 0.2)
    assert service.alive
    assert harness.signals.finals(canary["event_id"])[0]["outcome"] == "succeeded"
    left = await unexplained()
    assert not left, [(mid, json.dumps(i, default=repr)) for mid, i in left[:5]]
    assert "jasper_dead_lettered_total" in await harness.metrics(port)
