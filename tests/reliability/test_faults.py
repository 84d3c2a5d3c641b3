"""Fault tests: each injects a fault into the real running service and counts losses."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

from .conftest import Harness, iccid, make_event, require_rabbitmqctl, type_, wait_until


async def publish_when_possible(harness: Harness, events: list[dict[str, Any]]) -> None:
    """Publish once the broker takes connections again (bounded)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            await harness.publish(events)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def at_least(harness: Harness, ids: list[str], n: int) -> Callable[[], bool]:
    return lambda: sum(1 for e in ids if harness.signals.finals(e)) >= n


async def test_sigterm_with_calls_in_flight_exits_cleanly(harness: Harness):
    """SIGTERM with calls in flight: exit 0 within the grace period, nothing lost."""
    sim = await harness.setup([type_("a", 2, 50)])
    service = await harness.start_service()
    await harness.read_signals()
    for n in range(10):
        await sim.fault(iccid(n), latency_s=0.5)
    events = [make_event(iccid(n), "Type A") for n in range(60)]
    await harness.publish(events)
    await wait_until(lambda: any(harness.signals.finals(e["event_id"]) for e in events),
                     "the first signal", 20)

    started = time.monotonic()
    code = service.terminate(timeout=30)
    took = time.monotonic() - started

    assert code == 0, service.output()[-2000:]
    assert took < harness.config["shutdown_grace_seconds"] + 2, took
    done_before = sum(1 for e in events if harness.signals.finals(e["event_id"]))
    await harness.start_service()
    ids = [e["event_id"] for e in events]
    await harness.wait_final(ids, 60)
    lost, dup = harness.signals.count(ids)
    line = harness.signals.report("SIGTERM with calls in flight", ids)
    assert (lost, dup) == (0, 0), f"{line}; done before SIGTERM {done_before}"
    assert '"stopped"' in service.output()


async def test_kill9_three_times_loses_nothing(harness: Harness):
    """kill -9 three times during 2,000 events across 3 types: every event gets a final signal."""
    await harness.setup([type_(x, 4, 400) for x in "abc"])
    service = await harness.start_service()
    await harness.read_signals()
    events = [make_event(iccid(n), f"Type {'ABC'[n % 3]}") for n in range(2000)]
    ids = [e["event_id"] for e in events]
    publisher = asyncio.create_task(harness.publish(events))

    for round_ in range(3):
        target = 300 * (round_ + 1)
        await wait_until(at_least(harness, ids, target),
                         f"{target} signals before kill {round_ + 1}", 60, 0.05)
        service.kill9()
        service = await harness.start_service()
    await publisher
    await harness.wait_final(ids, 180)

    lost, _ = harness.signals.count(ids)
    line = harness.signals.report("kill -9 x3", ids)
    assert lost == 0, line


async def test_order_survives_kill9_redelivery(harness: Harness):
    """50 SIMs x (activate, deactivate) with jittered latency and a kill -9 end all DEACTIVATED."""
    sim = await harness.setup([type_("a", 4, 300)])
    service = await harness.start_service()
    await harness.read_signals()
    for n in range(50):
        await sim.fault(iccid(n), latency_s=(n % 7) * 0.01)
    events = []
    for n in range(50):
        events.append(make_event(iccid(n), "Type A", code=65516))
        events.append(make_event(iccid(n), "Type A", code=65517))
    ids = [e["event_id"] for e in events]
    await harness.publish(events)
    await wait_until(lambda: sum(1 for e in ids if harness.signals.finals(e)) >= 30,
                     "30 signals", 30, 0.02)
    service.kill9()
    await harness.start_service()
    await harness.wait_final(ids, 60)

    statuses = {n: (await sim.sim(iccid(n)) or {}).get("status") for n in range(50)}
    wrong = {n: s for n, s in statuses.items() if s != "DEACTIVATED"}
    lost, _ = harness.signals.count(ids)
    line = harness.signals.report("order under kill -9", ids)
    assert not wrong, f"not DEACTIVATED: {wrong}; {line}"
    assert lost == 0, line


