"""Time to live with a backlog: a commission's final signal while thousands of bulk jobs wait.

Issue 15 (operator guide, section 13, Interactive first): with any bulk backlog waiting, a
commission's final signal comes within one call interval (``1 / requests_per_second``) plus
about half a second plus Control Center's answer time; bulk still gets at least
``lanes.bulk_min_share`` of the calls while both lanes wait.

One type at a real account limit: one call at a time, 5 calls/s, and the simulator enforcing
the same limits (answering in about a millisecond). A round: ``N`` decommissions (event
65517, bulk by ``lanes.bulk_commands``, distinct SIMs) are published to ``<prefix>.events``
before the service starts; once stage 1 has forwarded every one of them to the bulk queue
``<prefix>.bulk.<slug>`` (the owner, a first owner ever, has meanwhile begun applying them at
5/s), the timed part begins: ``events`` commissions of distinct SIMs, one every
``interval_s`` on average (each gap drawn from 0.5-1.5 x that), each published with a
confirm to ``<prefix>.events``. Latency = its final signal on ``<prefix>.history`` reaching
the bench - the bench beginning to publish it, on the bench's clock (every broker hop
included). The simulator's record of each commission's PUT gives its answer time. Bulk
share = the simulator's DEACTIVATED calls / all calls that started between the first
commission's publish and the last commission's signal. The bulk queue's ready messages are
read when the routing is done and when the last signal is in: proof that the backlog waited
the whole time.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

from aio_pika.abc import AbstractRobustConnection

from . import common as c

BACKLOGGED = "Bench Backlog"
RPS = 5.0
DECOMMISSION = 65517
SLACK_S = 0.5  # the bound: 1 / rps + this + the simulator's answer time
_FINAL = ("succeeded", "failed")


def bulk_queue(topo: c.Topo, name: str) -> str:
    return f"{topo.tag}.bulk.{c.slug(name)}"


def _decommission_bodies(n: int, series: int) -> list[bytes]:
    out = []
    for i in range(n):
        body = c.event(c.iccid(i, series), BACKLOGGED)
        body["event_code"] = DECOMMISSION
        out.append(json.dumps(body).encode())
    return out


async def _trickle(conn: AbstractRobustConnection, topo: c.Topo, count: int, interval_s: float,
                   series: int, proc: c.Proc, sent: dict[str, tuple[str, float]]) -> None:
    """Publish ``count`` commissions ``interval_s`` apart on average, each confirmed;
    ``sent`` gets event id → (ICCID, when its publish began) before each. The gaps are drawn
    uniformly from 0.5-1.5 x ``interval_s`` (seeded): at a fixed interval the publishes
    would fall on only a few phases of the limiter's 1/rps grid, and the distribution would
    show those phases rather than a technician's random arrival."""
    gaps = random.Random(series * 1000 + count)
    channel = await conn.channel(publisher_confirms=True)
    try:
        exchange = await channel.get_exchange(topo.events_exchange, ensure=False)
        at = time.monotonic()
        for n in range(count):
            if n:
                at += interval_s * gaps.uniform(0.5, 1.5)
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            proc.check()
            body = c.event(c.iccid(n, series), BACKLOGGED)
            sent[body["event_id"]] = (body["device"]["ref_no"], time.monotonic())
            await exchange.publish(c.message(json.dumps(body).encode(), body["event_id"]),
                                   f"event.{c.EVENT_CODE}")
    finally:
        await channel.close()


async def backlog_round(conn: AbstractRobustConnection, sim: c.Sim, *, backlog: int,
                        events: int, interval_s: float) -> dict[str, Any]:
    topo = c.Topo()
    user = c.account_name(BACKLOGGED)
    await sim.reset()
    await sim.account(user, max_in_flight=1, rps=RPS)
    raw = topo.config([c.comm_type(BACKLOGGED, sim.base_url, max_concurrency=1, rps=RPS)])
    bulk = bulk_queue(topo, BACKLOGGED)
    sent: dict[str, tuple[str, float]] = {}
    try:
        channel = await conn.channel()
        await c.declare_service_topology(channel, raw)
        await channel.close()

        def accept(signal: dict[str, Any]) -> bool:
            return signal.get("event_id") in sent and signal.get("outcome") in _FINAL

        drain = c.Drain(conn, topo.history_queue, parse=True, accept=accept)
        await drain.start()
        preload_s = await c.preload(conn, _decommission_bodies(backlog, series=6),
                                    exchange=topo.events_exchange,
                                    routing_key=f"event.{DECOMMISSION}")
        async with c.service(raw) as proc:
            started = time.monotonic()

            async def routed() -> bool:
                return (await c.queue_state(conn, topo.events_queue))[0] == 0

            await c.wait_until(routed, f"stage 1 to forward {backlog:,} decommissions", 120,
                               0.1)
            await c.sleep_checked(proc, 0.5)  # the router's last confirms and acks
            routed_s = time.monotonic() - started
            waiting_at_start = (await c.queue_state(conn, bulk))[0]
            window_start = time.monotonic()
            await _trickle(conn, topo, events, interval_s, 7, proc, sent)
            await drain.wait_count(events, 30)
            window_end = time.monotonic()
            waiting_at_end = (await c.queue_state(conn, bulk))[0]
            records = await sim.requests(since=started - 1)
            violations = (await sim.stats())["violations"]
            stalls = sim.stalls(started - 2, window_end)
        await drain.close()
    finally:
        await c.delete_topology(conn, topo, [BACKLOGGED])
    return _measure(backlog, events, interval_s, sent, drain.bodies, records,
                    window=(window_start, window_end), preload_s=preload_s,
                    routed_s=routed_s, waiting_at_start=waiting_at_start,
                    waiting_at_end=waiting_at_end, violations=violations, stalls=stalls)


