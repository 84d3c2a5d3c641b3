"""Interactive first, at the account's real limits (operator guide, section 13, Interactive
first; issue 15): the service as subprocesses, the simulator enforcing the limits, the
real broker. Who called is read from the simulator's request log (the User-Agent names the
process); its clock is this machine's ``time.monotonic()``, like the tests'.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from .conftest import Harness, caller_pid, iccid, make_event, type_, wait_until

DECOMMISSION = 65517


def puts_of(records: list[dict[str, Any]], sim: str) -> list[dict[str, Any]]:
    return sorted((r for r in records if r["method"] == "PUT" and r["iccid"] == sim),
                  key=lambda r: r["started"])


@pytest.mark.timeout(240)
async def test_a_commission_behind_2000_bulk_jobs_goes_live_within_one_interval(
        harness: Harness) -> None:
    """2,000 decommissions wait at 5 calls/s (one at a time); a commission published then
    gets its final signal within 1/rps + 0.5 s + the simulator's answer time."""
    rps = 5.0
    sim = await harness.setup([type_("a", 1, rps)])
    await harness.start_service()
    await harness.read_signals()
    bulk = [make_event(iccid(n), "Type A", code=DECOMMISSION) for n in range(2000)]
    await harness.publish(bulk)
    await wait_until(lambda: sum(1 for e in bulk[:50] if harness.signals.finals(e["event_id"]))
                     >= 5, "the bulk work under way", 60)

    commission = make_event(iccid(5000), "Type A")
    sent = time.monotonic()
    await harness.publish([commission])
    await wait_until(lambda: bool(harness.signals.finals(commission["event_id"])),
                     "the commission's final signal", 20, 0.005)
    took = harness.signals.first_at(commission["event_id"], "succeeded")
    assert took is not None
    took -= sent
    put = puts_of(await sim.requests(), iccid(5000))[0]
    answer_s = put["finished"] - put["started"]
    waiting = sum(1 for e in bulk if not harness.signals.finals(e["event_id"]))
    line = (f"interactive first: a commission behind {waiting} waiting decommissions at "
            f"{rps:.0f}/s: final signal {took * 1000:.0f} ms after its publish (bound "
            f"{(1 / rps + 0.5 + answer_s) * 1000:.0f} ms; simulator answered in "
            f"{answer_s * 1000:.1f} ms)")
    print(line)
    assert harness.signals.finals(commission["event_id"])[0]["outcome"] == "succeeded"
    assert waiting > 1500, line  # the backlog really was still there
    assert took <= 1 / rps + 0.5 + answer_s, line
    assert (await sim.stats())["violations"] == 0, line


@pytest.mark.timeout(180)
async def test_an_older_bulk_decommission_never_follows_a_newer_commission(
        harness: Harness) -> None:
    """A decommission of a SIM queued behind bulk work, then a commission of the same SIM:
    the SIM ends ACTIVATED; the decommission is applied first or SUPERSEDED."""
    sim = await harness.setup([type_("a", 1, 10)])
    await harness.start_service()
    await harness.read_signals()
    target = iccid(7000)
    bulk = [make_event(iccid(n), "Type A", code=DECOMMISSION) for n in range(100)]
    decommission = make_event(target, "Type A", code=DECOMMISSION)
    commission = make_event(target, "Type A")
    await harness.publish([*bulk, decommission])
    await harness.publish([commission])

    await harness.wait_final([decommission["event_id"], commission["event_id"]], 60)

    puts = [r["requested_status"] for r in puts_of(await sim.requests(), target)
            if r["http_status"] == 200]
    old = harness.signals.finals(decommission["event_id"])[0]
    new = harness.signals.finals(commission["event_id"])[0]
    line = (f"a bulk decommission then a commission of one SIM: PUTs {puts}; older job "
            f"{old['outcome']}")
    print(line)
    assert new["outcome"] == "succeeded", line
    assert puts[-1] == "ACTIVATED", line
    assert (await sim.sim(target) or {}).get("status") == "ACTIVATED", line
    if puts == ["ACTIVATED"]:
        assert (old["outcome"], old["error"]["code"]) == ("failed", "SUPERSEDED"), line
    else:
        assert puts == ["DEACTIVATED", "ACTIVATED"], line