async def test_wrong_key_file_pauses_only_its_type(harness: Harness):
    """A wrong key in api_key_file pauses its type (delayed signals); fixing the file resumes."""
    key_file = harness.tmp / "a.key"
    key_file.write_text("wrong-key\n")
    await harness.setup(
        [{**type_("a"), "api_key": None, "api_key_file": str(key_file)}, type_("b")],
        account_keys={"a": "right-key"})
    service = await harness.start_service()
    port = harness.ports[-1]
    await harness.read_signals()
    a_events = [make_event(iccid(n), "Type A") for n in range(10)]
    b_events = [make_event(iccid(100 + n), "Type B") for n in range(10)]
    await harness.publish(a_events + b_events)

    await harness.wait_final([e["event_id"] for e in b_events], 20)
    await wait_until(lambda: all("delayed" in harness.signals.outcomes(e["event_id"])
                                 for e in a_events), "a delayed signal for every A event", 20)
    assert 'jasper_communicator_up{communicator_type="Type A"} 0.0' in await harness.metrics(port)
    assert not any(harness.signals.finals(e["event_id"]) for e in a_events)
    delayed = harness.signals.by_event[a_events[0]["event_id"]][0]
    assert (delayed["error"]["code"], delayed["error"]["http_status"]) == ("10000001", 401)

    key_file.write_text("  right-key  \n")
    ids = [e["event_id"] for e in a_events]
    await harness.wait_final(ids, 45)

    line = harness.signals.report("wrong key in api_key_file, then fixed",
                                  ids + [e["event_id"] for e in b_events])
    assert all(harness.signals.outcomes(e) == ["delayed", "succeeded"] for e in ids), \
        (line, {e: harness.signals.outcomes(e) for e in ids})
    assert service.alive


async def test_account_outage_pauses_and_recovers(harness: Harness):
    """Account down (refused, then 503 HTML) for 30 s: nothing fails, at most one delayed each."""
    sim = await harness.setup([type_("a", 1, 100)])
    await harness.start_service()
    await harness.read_signals()
    events = [make_event(iccid(n), "Type A") for n in range(200)]
    ids = [e["event_id"] for e in events]
    await harness.publish(events[:50])
    await harness.wait_final(ids[:50], 30)

    await sim.account("a", down="refuse")
    await harness.publish(events[50:])
    await wait_until(lambda: any("delayed" in harness.signals.outcomes(e) for e in ids[50:]),
                     "a delayed signal", 20)
    outage_started = time.monotonic()
    await wait_until(lambda: time.monotonic() - outage_started > 15, "15 s of refused", 20, 0.5)
    await sim.account("a", down="html503")
    await wait_until(lambda: time.monotonic() - outage_started > 30, "15 s of 503", 20, 0.5)
    await sim.account("a", down=None)
    await harness.wait_final(ids, 90)

    failed = [e for e in ids if harness.signals.finals(e)[0]["outcome"] != "succeeded"]
    multi_delayed = [e for e in ids if harness.signals.outcomes(e).count("delayed") > 1]
    lost, _ = harness.signals.count(ids)
    line = harness.signals.report("account down 30 s", ids)
    echo_starts = sorted(r["started"] for r in await sim.requests() if "/echo/" in r["path"])
    # aiohttp re-sends an idempotent GET once, at once, when the server drops a reused
    # connection: requests < 50 ms apart are one probe of the service.
    probes = [t for i, t in enumerate(echo_starts) if i == 0 or t - echo_starts[i - 1] > 0.05]
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert (len(failed), len(multi_delayed), lost) == (0, 0, 0), \
        (line, failed[:3], multi_delayed[:3])
    assert not gaps or min(gaps) >= 0.95, gaps


async def test_down_type_does_not_delay_another(harness: Harness):
    """With type A down and 1,000 events queued, type B's events each signal within 1 s."""
    sim = await harness.setup([type_("a", 1, 250), type_("b", 1, 50)])
    await harness.start_service()
    await harness.read_signals()
    first = make_event(iccid(4999), "Type B")  # type B's owner waits once before its first
    await harness.publish([first])             # call (operator guide, section 13): not timed
    await harness.wait_final([first["event_id"]], 20)
    await sim.account("a", down="html503")
    a_events = [make_event(iccid(n), "Type A") for n in range(1000)]
    await harness.publish(a_events)
    await wait_until(lambda: any("delayed" in harness.signals.outcomes(e["event_id"])
                                 for e in a_events), "type A paused", 30)

    latencies = []
    for n in range(20):
        event = make_event(iccid(5000 + n), "Type B")
        sent = time.monotonic()
        await harness.publish([event])
        await wait_until(at_least(harness, [event["event_id"]], 1), "type B signal", 10, 0.005)
        latencies.append(time.monotonic() - sent)

    assert max(latencies) <= 1.0, sorted(latencies)[-5:]
    print(f"isolation: type B publish-to-signal max {max(latencies) * 1000:.0f} ms")
    await sim.account("a", down=None)
    await harness.wait_final([e["event_id"] for e in a_events], 120)
    a_ids = [e["event_id"] for e in a_events]
    lost, dup = harness.signals.count(a_ids)
    line = harness.signals.report("type A down with 1,000 queued", a_ids)
    assert (lost, dup) == (0, 0), line


