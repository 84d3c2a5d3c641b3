"""Failover between two service processes on the real broker (operator guide, section 13; issue 10).

Two processes consume the same single-active-consumer queues: one is active for every
communicator type, the other stands by. Killing the active one with ``kill -9`` in the
middle of a steady stream must hand every type to the standby within 10 s, lose no
event, and never let the two processes call one account at overlapping times. Who
called is read from the simulator's request log: each request's User-Agent names the
process (``jasper-consumer/<version> (<host> pid <pid>)``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from .conftest import Harness, caller_pid, iccid, make_event, publish_paced, type_, wait_until

TYPES = "ab"
EVENTS = 300
RATE_PER_S = 20.0  # events published per second, over both types
KILL_AFTER_FINALS = 120  # of EVENTS: the middle of the stream
TAKEOVER_BOUND_S = 10.0
MAX_CONCURRENCY = 1
REQUESTS_PER_SECOND = 20.0
REQUEST_TIMEOUT_S = 1.0
SLOW_CALL_S = 0.2  # every 10th SIM answers this late, so calls are in flight at the kill


def calls_by_pid(records: list[dict[str, Any]], account: str) -> dict[int | None, list[Any]]:
    """The account's requests grouped by the pid that made them, each group by start."""
    groups: dict[int | None, list[Any]] = {}
    for r in sorted((r for r in records if r["account"] == account), key=lambda r: r["started"]):
        groups.setdefault(caller_pid(r["user_agent"]), []).append(r)
    return groups


@pytest.mark.timeout(180)
async def test_standby_takes_over_every_type_after_kill9(harness: Harness) -> None:
    """kill -9 of the active process mid-stream: the standby owns every type within 10 s, 0 lost."""
    sim = await harness.setup(
        [type_(x, MAX_CONCURRENCY, REQUESTS_PER_SECOND, request_timeout_seconds=REQUEST_TIMEOUT_S)
         for x in TYPES])
    first = await harness.start_service()
    second = await harness.start_service()
    pids = {first.popen.pid, second.popen.pid}
    await harness.read_signals()
    for n in range(0, EVENTS, 10):
        await sim.fault(iccid(n), latency_s=SLOW_CALL_S)
    events = [make_event(iccid(n), f"Type {TYPES[n % len(TYPES)].upper()}")
              for n in range(EVENTS)]
    ids = [e["event_id"] for e in events]
    publisher = asyncio.create_task(publish_paced(harness, events, RATE_PER_S))

    await wait_until(lambda: sum(1 for e in ids if harness.signals.finals(e)) >= KILL_AFTER_FINALS,
                     f"{KILL_AFTER_FINALS} final signals before the kill", 60, 0.02)
    before = await sim.requests()
    owners = {a: set(calls_by_pid(before, a)) for a in TYPES}
    callers = set().union(*owners.values())
    assert len(callers) == 1, f"one process calls every account before the kill: {owners}"
    victim_pid = callers.pop()
    assert victim_pid in pids, f"the caller {victim_pid} is a service process {pids}"
    victim, standby = (first, second) if first.popen.pid == victim_pid else (second, first)
    signalled_at_kill = sum(1 for e in ids if harness.signals.finals(e))
    victim.kill9()
    killed_at = time.monotonic()

    await publisher
    await harness.wait_final(ids, 90)

    records = await sim.requests()
    stats = await sim.stats()
    takeover: dict[str, float] = {}
    counts: dict[str, tuple[int, int]] = {}
    problems: list[str] = []
    for account in TYPES:
        groups = calls_by_pid(records, account)
        old, new = groups.get(victim_pid, []), groups.get(standby.popen.pid, [])
        strangers = set(groups) - {victim_pid, standby.popen.pid}
        if strangers or not new:
            problems.append(f"account {account}: callers {sorted(groups, key=str)}, "
                            f"{len(new)} calls from the standby")
            continue
        counts[account] = (len(old), len(new))
        first_new = new[0]["started"]
        takeover[account] = first_new - killed_at
        late = [r for r in old if r["started"] >= first_new or r["finished"] > first_new]
        early = [r for r in new if r["started"] < killed_at]
        if late or early:
            problems.append(f"account {account}: {len(late)} calls of the killed process "
                            f"started or ended after the standby's first, {len(early)} standby "
                            f"calls before the kill")

    lost, dup = harness.signals.count(ids)
    line = (f"failover: killed pid {victim_pid} after {KILL_AFTER_FINALS} finals "
            f"({signalled_at_kill} signalled); takeover per type "
            f"{ {f'Type {a.upper()}': round(s, 2) for a, s in takeover.items()} } s; "
            f"calls (killed, standby) per account {counts}; "
            f"published {len(ids)}, lost {lost}, duplicated {dup}; violations "
            f"{stats['violations']}, max in flight {stats['max_in_flight_seen']}")
    print(line)
    assert not problems, f"{line}; {problems}"
    assert all(0 < s <= TAKEOVER_BOUND_S for s in takeover.values()), line
    assert lost == 0, line
    # At least once: a job whose signal was confirmed but not yet acked at the kill is
    # signalled again by the standby; at most the calls under way could be.
    assert dup <= len(TYPES) * MAX_CONCURRENCY, line
    assert stats["violations"] == 0, line
    assert max(stats["max_in_flight_seen"].values()) <= MAX_CONCURRENCY, line
    assert standby.alive, line
