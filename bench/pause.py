"""A paused type with N jobs waiting: how soon each gets its ``jasper.delayed`` signal.

The pause's promise (operator guide, section 4): every waiting job gets one delayed signal
within 5 s of the pause, however many wait (10,000 at least) and at the default limits (one
call at a time, 1 call/s). One type at those limits; the simulator's account expects
another key than the service's config gives, so every call is answered 401 ``10000001``
and the first one pauses the type.

A round: the bench first takes the work queue's single-active-consumer place with a token
of its own (prefetch 1, so it is given nothing else); ``N`` events are published to
``<prefix>.events`` and the service started; once stage 1 has forwarded all ``N`` to the
work queue (commissions, interactive) or to the bulk queue (decommissions, the bulk lane:
``lanes.bulk_commands``), the bench gives up its place (cancel, then ack its token) and
the service's worker owns the type with ``N`` jobs waiting. After the owner's wait
(``1 / rps`` + the request timeout, 2 s here) its first call is answered 401: the pause,
timed by the simulator's own record of that request (``time.monotonic``, one clock for every process
on the host). Every delayed signal is timed when it reaches the bench on
``<prefix>.history``; lag = that - the pause. Reported: p50 and max (the last one) of the
lags, the time from the first delayed signal to the last, and whether every job got
exactly one (none missing, none twice, no final signal) within a wait bounded by
``_WAIT_S`` plus 2 s more to catch late duplicates. In the raw results also: delayed
signals per second, and the service's and the broker's CPU ms per job from the owner's
start to the last delayed signal (the 3 s wait included).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import time
from typing import Any

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from . import common as c

PAUSED = "Bench Paused"
WRONG_KEY = "not-the-service-key"  # the simulator's account key: every call gets 401
TARGET_S = 5.0
_WAIT_S = 120.0  # for every job's delayed signal, after the pause
_AFTER_S = 2.0  # then this much longer, for a second signal of any job


class _Plug:
    """The bench as the work queue's active consumer, holding one token of its own."""

    def __init__(self, channel: AbstractChannel, queue: AbstractQueue) -> None:
        self._channel = channel
        self._queue = queue
        self._tag: str | None = None
        self._held: asyncio.Future[AbstractIncomingMessage] = (
            asyncio.get_running_loop().create_future())

    @classmethod
    async def hold(cls, conn: AbstractRobustConnection, queue_name: str) -> _Plug:
        await c.preload(conn, [b"bench token"], routing_key=queue_name)
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=1)
        plug = cls(channel, await channel.get_queue(queue_name, ensure=False))
        plug._tag = await plug._queue.consume(plug._on_message)
        await asyncio.wait_for(asyncio.shield(plug._held), 10)
        return plug

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if not self._held.done():
            self._held.set_result(message)

    async def release(self) -> None:
        """Cancel first (the next consumer becomes active), then ack the token: it never
        reaches the service."""
        if self._tag is not None:
            await self._queue.cancel(self._tag)
            self._tag = None
        await (await self._held).ack()
        await self.close()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._channel.close()


async def _ready(conn: AbstractRobustConnection, queue: str, n: int) -> bool:
    return (await c.queue_state(conn, queue))[0] >= n


DECOMMISSION_CODE = 65517  # the bench config's deactivate: a bulk job by default


async def pause_round(conn: AbstractRobustConnection, sim: c.Sim, n: int, *,
                      bulk: bool = False) -> dict[str, Any]:
    """One round with ``n`` jobs waiting: commissions in the work queue, or (``bulk``)
    decommissions in the bulk queue."""
    topo = c.Topo()
    user = c.account_name(PAUSED)
    await sim.reset()
    await sim.account(user, max_in_flight=1, rps=1, api_key=WRONG_KEY)
    raw = topo.config([c.comm_type(PAUSED, sim.base_url, max_concurrency=1, rps=1)])
    work = topo.work_queue(c.slug(PAUSED))
    parked = f"{topo.tag}.parked.{c.slug(PAUSED)}"
    waiting = f"{topo.tag}.bulk.{c.slug(PAUSED)}" if bulk else work
    events = [c.event(c.iccid(i, 5), PAUSED) for i in range(n)]
    if bulk:
        for e in events:
            e["event_code"] = DECOMMISSION_CODE
    ids = {e["event_id"] for e in events}
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(c.delete_topology, conn, topo, [PAUSED])
        channel = await conn.channel()
        await c.declare_service_topology(channel, raw)
        await channel.close()
        drain = c.Drain(conn, topo.history_queue, parse=True)
        await drain.start()
        stack.push_async_callback(drain.close)
        plug = await _Plug.hold(conn, work)
        stack.push_async_callback(plug.close)
        await c.preload(conn, [json.dumps(e).encode() for e in events],
                        exchange=topo.events_exchange, routing_key=f"event.{c.EVENT_CODE}")
        async with c.service(raw) as proc:
            started = time.monotonic()
            await c.wait_until(lambda: _ready(conn, waiting, n),
                               f"stage 1 to forward {n:,} events", 120, 0.1)
            routed_s = time.monotonic() - started
            pids = {"service": proc.pid, "broker": c.broker_pid()}
            cpu_before = {k: c.cpu_s(pid) for k, pid in pids.items() if pid is not None}
            await plug.release()
            released = time.monotonic()

            def delayed() -> int:
                return sum(1 for b in drain.bodies if b.get("outcome") == "delayed")

            with contextlib.suppress(TimeoutError):  # measured and reported below
                await c.wait_until(lambda: delayed() >= n, f"{n:,} delayed signals",
                                   _WAIT_S, 0.05)
            cpu = {f"{k}_cpu_ms_per_job": (c.cpu_s(pid) - cpu_before[k]) * 1000 / n
                   for k, pid in pids.items() if pid is not None}
            await c.sleep_checked(proc, _AFTER_S)
            records = await sim.requests()
            parked_left = (await c.queue_state(conn, parked))[0]
    return {**_measure(n, ids, drain.bodies, records, routed_s=routed_s, released=released,
                       parked_left=parked_left), **cpu, "lane": "bulk" if bulk else "work"}


