"""Rate fidelity: every communicator type at its account's limit, never over it.

Each type is configured with ``max_concurrency: 1`` and ``requests_per_second`` R, and
its simulator account enforces the same limits (one call at a time, at most
``floor(R)`` starts in any one-second window; every call over them is a violation,
answered ``40000029``). Each type gets a backlog big enough to keep it busy for the
whole run; once stage 1 has forwarded it and every type has made its first call (a new
owner waits ``1/R`` + the request timeout first), the bench waits ``settle_s``, opens
a window of ``duration_s`` and counts, from the simulator's own request records, the
calls each account saw start inside the window. achieved/configured = (calls /
duration_s) / R. The service's limiter spaces starts ``1/R x 1.01`` apart, so 0.99 is
the most it can show.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

from aio_pika.abc import AbstractRobustConnection

from . import common as c

_MARGIN_S = 30.0  # backlog beyond the window: routing time, start-up, stop


async def run_rate(conn: AbstractRobustConnection, sim: c.Sim, *, types: int, rps: float,
                   duration_s: float, settle_s: float = 1.0) -> dict[str, Any]:
    topo = c.Topo()
    names = [f"Bench Rate {i:02d}" for i in range(types)]
    await sim.reset()
    for name in names:
        await sim.account(c.account_name(name), max_in_flight=1, rps=rps)
    raw = topo.config([c.comm_type(n, sim.base_url, max_concurrency=1, rps=rps)
                       for n in names])
    per_type = int(rps * (duration_s + _MARGIN_S))
    by_type = [c.event_bodies(per_type, n, series=i) for i, n in enumerate(names)]
    bodies = [b for group in zip(*by_type, strict=True) for b in group]  # round robin
    try:
        channel = await conn.channel()
        await c.declare_service_topology(channel, raw)
        await channel.close()
        await c.preload(conn, bodies, exchange=topo.events_exchange,
                        routing_key=f"event.{c.EVENT_CODE}")
        async with c.service(raw) as proc:
            service_start = time.monotonic()
            await c.wait_until(lambda: _routed(conn, topo), "stage 1 to forward the backlog",
                               60, 0.1)
            routed_s = time.monotonic() - service_start
            await c.first_calls(sim, names, 30)
            await c.sleep_checked(proc, settle_s)
            window_start = time.monotonic()
            await c.sleep_checked(proc, duration_s)
            window_end = time.monotonic()
            left = [(await c.queue_state(conn, topo.work_queue(c.slug(n))))[0] for n in names]
        stats = await sim.stats()
        records = await sim.requests()
    finally:
        await c.delete_topology(conn, topo, names)
    summary = _summary(names, records, stats, rps, window_start, window_end)
    over = sorted(r["started"] - window_start for r in records
                  if r["error_code"] == "40000029")
    # A call the simulator rejects within a second of its own stall may have been stamped
    # late by the simulator rather than sent early by the service.
    stalls = sim.stalls(window_start - 2, window_end)
    after_stall = sum(1 for t in over
                      if any(w - ms / 1000 <= window_start + t <= w + 1.0 for w, ms in stalls))
    return {**summary, "backlog_routed_s": routed_s, "work_queue_left_min": min(left),
            "violations_in_window": sum(1 for t in over if 0 <= t < window_end - window_start),
            "violation_times_s": [round(t, 3) for t in over[:50]],
            "violations_after_simulator_stall": after_stall,
            "simulator_stalls": len(stalls),
            "simulator_stall_max_ms": max((ms for _, ms in stalls), default=0.0),
            "service_started_s": round(service_start - window_start, 3)}


async def _routed(conn: AbstractRobustConnection, topo: c.Topo) -> bool:
    return (await c.queue_state(conn, topo.events_queue))[0] == 0


def _summary(names: list[str], records: list[dict[str, Any]], stats: dict[str, Any],
             rps: float, start: float, end: float) -> dict[str, Any]:
    duration = end - start
    ratios: list[float] = []
    min_gap_ms = float("inf")
    # The simulator allows `allowed` starts in any window of `allowed / rps` seconds, so
    # the tightest span of allowed + 1 consecutive starts is the run's margin to a violation.
    allowed = max(1, math.floor(rps))
    tightest_ms = float("inf")
    rate_limited = 0
    busy_to_end = True
    for name in names:
        user = c.account_name(name)
        mine = [r for r in records if r["account"] == user and r["method"] == "PUT"]
        rate_limited += sum(1 for r in mine if r["error_code"] == "40000029")
        starts = sorted(r["started"] for r in mine)
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        if gaps:
            min_gap_ms = min(min_gap_ms, 1000 * min(gaps))
        spans = [b - a for a, b in zip(starts, starts[allowed:], strict=False)]
        if spans:
            tightest_ms = min(tightest_ms, 1000 * min(spans))
        inside = sum(1 for s in starts if start <= s < end)
        busy_to_end = busy_to_end and bool(starts) and starts[-1] >= end - 2 / rps
        ratios.append(inside / duration / rps)
    return {
        "types": len(names), "rps": rps, "window_s": round(duration, 2),
        "achieved_ratio_min": min(ratios), "achieved_ratio_median": c.median(ratios),
        "achieved_ratio_max": max(ratios), "ratios": ratios,
        "violations": stats["violations"], "rate_limited_answers": rate_limited,
        "min_gap_between_starts_ms": min_gap_ms, "busy_to_the_end": busy_to_end,
        "tightest_span_ms": tightest_ms, "span_limit_ms": 1000 * allowed / rps,
        "span_calls": allowed + 1,
        "calls": sum(1 for r in records if r["method"] == "PUT"),
    }