async def test_identical_commissions_are_coalesced(harness: Harness):
    """5 identical commissions for one SIM at once (300 ms latency): <= 2 PUTs, 5 succeeded."""
    sim = await harness.setup([type_("a", 2, 50)])
    await harness.start_service()
    await harness.read_signals()
    await sim.fault(iccid(1), latency_s=0.3)
    events = [make_event(iccid(1), "Type A") for _ in range(5)]
    await harness.publish(events)
    ids = [e["event_id"] for e in events]
    await harness.wait_final(ids, 20)

    puts = [r for r in await sim.requests() if r["method"] == "PUT"]
    line = harness.signals.report(f"5 identical commissions, {len(puts)} PUT(s)", ids)
    assert len(puts) <= 2, line
    assert [harness.signals.finals(e)[0]["outcome"] for e in ids] == ["succeeded"] * 5


async def test_two_processes_share_the_account_limit(harness: Harness):
    """Two processes never exceed max_concurrency per account; killing the active hands over."""
    sim = await harness.setup([type_("a", 2, 200), type_("b", 2, 200)])
    first = await harness.start_service()
    second = await harness.start_service()
    await harness.read_signals()
    await sim.fault(iccid(0), latency_s=0.01)
    events = [make_event(iccid(n), f"Type {'AB'[n % 2]}") for n in range(600)]
    ids = [e["event_id"] for e in events]
    await harness.publish(events)
    await wait_until(lambda: sum(1 for e in ids if harness.signals.finals(e)) >= 150,
                     "150 signals", 30, 0.02)
    first.kill9()
    await harness.wait_final(ids, 90)

    stats = await sim.stats()
    lost, _ = harness.signals.count(ids)
    line = harness.signals.report("two processes, active one killed", ids)
    assert stats["violations"] == 0, (line, stats)
    assert max(stats["max_in_flight_seen"].values()) <= 2, (line, stats)
    assert lost == 0, line
    assert second.alive


async def test_broker_connection_loss_is_survived(harness: Harness):
    """close_all_connections twice and a stop_app/start_app: no restart, consuming again, 0 lost."""
    require_rabbitmqctl()
    await harness.setup([type_("a", 2, 300)])
    service = await harness.start_service()
    port = harness.ports[-1]
    events = [make_event(iccid(n), "Type A") for n in range(300)]
    ids = [e["event_id"] for e in events]

    async def rabbitmqctl(*args: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            "rabbitmqctl", *args, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        assert await asyncio.wait_for(proc.wait(), 120) == 0, args

    await harness.read_signals()
    resumed_after = []
    for round_, action in enumerate(["close", "close", "restart"]):
        in_flight = events[round_ * 100:round_ * 100 + 50]
        after = events[round_ * 100 + 50:(round_ + 1) * 100]
        await harness.publish(in_flight)  # being processed when the connection goes
        if action == "close":
            await rabbitmqctl("close_all_connections", "jasper-consumer reliability test")
        else:
            await rabbitmqctl("stop_app")
            await rabbitmqctl("start_app")
            await rabbitmqctl("await_startup")
        back = time.monotonic()
        await publish_when_possible(harness, after)
        await wait_until(at_least(harness, [e["event_id"] for e in after], 1),
                         f"consuming again after {action}", 30, 0.05)
        resumed_after.append(time.monotonic() - back)
        await harness.wait_final([e["event_id"] for e in in_flight + after], 60)
        assert service.alive

    assert await harness.ready(port, service)
    print(f"broker loss: consuming again after {[round(s, 1) for s in resumed_after]} s")
    assert max(resumed_after) < 10, resumed_after
    lost, _ = harness.signals.count(ids)
    line = harness.signals.report("broker connections closed x2, app restarted", ids)
    assert lost == 0, line