def _measure(n: int, ids: set[str], signals: list[dict[str, Any]],
             records: list[dict[str, Any]], *, routed_s: float, released: float,
             parked_left: int) -> dict[str, Any]:
    calls = [r for r in records if r["account"] == c.account_name(PAUSED)]
    answers_401 = sorted(r["started"] for r in calls if r["http_status"] == 401)
    paused = answers_401[0] if answers_401 else float("nan")
    delayed = [s for s in signals if s.get("outcome") == "delayed" and s["event_id"] in ids]
    per_job = collections.Counter(s["event_id"] for s in delayed)
    at = sorted(s["_received"] for s in delayed)
    lags = [t - paused for t in at]
    finals = sum(1 for s in signals if s.get("outcome") in ("succeeded", "failed"))
    codes = collections.Counter(str((s.get("error") or {}).get("code")) for s in delayed)
    return {
        "n": n,
        "routed_s": routed_s,
        "owner_to_pause_s": paused - released,
        "puts": sum(1 for r in calls if r["method"] == "PUT"),
        "echo_probes": sum(1 for r in calls if "/echo/" in r["path"]),
        "delayed_signals": len(delayed),
        "jobs_with_one": sum(1 for count in per_job.values() if count == 1),
        "jobs_with_more": sum(1 for count in per_job.values() if count > 1),
        "jobs_missing": len(ids - per_job.keys()),
        "final_signals": finals,
        "error_codes": dict(codes),
        "lag_p50_s": c.percentile(lags, 50),
        "lag_max_s": max(lags) if lags else float("nan"),
        "first_to_last_delayed_s": (at[-1] - at[0]) if at else float("nan"),
        "first_delayed_after_pause_s": lags[0] if lags else float("nan"),
        "delayed_per_s": (len(at) - 1) / (at[-1] - at[0]) if len(at) > 1 else float("nan"),
        "within_target": sum(1 for lag in lags if lag <= TARGET_S),
        "parked_left": parked_left,
    }


async def run_pause(conn: AbstractRobustConnection, sim: c.Sim, *, sizes: tuple[int, ...],
                    bulk_sizes: tuple[int, ...] = (), rounds: int = 1) -> dict[str, Any]:
    """Commissions (work queue) for each of ``sizes``, then decommissions (bulk queue) for
    each of ``bulk_sizes``; results under ``n_<N>`` and ``bulk_<N>``."""
    out: dict[str, Any] = {"target_s": TARGET_S, "sizes": list(sizes),
                           "bulk_sizes": list(bulk_sizes), "rounds": rounds}
    plan = [(n, False) for n in sizes] + [(n, True) for n in bulk_sizes]
    for n, bulk in plan:
        runs = []
        what = "decommissions (bulk)" if bulk else "commissions"
        for _ in range(rounds):
            r = await pause_round(conn, sim, n, bulk=bulk)
            runs.append(r)
            c.log(f"pause: {n:,} {what} waiting: delayed p50 {r['lag_p50_s']:.2f} s, last "
                  f"{r['lag_max_s']:.2f} s after the pause; {r['jobs_with_one']:,} with one, "
                  f"{r['jobs_with_more']} with more, {r['jobs_missing']} missing; "
                  f"{r['delayed_per_s']:.0f} delayed/s, service "
                  f"{r.get('service_cpu_ms_per_job', math.nan):.3f} CPU ms/job")
        out[f"bulk_{n}" if bulk else f"n_{n}"] = {
            "n": n, "lane": "bulk" if bulk else "work", "runs": runs,
            "lag_p50_s": c.median([r["lag_p50_s"] for r in runs]),
            "lag_max_s": max(r["lag_max_s"] for r in runs),
            "delayed_per_s": c.median([r["delayed_per_s"] for r in runs]),
            "exactly_one": all(r["jobs_with_one"] == n and r["final_signals"] == 0
                               for r in runs),
        }
    return out
