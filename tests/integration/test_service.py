"""The service end to end: real RabbitMQ, the simulator over real sockets."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection

from jasper_consumer.errors import ConfigError
from jasper_consumer.simulator import Simulator

from .conftest import RunService, iccid, make_event


async def test_commission_activates_the_sim(run_service: RunService, sim: Simulator):
    """A 65516 event sets the SIM ACTIVATED and publishes a succeeded signal."""
    _, broker = await run_service()
    event = make_event(iccid(1))
    await broker.publish(event)

    signal = await broker.signal_for(event["event_id"])

    assert (signal["outcome"], signal["sim_status"], signal["attempts"]) == \
        ("succeeded", "ACTIVATED", 1)
    assert signal["_routing_key"] == "jasper.succeeded"
    assert signal["_correlation_id"] == event["event_id"]
    assert signal["text"] == f"SIM {iccid(1)} activated via M2MOne NZ"
    assert sim.status(iccid(1)) == "ACTIVATED"


async def test_decommission_deactivates_the_sim(run_service: RunService, sim: Simulator):
    """A 65517 event sets an active SIM DEACTIVATED."""
    sim.set_status(iccid(2), "ACTIVATED")
    _, broker = await run_service()
    event = make_event(iccid(2), code=65517)
    await broker.publish(event)

    signal = await broker.signal_for(event["event_id"])

    assert (signal["outcome"], signal["command"], signal["sim_status"]) == \
        ("succeeded", "deactivate", "DEACTIVATED")
    assert sim.status(iccid(2)) == "DEACTIVATED"


async def test_explicit_command_overrides_the_map(run_service: RunService, sim: Simulator):
    """A 65516 event carrying command=deactivate deactivates the SIM."""
    sim.set_status(iccid(3), "ACTIVATED")
    _, broker = await run_service()
    event = make_event(iccid(3), command="deactivate")
    await broker.publish(event)

    signal = await broker.signal_for(event["event_id"])

    assert (signal["outcome"], signal["command"]) == ("succeeded", "deactivate")
    assert sim.status(iccid(3)) == "DEACTIVATED"


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"event_code": "65516"}, "INVALID_EVENT"),
        ({"device": {"communicator_type": "M2MOne NZ"}}, "MISSING_ICCID"),
        ({"device": {"ref_no": "1234-5678", "communicator_type": "M2MOne NZ"}}, "INVALID_ICCID"),
        ({"device": {"ref_no": iccid(4), "communicator_type": "Nope"}},
         "UNKNOWN_COMMUNICATOR_TYPE"),
        ({"event_code": 65000}, "UNKNOWN_EVENT_CODE"),
    ],
)
async def test_local_failures_make_no_api_call(
    run_service: RunService, sim: Simulator, overrides: dict[str, object], code: str
):
    """Events that cannot succeed get a failed signal with their code and no API call."""
    _, broker = await run_service()
    event = {**make_event(iccid(4)), **overrides}
    await broker.publish(event, code=65516)

    signal = await broker.signal_for(event["event_id"])

    assert (signal["outcome"], signal["error"]["code"], signal["attempts"]) == \
        ("failed", code, 0)
    assert signal["client_id"] == "100234"
    assert signal["error"]["http_status"] is None
    assert sim.requests == []


async def test_unreadable_messages_are_dead_lettered(run_service: RunService, sim: Simulator):
    """Unreadable messages go to the dead-letter queue and the next event still succeeds."""
    _, broker = await run_service()
    bad = [b"not json", b"\xff\xfe", b"[1]", b'{"event_id": "x"}', b"{" + b" " * 70000 + b"}"]
    for body in bad:
        await broker.publish(body)
    event = make_event(iccid(5))
    await broker.publish(event)

    signal = await broker.signal_for(event["event_id"])
    await broker.wait_for(lambda: len(broker.dead) == len(bad), "5 dead letters")

    assert signal["outcome"] == "succeeded"
    reasons = broker.dead_reasons()
    assert any("not JSON" in r for r in reasons)
    assert any("not UTF-8" in r for r in reasons)
    assert any("not an object" in r for r in reasons)
    assert any("client_id" in r for r in reasons)
    assert any("max_message_bytes" in r for r in reasons)


async def test_each_type_uses_its_own_credentials(run_service: RunService, sim: Simulator):
    """Two communicator types call Control Center with their own user names."""
    _, broker = await run_service(types=[
        {"name": "M2MOne NZ", "username": "nz", "api_key": "nz-key", "requests_per_second": 50},
        {"name": "M2MOne AU", "username": "au", "api_key": "au-key", "requests_per_second": 50},
    ])
    nz = make_event(iccid(6), communicator_type="M2MOne NZ")
    au = make_event(iccid(7), communicator_type="M2MOne AU")
    await broker.publish(nz)
    await broker.publish(au)

    signals = await broker.final_signals([nz["event_id"], au["event_id"]])

    assert {s["outcome"] for s in signals.values()} == {"succeeded"}
    assert [r.account for r in sim.calls(iccid(6))] == ["nz"]
    assert [r.account for r in sim.calls(iccid(7))] == ["au"]


async def test_commission_then_decommission_keeps_order(run_service: RunService, sim: Simulator):
    """20 SIMs commissioned then decommissioned back-to-back end DEACTIVATED, calls in order."""
    _, broker = await run_service(types=[
        {"name": "M2MOne NZ", "username": "nz", "max_concurrency": 4,
         "requests_per_second": 500}])
    sim.latency_s = 0.005
    ids = []
    for n in range(20):
        for code in (65516, 65517):
            event = make_event(iccid(100 + n), code=code)
            ids.append(event["event_id"])
            await broker.publish(event)

    signals = await broker.final_signals(ids)

    assert {s["outcome"] for s in signals.values()} == {"succeeded"}
    for n in range(20):
        assert sim.status(iccid(100 + n)) == "DEACTIVATED"
        puts = [r.requested_status for r in sim.calls(iccid(100 + n), method="PUT")]
        assert puts == ["ACTIVATED", "DEACTIVATED"], (n, puts)
    assert sim.max_in_flight_seen["nz"] <= 4
    assert sim.violations == 0


async def test_rate_limit_is_never_tripped(run_service: RunService, sim: Simulator):
    """40 events at requests_per_second 5 against a simulator enforcing 5/s and 1 in flight."""
    _, broker = await run_service(types=[
        {"name": "M2MOne NZ", "username": "nz", "max_concurrency": 1, "requests_per_second": 5}])
    ids = []
    for n in range(40):
        event = make_event(iccid(200 + n))
        ids.append(event["event_id"])
        await broker.publish(event)

    signals = await broker.final_signals(ids, timeout=30)

    assert {s["outcome"] for s in signals.values()} == {"succeeded"}
    assert sim.violations == 0
    assert all(s["attempts"] == 1 for s in signals.values())
    starts = sorted(r.started for r in sim.requests)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 0.19, min(gaps)


async def test_unknown_iccid_fails_without_retry(run_service: RunService, sim: Simulator):
    """An ICCID Control Center does not know gets one call and a failed signal."""
    _, broker = await run_service()
    event = make_event("89990000000000000001")
    await broker.publish(event)

    signal = await broker.signal_for(event["event_id"])

    assert (signal["outcome"], signal["error"]["code"], signal["attempts"]) == \
        ("failed", "20000001", 1)
    assert signal["error"]["http_status"] == 404
    assert "invalid ICCID" in signal["text"]


async def test_transient_errors_are_retried(run_service: RunService, sim: Simulator):
    """Two 500s then success: one succeeded signal after 3 attempts."""
    sim.set_fault(iccid(8), fail_times=2, error_code="30000001", http_status=500)
    _, broker = await run_service()
    event = make_event(iccid(8))
    await broker.publish(event)

    signal = await broker.signal_for(event["event_id"])

    assert (signal["outcome"], signal["attempts"]) == ("succeeded", 3)


async def test_exhausted_retries_fail_and_dead_letter(run_service: RunService, sim: Simulator):
    """A SIM that always answers 503 HTML fails with RETRIES_EXHAUSTED and a replayable copy."""
    sim.set_fault(iccid(9), always_fail=True, http_status=503, html=True)
    _, broker = await run_service()
    event = make_event(iccid(9))
    await broker.publish(event)

    signal = await broker.signal_for(event["event_id"])
    await broker.wait_for(lambda: len(broker.dead) == 1, "the dead-lettered copy")

    assert (signal["outcome"], signal["error"]["code"], signal["attempts"]) == \
        ("failed", "RETRIES_EXHAUSTED", 3)
    assert "UNEXPECTED_RESPONSE" in signal["error"]["message"]
    assert signal["error"]["http_status"] == 503
    assert broker.dead_reasons() == ["RETRIES_EXHAUSTED"]
    assert broker.dead[0].message_id == event["event_id"]


async def test_identical_commands_are_coalesced(run_service: RunService, sim: Simulator):
    """Five identical commissions for one SIM at once make one call and five signals."""
    sim.latency_s = 0.3
    _, broker = await run_service()
    events = [make_event(iccid(10)) for _ in range(5)]
    for event in events:
        await broker.publish(event)

    signals = await broker.final_signals([e["event_id"] for e in events])

    assert {s["outcome"] for s in signals.values()} == {"succeeded"}
    puts = sim.calls(iccid(10), method="PUT")
    assert len(puts) <= 2, len(puts)
    assert sorted(s["attempts"] for s in signals.values())[-len(puts):] == [1] * len(puts)


async def test_wrong_key_pauses_the_type_until_fixed(run_service: RunService, sim: Simulator):
    """A rejected key pauses the type with a delayed signal; fixing the key resumes it."""
    sim.add_account("nz", "right-key", max_in_flight=1, requests_per_second=50)
    service, broker = await run_service(types=[
        {"name": "M2MOne NZ", "username": "nz", "api_key": "wrong-key",
         "requests_per_second": 50}])
    event = make_event(iccid(11))
    await broker.publish(event)

    await broker.wait_for(
        lambda: any(s["outcome"] == "delayed" for s in broker.signals), "a delayed signal")
    delayed = next(s for s in broker.signals if s["outcome"] == "delayed")
    assert (delayed["error"]["code"], delayed["error"]["http_status"]) == ("10000001", 401)
    assert delayed["_routing_key"] == "jasper.delayed"
    assert service.metrics.communicator_up.labels("M2MOne NZ")._value.get() == 0

    sim.accounts["nz"].api_key = "wrong-key"  # the operator fixes the account

    signal = await broker.signal_for(event["event_id"])
    assert signal["outcome"] == "succeeded"
    assert [s["outcome"] for s in broker.signals if s["event_id"] == event["event_id"]] == \
        ["delayed", "succeeded"]
    assert service.metrics.communicator_up.labels("M2MOne NZ")._value.get() == 1


async def test_paused_jobs_are_parked_in_order_and_applied_once_fixed(
    run_service: RunService, sim: Simulator, connection: AbstractRobustConnection
):
    """A paused type's jobs wait in its parked queue (delayed once each, nothing held by the
    consumer, the anchor renewed) and are applied in order once the key is fixed."""
    sim.add_account("nz", "right-key", max_in_flight=1, requests_per_second=100)
    service, broker = await run_service(
        types=[{"name": "M2MOne NZ", "username": "nz", "api_key": "wrong-key",
                "max_concurrency": 2, "requests_per_second": 100}],
        hold_refresh_seconds=0.3)
    events = []
    for n in range(4):
        for code in (65516, 65517, 65516):
            events.append(make_event(iccid(300 + n), code=code))
    for event in events:
        await broker.publish(event)
    ids = [e["event_id"] for e in events]
    worker = service.workers["M2MOne NZ"]
    ct = service.settings.communicator_types[0]

    def delayed_or_superseded(e: str) -> bool:
        """A job parked has its delayed signal; a bulk job that arrives after a newer one of
        its SIM needs no call: its final SUPERSEDED comes at once, without a delay."""
        return any(s["event_id"] == e and (s["outcome"] == "delayed" or (
            s["outcome"] == "failed" and s["error"]["code"] == "SUPERSEDED"))
            for s in broker.signals)

    await broker.wait_for(lambda: all(delayed_or_superseded(e) for e in ids),
                          "a delayed signal (or SUPERSEDED at once) for every event")
    parked_ids = {s["event_id"] for s in broker.signals if s["outcome"] == "delayed"}
    async with asyncio.timeout(10):  # renewing the anchor publishes no signal: poll it
        while worker.anchor.renewals < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    channel = await connection.channel()
    parked = await channel.declare_queue(broker.names.parked_queue(ct), passive=True)
    work = await channel.declare_queue(broker.names.work_queue(ct), passive=True)
    await channel.close()
    assert parked.declaration_result.message_count == len(parked_ids), " ".join(str(x) for x in [
        (s["event_id"][:8], s["outcome"], (s.get("error") or {}).get("code"))
        for s in broker.signals])
    assert work.declaration_result.message_count == 0  # only the anchor, held unacked
    sim.accounts["nz"].api_key = "wrong-key"
    signals = await broker.final_signals(ids)

    # Each SIM: a commission, a decommission (bulk), a commission. Parked, the bulk job may
    # come back after the newer commission: then it is SUPERSEDED instead of applied after it.
    for e in ids:
        delays = [s["outcome"] for s in broker.signals if s["event_id"] == e].count("delayed")
        assert delays == (1 if e in parked_ids else 0)
        final = signals[e]
        assert final["outcome"] == "succeeded" or final["error"]["code"] == "SUPERSEDED", final
    for n in range(4):
        sim_events = [e for e in events if e["device"]["ref_no"] == iccid(300 + n)]
        applied = ["ACTIVATED" if e["event_code"] == 65516 else "DEACTIVATED"
                   for e in sim_events if signals[e["event_id"]]["outcome"] == "succeeded"]
        puts = [str(r.requested_status) for r in sim.calls(iccid(300 + n), method="PUT")
                if r.http_status == 200]
        assert collapse(puts) == collapse(applied), (puts, applied)  # in publish order
        assert sim.status(iccid(300 + n)) == "ACTIVATED"


def collapse(statuses: list[str]) -> list[str]:
    """Identical commands in a row are one call (coalescing)."""
    return [s for i, s in enumerate(statuses) if i == 0 or statuses[i - 1] != s]


async def test_watchdog_registers_a_vanished_consumer(
    run_service: RunService, connection: AbstractRobustConnection
):
    """A consumer that vanished without the service noticing is registered again."""
    service, broker = await run_service(watchdog_interval_seconds=0.1)
    router = service._router_consumer
    assert router is not None
    assert router.consumer_tag is not None
    assert router.queue is not None
    queue = router.queue
    await queue.cancel(router.consumer_tag)  # behind the service's back

    async def consumers() -> int:
        channel = await connection.channel()  # a fresh channel: no cached declaration
        ok = await channel.declare_queue(queue.name, passive=True)
        await channel.close()
        return int(ok.declaration_result.consumer_count or 0)

    assert await consumers() == 0
    event = make_event(iccid(12))
    await broker.publish(event)
    signal = await broker.signal_for(event["event_id"], timeout=10)

    assert signal["outcome"] == "succeeded"
    assert await consumers() == 1

    async def ready() -> bool:
        return service.readiness()[0]

    await broker.wait_for_async(ready, "/readyz ready again after the next check")


async def test_a_vanished_work_consumer_gives_its_type_back_and_comes_back(
    run_service: RunService, connection: AbstractRobustConnection, sim: Simulator
):
    """A work-queue consumer cancelled behind the service's back: /readyz says so while the
    watchdog registers it again, the worker lets go of the type first (no calls on a type
    it may no longer own), and jobs are applied again afterwards (issue #16, defect 1)."""
    service, broker = await run_service(watchdog_interval_seconds=0.1)
    worker = service.workers["M2MOne NZ"]
    first = make_event(iccid(13))
    await broker.publish(first)
    await broker.signal_for(first["event_id"], timeout=10)
    assert worker.queue is not None
    assert worker.consumer_tag is not None
    await worker.queue.cancel(worker.consumer_tag)  # behind the service's back
    not_ready: list[str] = []

    async def said_so() -> bool:
        ready, why = service.readiness()
        if not ready:
            not_ready.append(why)
        return bool(not_ready)

    await broker.wait_for_async(said_so, "readiness to tell that a consumer is re-registered")
    event = make_event(iccid(14))
    await broker.publish(event)
    signal = await broker.signal_for(event["event_id"], timeout=15)

    assert signal["outcome"] == "succeeded"
    assert any("work M2MOne NZ" in why for why in not_ready), not_ready
    await broker.wait_for(lambda: service.readiness()[0], "ready again")


async def test_unroutable_signal_is_not_a_success(
    run_service: RunService, sim: Simulator, connection: AbstractRobustConnection
):
    """With nothing bound to the history exchange the event stays queued until a signal lands."""
    service, broker = await run_service(history_queue=False)
    event = make_event(iccid(13))
    await broker.publish(event)
    failures = service.metrics.history_publish_failures

    async with asyncio.timeout(10):  # nothing is published that the test could wait on
        while failures._value.get() < 1:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    assert broker.final(event["event_id"]) == []

    channel = await connection.channel()
    late = await channel.declare_queue(exclusive=True)
    await late.bind(broker.settings.history_exchange, "jasper.#")
    async with asyncio.timeout(15), late.iterator() as messages:
        async for message in messages:
            signal = json.loads(message.body)
            if signal["event_id"] == event["event_id"]:
                break
    await channel.close()

    assert signal["outcome"] == "succeeded"
    assert sim.status(iccid(13)) == "ACTIVATED"


async def test_older_job_behind_a_newer_one_is_superseded(
    run_service: RunService, sim: Simulator, connection: AbstractRobustConnection
):
    """A redelivered older job arriving after a newer one for its SIM is not applied."""
    service, broker = await run_service()
    older = make_event(iccid(14))
    newer = make_event(iccid(14), code=65517)
    jobs = [  # as a crash would leave them: the newer one first, the older one behind it
        {**newer, "command": "deactivate", "stamp": 2000},
        {**older, "command": "activate", "stamp": 1000},
        {**newer, "command": "deactivate", "stamp": 2000},  # and a duplicate
    ]
    channel = await connection.channel()
    for job in jobs:
        body = {k: job[k] for k in ("event_id", "event_code", "client_id", "command",
                                    "stamp")}
        body.update(iccid=iccid(14), communicator_type="M2MOne NZ")
        await channel.default_exchange.publish(
            aio_pika.Message(json.dumps(body).encode()),
            routing_key=broker.names.work_queue(service.settings.communicator_types[0]))
    await channel.close()

    await broker.wait_for(lambda: len(broker.final(newer["event_id"])) == 2, "both signals")
    stale = await broker.signal_for(older["event_id"])

    assert (stale["outcome"], stale["error"]["code"], stale["attempts"]) == \
        ("failed", "SUPERSEDED", 0)
    assert newer["event_id"] in stale["error"]["message"]
    assert [s["attempts"] for s in broker.final(newer["event_id"])] == [1, 0]
    assert [r.requested_status for r in sim.calls(iccid(14), method="PUT")] == ["DEACTIVATED"]
    assert sim.status(iccid(14)) == "DEACTIVATED"


async def test_conflicting_queue_is_named_at_start(
    run_service: RunService, connection: AbstractRobustConnection
):
    """A queue left with other arguments stops start-up with a message naming it."""
    tag = f"jct-{uuid.uuid4().hex[:10]}"
    channel = await connection.channel()
    await channel.declare_queue(f"{tag}.events", durable=True)  # a classic queue
    try:
        with pytest.raises(ConfigError, match=rf"{tag}\.events.*another queue_prefix"):
            await run_service(queue_prefix=tag)
    finally:
        cleanup = await connection.channel()
        for name in ("events", "dead", "history"):
            await cleanup.queue_delete(f"{tag}.{name}")
        await cleanup.exchange_delete(f"{tag}.dlx")
        await cleanup.close()


async def test_calls_overlap_up_to_max_concurrency(run_service: RunService, sim: Simulator):
    """With slow answers, max_concurrency calls are in flight at once, never more."""
    _, broker = await run_service(types=[
        {"name": "M2MOne NZ", "username": "nz", "max_concurrency": 4,
         "requests_per_second": 200}])
    sim.latency_s = 0.2
    events = [make_event(iccid(400 + n)) for n in range(8)]
    for event in events:
        await broker.publish(event)

    await broker.final_signals([e["event_id"] for e in events])

    assert sim.max_in_flight_seen["nz"] == 4
    assert sim.violations == 0
