"""The soak's plan, proxy and checks on their own: no service, no broker, milliseconds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from .invariants import (
    Injected,
    Observations,
    Published,
    QueueSample,
    ReplicaSample,
    Signal,
    account_limits,
    every_event_final,
    no_overlap_between_processes,
    no_type_left_idle,
    one_delayed_per_job,
    one_final_per_event,
    sigterm_exits_zero,
    sims_end_in_newest_status,
)
from .proxy import Proxy
from .schedule import KINDS, make_plan

SIM = "89610101000000000001"


def obs(**fields: Any) -> Observations:
    o = Observations(types=[{"name": "Type A", "slug": "type-a", "account": "a",
                             "max_concurrency": 1}], prefix="p", started=0.0)
    for key, value in fields.items():
        setattr(o, key, value)
    return o


def pub(event_id: str, order: int = 0, command: str = "activate", at: float = 0.0) -> Published:
    return Published(order, event_id, "event", SIM, "Type A", command, at)


def sig(event_id: str, outcome: str, at: float, code: str | None = None) -> Signal:
    return Signal(event_id, outcome, code, at - 0.01, at)


# -- the plan ----------------------------------------------------------------------------

def test_a_seed_gives_the_same_plan_every_time():
    """The same seed, minutes and replicas make the same events and faults."""
    assert make_plan(42, 3, 3, 2) == make_plan(42, 3, 3, 2)
    assert make_plan(42, 3, 3, 2).faults != make_plan(43, 3, 3, 2).faults


def test_a_short_plan_holds_every_fault_kind():
    """The 1.5-minute plan of the make-test seed injects every kind at least once."""
    plan = make_plan(7, 1.5, 3, 2)

    assert {f.kind for f in plan.faults} == set(KINDS)


def test_every_fault_heals_before_the_quiet_phase_and_a_replica_stays_up():
    """Faults end 3 s before the active phase does, and a replica is never planned away
    while every other one is."""
    for seed in range(20):
        plan = make_plan(seed, 10, 3, 2)
        for fault in plan.faults:
            assert fault.at_s + fault.duration_s <= plan.active_s - 2.5, fault
        # a restart may take the shutdown grace and a start-up: 25 s more
        away = [(f.at_s, f.at_s + f.duration_s + (2 if f.kind == "blackhole" else 25),
                 f.replica) for f in plan.faults if f.kind in ("kill9", "sigterm", "blackhole")]
        for start, _, _ in away:
            assert sum(1 for s, e, _ in away if s <= start < e) <= 2, (seed, start)


def test_linked_areas_and_flips_share_a_sim():
    """Some SIMs get several events at once (linked areas) and both commands close together."""
    plan = make_plan(1, 2, 3, 2)
    by_sim: dict[str, list[str]] = {}
    for p in plan.publishes:
        if p.iccid:
            assert p.event is not None
            by_sim.setdefault(p.iccid, []).append(str(p.event["event_code"]))

    assert any(len(codes) >= 3 for codes in by_sim.values())
    assert any({"65516", "65517"} <= set(codes) for codes in by_sim.values())


# -- the proxy ---------------------------------------------------------------------------

@pytest.fixture
async def echo() -> AsyncIterator[int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()


async def test_proxy_passes_holds_in_a_blackhole_then_resets(echo: int) -> None:
    """pass forwards; blackhole holds the bytes until it heals; reset kills the connection."""
    proxy = Proxy("127.0.0.1", echo)
    port = await proxy.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"one")
    assert await asyncio.wait_for(reader.read(3), 2) == b"one"

    proxy.set_mode("blackhole")
    writer.write(b"two")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(3), 0.3)
    proxy.set_mode("pass")
    assert await asyncio.wait_for(reader.read(3), 2) == b"two"
    assert proxy.upstream_ports()

    proxy.set_mode("reset")
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(3), 2)
    writer.close()
    await proxy.close()


# -- the checks --------------------------------------------------------------------------

def test_an_event_without_a_final_signal_fails():
    """An event with only a delayed signal fails "every event has a final signal"."""
    o = obs(published=[pub("e1"), pub("e2", 1)],
            signals={"e1": [sig("e1", "succeeded", 1)], "e2": [sig("e2", "delayed", 1)]})

    v = every_event_final(o)

    assert (v.failed, v.checked) == (1, 2)


def test_a_duplicate_final_is_allowed_only_after_a_crash():
    """A second final signal is an exception after a kill -9, a failure without one."""
    signals = {"e1": [sig("e1", "succeeded", 10), sig("e1", "succeeded", 20)]}
    crash = Injected("kill9", 15, 15, "replica 0")
    term = Injected("sigterm", 15, 16, "replica 0")

    allowed = one_final_per_event(obs(published=[pub("e1")], signals=signals, faults=[crash]))
    failed = one_final_per_event(obs(published=[pub("e1")], signals=signals, faults=[term]))

    assert (allowed.holds, allowed.exceptions) == (True, {"duplicate final after kill9": 1})
    assert failed.failed == 1


def test_a_second_delayed_signal_needs_a_crash_in_its_publish():
    """Two delayed signals: allowed when a crash falls at the first one's recording, not
    when it falls long after."""
    signals = {"e1": [sig("e1", "delayed", 10), sig("e1", "delayed", 40),
                      sig("e1", "succeeded", 50)]}
    at_publish = Injected("close_connections", 10.2, 10.2)
    later = Injected("kill9", 30, 30)

    assert one_delayed_per_job(obs(published=[pub("e1")], signals=signals,
                                   faults=[at_publish])).holds
    assert not one_delayed_per_job(obs(published=[pub("e1")], signals=signals,
                                       faults=[later])).holds


def test_a_sim_in_an_older_events_status_fails():
    """A SIM left ACTIVATED although its newest event (a decommission) succeeded fails."""
    published = [pub("e1", 0, "activate"), pub("e2", 1, "deactivate")]
    signals = {"e1": [sig("e1", "succeeded", 1)], "e2": [sig("e2", "succeeded", 2)]}

    bad = sims_end_in_newest_status(obs(published=published, signals=signals,
                                        sim_status={SIM: "ACTIVATED"}))
    good = sims_end_in_newest_status(obs(published=published, signals=signals,
                                         sim_status={SIM: "DEACTIVATED"}))

    assert (bad.failed, good.failed) == (1, 0)


def test_an_older_status_after_two_crashes_in_a_pause_is_the_named_window():
    """The same mismatch is an exception when two kill -9s followed a delayed signal."""
    published = [pub("e1", 0, "activate"), pub("e2", 1, "deactivate")]
    signals = {"e1": [sig("e1", "delayed", 1), sig("e1", "succeeded", 9)],
               "e2": [sig("e2", "succeeded", 8)]}
    kills = [Injected("kill9", 3, 3), Injected("kill9", 6, 6)]

    v = sims_end_in_newest_status(obs(published=published, signals=signals,
                                      sim_status={SIM: "ACTIVATED"}, faults=kills))

    assert (v.holds, sum(v.exceptions.values())) == (True, 1)


def test_calls_of_two_processes_that_overlap_fail():
    """Two pids with overlapping calls on one account fail; back-to-back calls do not."""
    def call(pid: int, start: float, end: float) -> dict[str, Any]:
        return {"account": "a", "started": start, "finished": end,
                "user_agent": f"jasper-consumer/0.1.0 (host pid {pid})"}

    overlapping = obs(requests=[call(1, 0, 2), call(2, 1.5, 3)])
    apart = obs(requests=[call(1, 0, 2), call(2, 2.1, 3), call(2, 2.5, 4)])

    assert no_overlap_between_processes(overlapping).failed == 1
    assert no_overlap_between_processes(apart).holds


def test_a_type_waiting_without_calls_for_over_30_s_fails_unless_excused():
    """Jobs waiting 40 s with every replica ready and no call fail; a call, a replica
    that is not ready, or a pause in the span excuse it."""
    samples = [QueueSample(float(t), {"p.work.type-a": 3}) for t in range(0, 42, 2)]
    ready = [ReplicaSample(float(t), 0, True, True, {"Type A": 1.0}) for t in range(42)]

    idle = no_type_left_idle(obs(queue_samples=samples, replica_samples=ready))
    called = no_type_left_idle(obs(queue_samples=samples, replica_samples=ready, requests=[
        {"account": "a", "started": 20.0, "finished": 20.1, "user_agent": None}]))
    unready = [*ready, ReplicaSample(20.5, 1, True, False)]
    excused = no_type_left_idle(obs(queue_samples=samples, replica_samples=unready))
    paused = [*ready, ReplicaSample(19.5, 0, True, True, {"Type A": 0.0})]

    assert idle.failed == 1
    assert called.holds
    assert excused.holds
    assert no_type_left_idle(obs(queue_samples=samples, replica_samples=paused)).holds


def test_sigterm_exit_codes_and_account_limits():
    """A SIGTERM that ended 1 or never fails; a violation on an account fails."""
    assert sigterm_exits_zero(obs(sigterms=[(0, 10, 0), (1, 11, 1), (2, 12, None)])).failed == 2
    assert account_limits(obs(stats={"violations_by_account": {"a": 1},
                                     "max_in_flight_seen": {"a": 1}})).failed == 1
    assert account_limits(obs(stats={"violations_by_account": {},
                                     "max_in_flight_seen": {"a": 1}})).holds


def test_a_rate_violation_in_a_second_the_simulator_stalled_is_a_named_window():
    """A rate violation whose second holds a stall of the simulator's own loop at least as
    long as the gap was short is allowed (counted); with no stall, or one too short to
    explain it, it fails."""
    types = [{"name": "Type A", "slug": "type-a", "account": "a", "max_concurrency": 1,
              "requests_per_second": 9}]  # 111 ms apart; these come 100 ms apart
    calls = [{"account": "a", "method": "PUT", "started": 10.0 + 0.1 * n,
              "finished": 10.01 + 0.1 * n, "user_agent": "x (h pid 7)",
              "violation": "rate" if n == 9 else None} for n in range(10)]
    stats = {"violations_by_account": {"a": 1}, "max_in_flight_seen": {"a": 1}}

    def judged(stalls: list[list[float]]) -> Any:
        return account_limits(obs(types=types, requests=calls,
                                  stats={**stats, "stalls": stalls}))

    assert judged([[10.35, 0.02]]).holds
    assert sum(judged([[10.35, 0.02]]).exceptions.values()) == 1
    assert judged([[5.0, 0.02]]).failed == 1  # no stall in that second
    assert judged([[10.35, 0.004]]).failed == 1  # 4 ms cannot make a gap 11 ms short


def test_kinds_left_out_are_not_planned():
    """``without`` leaves its kinds out of the plan and names an unknown kind."""
    plan = make_plan(7, 3, 3, 1, frozenset({"stop_app", "consumer_timeout"}))

    assert not {f.kind for f in plan.faults} & {"stop_app", "consumer_timeout"}
    with pytest.raises(ValueError, match="stop_ap"):
        make_plan(7, 3, 3, 1, frozenset({"stop_ap"}))