def _measure(backlog: int, events: int, interval_s: float, sent: dict[str, tuple[str, float]],
             signals: list[dict[str, Any]], records: list[dict[str, Any]], *,
             window: tuple[float, float], preload_s: float, routed_s: float,
             waiting_at_start: int, waiting_at_end: int, violations: int,
             stalls: list[tuple[float, float]]) -> dict[str, Any]:
    user = c.account_name(BACKLOGGED)
    mine = [r for r in records if r["account"] == user]
    admitted = sorted(r["started"] for r in mine if r["violation"] is None)
    rejected = []
    for r in sorted((r for r in mine if r["violation"]), key=lambda r: r["started"]):
        before = [t for t in admitted if t < r["started"]][-5:]
        rejected.append({
            "kind": r["violation"], "requested_status": r["requested_status"],
            "in_window": window[0] <= r["started"] <= window[1],
            # a violation needs 5 admitted starts within the second before it
            "span_of_last_5_starts_ms": round(1000 * (r["started"] - before[0]), 1)
            if len(before) == 5 else None,
            "gap_to_previous_start_ms": round(1000 * (r["started"] - before[-1]), 1)
            if before else None,
            "within_1_s_after_simulator_stall": any(
                w - ms / 1000 <= r["started"] <= w + 1.0 for w, ms in stalls)})
    puts = [r for r in records if r["account"] == user and r["method"] == "PUT"]
    answer_ms = {r["iccid"]: 1000 * (r["finished"] - r["started"]) for r in puts
                 if r["requested_status"] == "ACTIVATED"}
    first: dict[str, dict[str, Any]] = {}
    for s in signals:
        first.setdefault(s["event_id"], s)
    latency: dict[str, float] = {}
    within = 0
    for event_id, s in first.items():
        sim_id, at = sent[event_id]
        latency[event_id] = 1000 * (s["_received"] - at)
        bound_ms = 1000 / RPS + 1000 * SLACK_S + answer_ms.get(sim_id, 0.0)
        within += latency[event_id] <= bound_ms
    values = list(latency.values())
    in_window = [r for r in puts if window[0] <= r["started"] <= window[1]]
    bulk_calls = sum(1 for r in in_window if r["requested_status"] == "DEACTIVATED")
    answers = list(answer_ms.values())
    answer_p99 = c.percentile(answers, 99)
    return {
        "backlog": backlog, "events": events, "interval_s": interval_s, "rps": RPS,
        "preload_s": preload_s, "routed_s": routed_s,
        "bulk_waiting_at_start": waiting_at_start, "bulk_waiting_at_end": waiting_at_end,
        "signals": len(first), "succeeded": sum(1 for s in first.values()
                                                if s["outcome"] == "succeeded"),
        "p50_ms": c.percentile(values, 50), "p99_ms": c.percentile(values, 99),
        "max_ms": max(values) if values else float("nan"),
        "answer_p50_ms": c.percentile(answers, 50), "answer_p99_ms": answer_p99,
        "bound_p99_ms": 1000 / RPS + 1000 * SLACK_S + answer_p99,
        "within_own_bound": within,
        "window_s": window[1] - window[0],
        "calls_in_window": len(in_window), "bulk_calls_in_window": bulk_calls,
        "bulk_share": bulk_calls / len(in_window) if in_window else float("nan"),
        "calls_per_s_in_window": len(in_window) / (window[1] - window[0]),
        "violations": violations, "violation_details": rejected,
        "simulator_stall_max_ms": max((ms for _, ms in stalls), default=0.0),
        "latencies_ms": [round(v, 1) for v in values],
    }


async def run_backlog(conn: AbstractRobustConnection, sim: c.Sim, *, sizes: tuple[int, ...],
                      events: int, interval_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {"sizes": list(sizes), "rps": RPS, "slack_s": SLACK_S,
                           "min_share": 0.1}
    for n in sizes:
        r = await backlog_round(conn, sim, backlog=n, events=events, interval_s=interval_s)
        out[f"n_{n}"] = r
        c.log(f"backlog: {n:,} bulk waiting: commission → final p50 {r['p50_ms']:.0f} / p99 "
              f"{r['p99_ms']:.0f} / max {r['max_ms']:.0f} ms (bound {r['bound_p99_ms']:.0f} "
              f"ms; {r['within_own_bound']} of {r['signals']} within their own); bulk share "
              f"{r['bulk_share']:.0%} of {r['calls_in_window']} calls "
              f"({r['calls_per_s_in_window']:.2f}/s); bulk waiting {r['bulk_waiting_at_start']:,}"
              f" → {r['bulk_waiting_at_end']:,}; {r['violations']} violations")
    return out
