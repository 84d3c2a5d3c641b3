"""Publish-to-signal latency: isolation under another type's outage, and idle overhead.

Latency of one event = when its final signal reached the bench's consumer on
``<prefix>.history`` - when the bench began publishing it to ``patriot.events``, both on
the bench's clock. It includes every broker hop (events queue, work queue, history
queue, each with a publisher confirm) as well as the service.

* **isolation**: type *Down* has a backlog of 10,000 events and its account is down
  (the simulator drops every connection); once stage 1 has forwarded that backlog, a
  healthy type (``max_concurrency`` 1, 5 calls/s) gets one event every ``interval_s``.
  Its latencies are what a commission on another type waits while *Down* retries,
  pauses and sends its delayed signals.
* **idle**: one type, one event a second, nothing else running. Overhead = latency -
  the time the simulator spent on the event's PUT (its own record of start and end).

In both, a warm-up (one event of the healthy type; the idle type's ``warmup`` events) goes
through and its signal is awaited before the measured events are published: a process
that becomes a type's owner waits ``1 / rps`` + the request timeout before its first call
(operator guide, section 13), and that start-up wait is not what these scenarios measure.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aio_pika.abc import AbstractRobustConnection

from . import common as c

DOWN, HEALTHY, IDLE = "Bench Down", "Bench Healthy", "Bench Idle"
_FINAL = ("succeeded", "failed")


async def _publish_paced(conn: AbstractRobustConnection, topo: c.Topo, name: str, count: int,
                         interval_s: float, series: int, proc: c.Proc) -> dict[str, float]:
    """Publish ``count`` events ``interval_s`` apart; their event ids → publish start."""
    sent: dict[str, float] = {}
    channel = await conn.channel(publisher_confirms=True)
    try:
        exchange = await channel.get_exchange(topo.events_exchange, ensure=False)
        next_at = time.monotonic()
        for n in range(count):
            proc.check()
            body = c.event(c.iccid(n, series), name)
            sent[body["event_id"]] = time.monotonic()
            await exchange.publish(c.message(json.dumps(body).encode(), body["event_id"]),
                                   f"event.{c.EVENT_CODE}")
            next_at += interval_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    finally:
        await channel.close()
    return sent


def _latencies_ms(drain: c.Drain, sent: dict[str, float]) -> dict[str, float]:
    return {b["event_id"]: 1000 * (b["_received"] - sent[b["event_id"]])
            for b in drain.bodies if b["event_id"] in sent}


def _final_of(name: str) -> Any:
    def accept(signal: dict[str, Any]) -> bool:
        return bool(signal.get("communicator_type") == name and signal.get("outcome") in _FINAL)
    return accept


async def run_isolation(conn: AbstractRobustConnection, sim: c.Sim, *, backlog: int,
                        events: int, interval_s: float) -> dict[str, Any]:
    topo = c.Topo()
    names = [DOWN, HEALTHY]
    await sim.reset()
    await sim.account(c.account_name(DOWN), max_in_flight=1, rps=5, down="refuse")
    await sim.account(c.account_name(HEALTHY), max_in_flight=1, rps=5)
    raw = topo.config([c.comm_type(n, sim.base_url, max_concurrency=1, rps=5) for n in names])
    try:
        channel = await conn.channel()
        await c.declare_service_topology(channel, raw)
        await channel.close()
        drain = c.Drain(conn, topo.history_queue, parse=True, accept=_final_of(HEALTHY))
        await drain.start()
        await c.preload(conn, c.event_bodies(backlog, DOWN, series=1),
                        exchange=topo.events_exchange, routing_key=f"event.{c.EVENT_CODE}")
        async with c.service(raw) as proc:
            started = time.monotonic()
            await c.wait_until(lambda: _routed(conn, topo), "stage 1 to forward the backlog",
                               120, 0.1)
            routed_s = time.monotonic() - started
            await _publish_paced(conn, topo, HEALTHY, 1, 0.0, 4, proc)  # the owner's wait
            await drain.wait_count(1, 30)
            await asyncio.sleep(1.0)  # past the limiter's spacing after the warm-up's call
            sent = await _publish_paced(conn, topo, HEALTHY, events, interval_s, 2, proc)
            await drain.wait_count(1 + events, 60)
            down_left = (await c.queue_state(conn, topo.work_queue(c.slug(DOWN))))[0]
        await drain.close()
    finally:
        await c.delete_topology(conn, topo, names)
    latencies = list(_latencies_ms(drain, sent).values())
    outcomes = [b["outcome"] for b in drain.bodies]
    return {"backlog": backlog, "events": events, "interval_s": interval_s,
            "backlog_routed_s": routed_s, "down_backlog_left_in_queue": down_left,
            "succeeded": outcomes.count("succeeded"),
            "p50_ms": c.percentile(latencies, 50), "p99_ms": c.percentile(latencies, 99),
            "max_ms": max(latencies)}


async def _routed(conn: AbstractRobustConnection, topo: c.Topo) -> bool:
    return (await c.queue_state(conn, topo.events_queue))[0] == 0


async def run_idle(conn: AbstractRobustConnection, sim: c.Sim, *, events: int,
                   interval_s: float = 1.0, warmup: int = 2) -> dict[str, Any]:
    topo = c.Topo()
    await sim.reset()
    await sim.account(c.account_name(IDLE), max_in_flight=1, rps=5)
    raw = topo.config([c.comm_type(IDLE, sim.base_url, max_concurrency=1, rps=5)])
    try:
        channel = await conn.channel()
        await c.declare_service_topology(channel, raw)
        await channel.close()
        drain = c.Drain(conn, topo.history_queue, parse=True, accept=_final_of(IDLE))
        await drain.start()
        async with c.service(raw) as proc:
            await c.wait_consumers(conn, [topo.events_queue, topo.work_queue(c.slug(IDLE))])
            await _publish_paced(conn, topo, IDLE, warmup, interval_s, 4, proc)
            await drain.wait_count(warmup, 30)  # past the new owner's wait (see module doc)
            # The warm-up's calls came right after the owner's wait, 1/rps apart: let the
            # limiter's spacing pass, or the first measured event waits for it (202 ms).
            await asyncio.sleep(interval_s)
            sent = await _publish_paced(conn, topo, IDLE, events, interval_s, 3, proc)
            await drain.wait_count(warmup + events, 30)
        await drain.close()
        records = await sim.requests()
    finally:
        await c.delete_topology(conn, topo, [IDLE])
    sim_ms = {r["iccid"]: 1000 * (r["finished"] - r["started"])
              for r in records if r["method"] == "PUT"}
    by_event = {b["event_id"]: b for b in drain.bodies}
    measured = sorted(sent, key=sent.__getitem__)
    latency = _latencies_ms(drain, sent)
    total = [latency[e] for e in measured]
    overhead = [latency[e] - sim_ms[by_event[e]["iccid"]] for e in measured]
    return {"events": events, "warmup": warmup, "interval_s": interval_s,
            "latency_p50_ms": c.percentile(total, 50), "latency_p99_ms": c.percentile(total, 99),
            "sim_p50_ms": c.percentile([sim_ms[by_event[e]["iccid"]] for e in measured], 50),
            "overhead_p50_ms": c.percentile(overhead, 50),
            "overhead_p99_ms": c.percentile(overhead, 99),
            "overhead_max_ms": max(overhead)}