@pytest.mark.timeout(180)
async def test_bulk_gets_its_share_beside_a_steady_interactive_stream(harness: Harness) -> None:
    """Commissions keep arriving faster than the account serves them, beside a bulk
    backlog: while both wait, bulk still gets at least lanes.bulk_min_share of the calls."""
    rps = 20.0
    sim = await harness.setup([type_("a", 1, rps)])
    await harness.start_service()
    await harness.read_signals()
    await harness.publish([make_event(iccid(n), "Type A", code=DECOMMISSION)
                           for n in range(600)])
    commissions = [make_event(iccid(1000 + n), "Type A") for n in range(600)]
    await harness.publish(commissions)
    await wait_until(lambda: sum(1 for e in commissions if harness.signals.finals(e["event_id"]))
                     >= 200, "200 commissions applied", 60)

    puts = sorted((r for r in await sim.requests() if r["method"] == "PUT"),
                  key=lambda r: r["started"])
    # The window in which both lanes certainly waited: from the first commission's call.
    first = next(i for i, r in enumerate(puts) if r["requested_status"] == "ACTIVATED")
    window = puts[first:first + 200]
    bulk_calls = sum(1 for r in window if r["requested_status"] == "DEACTIVATED")
    line = (f"bulk share beside a steady interactive stream: {bulk_calls} of {len(window)} "
            f"calls ({bulk_calls / len(window):.0%}; minimum share 10 %)")
    print(line)
    assert len(window) == 200, line
    assert bulk_calls >= 0.1 * len(window) - 1, line
    assert bulk_calls <= 0.2 * len(window), line  # and no more while commissions wait
    assert (await sim.stats())["violations"] == 0, line


@pytest.mark.timeout(180)
async def test_after_a_sigterm_the_next_owner_calls_within_a_second(harness: Harness) -> None:
    """The owner stops on SIGTERM with work waiting: it records its release, and the standby
    makes its first call within 1 s of becoming the owner (the request timeout is 10 s)."""
    sim = await harness.setup([type_("a", 1, 5, request_timeout_seconds=10)])
    first = await harness.start_service()
    await harness.read_signals()
    events = [make_event(iccid(n), "Type A", code=DECOMMISSION) for n in range(300)]
    await harness.publish(events)
    await wait_until(lambda: sum(1 for e in events if harness.signals.finals(e["event_id"]))
                     >= 5, "the first owner at work", 60)
    second = await harness.start_service()

    asked = time.monotonic()
    assert first.terminate(30) == 0
    stopped = time.monotonic()
    records: list[dict[str, Any]] = []

    async def new_owner_called() -> bool:
        records[:] = await sim.requests()
        return any(caller_pid(r["user_agent"]) == second.popen.pid for r in records)

    await wait_until(new_owner_called, "the new owner's first call", 20)
    mine = sorted((r for r in records if caller_pid(r["user_agent"]) == second.popen.pid),
                  key=lambda r: r["started"])
    last_old = max(r["finished"] for r in records
                   if caller_pid(r["user_agent"]) == first.popen.pid)
    gap = mine[0]["started"] - stopped
    line = (f"clean hand-over: the old owner exited {stopped - asked:.1f} s after SIGTERM; the "
            f"new owner's first call {gap * 1000:.0f} ms after that (the old one's last call "
            f"had ended {(stopped - last_old) * 1000:.0f} ms before it exited); request "
            f"timeout 10 s")
    print(line)
    assert stopped - asked < 5, line  # nothing waits out the shutdown grace (20 s)
    assert gap <= 1.0, line
    assert mine[0]["started"] >= last_old, line
    assert "clean hand-over" in second.output(), line


@pytest.mark.timeout(180)
async def test_after_a_kill_during_a_slow_call_the_next_owner_waits_out_the_timeout(
        harness: Harness) -> None:
    """kill -9 of the owner while a slow call is open: the standby's first call starts no
    sooner than that call's start plus the request timeout (it may still be open)."""
    timeout_s = 4.0
    sim = await harness.setup([type_("a", 1, 5, request_timeout_seconds=timeout_s)])
    first = await harness.start_service()
    await harness.read_signals()
    slow = iccid(42)
    await sim.fault(slow, latency_s=3.0)
    warm = make_event(iccid(41), "Type A")
    await harness.publish([warm])
    await harness.wait_final([warm["event_id"]], 30)
    second = await harness.start_service()
    await harness.publish([make_event(slow, "Type A")]
                          + [make_event(iccid(100 + n), "Type A") for n in range(5)])

    async def slow_call_open() -> bool:
        return any(r["iccid"] == slow for r in await sim.requests())

    await wait_until(slow_call_open, "the slow call to start", 30, 0.01)
    first.kill9()
    killed = time.monotonic()
    records: list[dict[str, Any]] = []

    async def standby_called() -> bool:
        records[:] = await sim.requests()
        return any(caller_pid(r["user_agent"]) == second.popen.pid for r in records)

    await wait_until(standby_called, "the standby's first call", 30)
    open_call = next(r for r in records if r["iccid"] == slow
                     and caller_pid(r["user_agent"]) == first.popen.pid)
    new_first = min(r["started"] for r in records
                    if caller_pid(r["user_agent"]) == second.popen.pid)
    line = (f"crash take-over: the standby's first call {new_first - open_call['started']:.2f} s "
            f"after the killed owner's open call started ({new_first - killed:.2f} s after the "
            f"kill); request timeout {timeout_s:.0f} s")
    print(line)
    assert new_first >= open_call["started"] + timeout_s, line
    assert "did not let go cleanly" in second.output(), line
