"""Memory: the service's RSS while it drains a 100,000-event backlog, and as events pile up.

A backlog of ``backlog`` events waits on ``<prefix>.events`` before the service starts
(one type, limits raised out of the way, simulator at 0 ms), so the service drains it
as fast as it can: stage 1 moves it to the work queue, stage 2 applies it. While it
runs, the bench reads ``/proc/<pid>/status`` (VmRSS, VmHWM) and the service's own
``jasper_commands_total`` (from ``/metrics``) every ``sample_s``; if the backlog gets
low before ``target`` events are done, it publishes more. It stops at ``target`` events
or when its time budget runs out, whichever comes first, and reports the peak (VmHWM),
the RSS after the first 10,000 events and at the end, and the slope of RSS over events
processed from 10,000 on (least squares), so growth can be judged over any count.

Signals go to a capped classic queue (``x-max-length``) instead of the quorum history
queue, so the broker does not have to keep 200,000 of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from typing import Any

import aiohttp
from aio_pika.abc import AbstractRobustConnection

from . import common as c

NAME = "Bench Memory"
_CHUNK = 20_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((c.HOST, 0))
        return int(s.getsockname()[1])


async def _processed(session: aiohttp.ClientSession, url: str) -> int | None:
    """Final outcomes so far, from the service's ``jasper_commands_total``."""
    try:
        async with session.get(url) as resp:
            text = await resp.text()
    except (aiohttp.ClientError, OSError):
        return None
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("jasper_commands_total{")))


def _slope_kib_per_10k(points: list[tuple[int, int]]) -> float:
    if len(points) < 3:
        return float("nan")
    n = len(points)
    mx = sum(p for p, _ in points) / n
    my = sum(r for _, r in points) / n
    sxx = sum((p - mx) ** 2 for p, _ in points)
    sxy = sum((p - mx) * (r - my) for p, r in points)
    return 10_000 * sxy / sxx if sxx else float("nan")


async def run_memory(conn: AbstractRobustConnection, sim: c.Sim, *, backlog: int, target: int,
                     budget_s: float, sample_s: float = 0.25) -> dict[str, Any]:
    topo = c.Topo()
    sink = f"{topo.tag}.sink"
    topo.extra_queues.append(sink)
    await sim.reset()
    await sim.account(c.account_name(NAME), max_in_flight=10_000, rps=1_000_000)
    port = _free_port()
    raw = topo.config([c.comm_type(NAME, sim.base_url, max_concurrency=64, rps=1000)],
                      http_port=port, history_queue=False)
    samples: list[dict[str, float]] = []
    published = 0
    try:
        channel = await conn.channel()
        await c.declare_service_topology(channel, raw)
        # Durable: RabbitMQ 4.3 refuses transient queues that are not exclusive.
        queue = await channel.declare_queue(sink, durable=True,
                                            arguments={"x-max-length": 1000})
        await queue.bind(topo.history_exchange, "jasper.#")
        await channel.close()
        started = time.monotonic()
        chunks = (_chunk(i, min(_CHUNK, backlog - i)) for i in range(0, backlog, _CHUNK))
        for bodies in chunks:
            await c.preload(conn, bodies, exchange=topo.events_exchange,
                            routing_key=f"event.{c.EVENT_CODE}")
            published += len(bodies)
        preload_s = time.monotonic() - started
        deadline = time.monotonic() + budget_s - preload_s
        url = f"http://{c.HOST}:{port}/metrics"
        async with c.service(raw) as proc, aiohttp.ClientSession() as session:
            top_up: asyncio.Task[float] | None = None
            t0 = time.monotonic()
            done = 0
            while time.monotonic() < deadline and done < target:
                proc.check()
                rss, hwm = c.rss_kib(proc.pid)
                count = await _processed(session, url)
                if count is not None:
                    done = count
                    samples.append({"t": time.monotonic() - t0, "processed": done,
                                    "rss_kib": rss, "hwm_kib": hwm})
                if (published - done < 2 * _CHUNK and published < target
                        and (top_up is None or top_up.done())):
                    top_up = asyncio.create_task(c.preload(
                        conn, _chunk(published, min(_CHUNK, target - published)),
                        exchange=topo.events_exchange, routing_key=f"event.{c.EVENT_CODE}"))
                    published += min(_CHUNK, target - published)
                await asyncio.sleep(sample_s)
            rss, hwm = c.rss_kib(proc.pid)
            if top_up is not None:
                top_up.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await top_up
            elapsed = time.monotonic() - t0
    finally:
        await c.delete_topology(conn, topo, [NAME])
    return _summary(samples, backlog, target, done, hwm, rss, elapsed, preload_s)


def _mb(kib: float) -> float:
    """KiB (as /proc reports) → MB (10^6 bytes), the unit of the target."""
    return kib * 1024 / 1e6


def _chunk(first: int, count: int) -> list[bytes]:
    return [c.event_bytes(first + n, NAME, series=5) for n in range(count)]


def _summary(samples: list[dict[str, float]], backlog: int, target: int, done: int,
             hwm: int, rss: int, elapsed: float, preload_s: float) -> dict[str, Any]:
    after_10k = next((s for s in samples if s["processed"] >= 10_000), None)
    after_100k = next((s for s in samples if s["processed"] >= 100_000), None)
    tail = [(int(s["processed"]), int(s["rss_kib"])) for s in samples
            if s["processed"] >= 10_000]
    slope = _slope_kib_per_10k(tail)
    return {
        "backlog": backlog, "target": target, "processed": done,
        "elapsed_s": elapsed, "preload_s": preload_s,
        "events_per_s": done / elapsed if elapsed else 0.0,
        "peak_rss_mb": _mb(hwm), "rss_end_mb": _mb(rss),
        "peak_rss_draining_backlog_mb": _mb(max(
            (s["hwm_kib"] for s in samples if s["processed"] <= backlog), default=math.nan)),
        "rss_start_mb": _mb(samples[0]["rss_kib"]) if samples else float("nan"),
        "rss_after_10k_mb": _mb(after_10k["rss_kib"]) if after_10k else float("nan"),
        "rss_after_100k_mb": _mb(after_100k["rss_kib"]) if after_100k else float("nan"),
        "slope_kb_per_10k": slope * 1.024,
        "growth_10k_to_200k_mb_extrapolated": _mb(slope * 19),
        "samples": samples[:: max(1, len(samples) // 200)],
    }
