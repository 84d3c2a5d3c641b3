"""Throughput against a bare aio-pika pipeline, same broker, same run, rounds interleaved.

* **router**: a backlog of events on a quorum queue, drained by stage 1 of the service
  (``<prefix>.events`` → ``<prefix>.work.<type>``) or by ``bench.baseline route``
  (consume → publish with confirm → ack). The bench registers first on the work queue,
  which has a single active consumer, so the service's own worker stays idle and only
  stage 1 runs; the bench counts arrivals there.
* **end to end**: a backlog of events through the whole service (router, worker, one PUT
  to the simulator at 0 ms, signal with confirm), or through ``bench.baseline e2e``
  (consume → PUT → publish result → ack, one stage); the bench counts the results.

Rate = messages between the first and the last arrival / time between them, so process
start-up is not counted. Rounds alternate which pipeline goes first (ABBA…), and the
medians are reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractRobustConnection

from . import common as c

ROUTE_TYPE = "Bench Route"
E2E_TYPE = "Bench E2E"
E2E_CONCURRENCY = 64
_TIMEOUT_S = 120.0


async def _run_service_round(conn: AbstractRobustConnection, raw: dict[str, Any],
                             type_names: list[str], bodies: list[bytes], drain_queue: str,
                             topo: c.Topo, loop: str = "asyncio",
                             package_dir: Path | None = None) -> dict[str, Any]:
    try:
        channel = await conn.channel()
        await c.declare_service_topology(channel, raw)
        await channel.close()
        drain = c.Drain(conn, drain_queue)
        await drain.start()
        await c.preload(conn, bodies, exchange=topo.events_exchange,
                        routing_key=f"event.{c.EVENT_CODE}")
        async with c.service(raw, loop=loop, package_dir=package_dir) as proc:
            cpu = await drain.measure(len(bodies), _TIMEOUT_S,
                                      {"pipeline": proc.pid, "broker": c.broker_pid()})
            proc.check()
        await drain.close()
        return {"events_per_s": drain.rate(), "n": len(bodies), **cpu}
    finally:
        await c.delete_topology(conn, topo, type_names)


async def _run_baseline_round(conn: AbstractRobustConnection, args: list[str],
                              bodies: list[bytes], topo: c.Topo) -> dict[str, Any]:
    src, dst = f"{topo.tag}.src", f"{topo.tag}.dst"
    topo.extra_queues += [src, dst]
    try:
        channel = await conn.channel()
        for name in (src, dst):
            await c.declare_quorum(channel, name)
        await channel.close()
        drain = c.Drain(conn, dst)
        await drain.start()
        await c.preload(conn, bodies, routing_key=src)
        proc = c.spawn("baseline", ["-m", "bench.baseline", args[0], src, dst, *args[1:]])
        try:
            cpu = await drain.measure(len(bodies), _TIMEOUT_S,
                                      {"pipeline": proc.pid, "broker": c.broker_pid()})
            proc.check()
        finally:
            await proc.stop()
        await drain.close()
        return {"events_per_s": drain.rate(), "n": len(bodies), **cpu}
    finally:
        await c.delete_topology(conn, topo)


async def router_round(conn: AbstractRobustConnection, kind: str, n: int,
                       patched: Path | None = None) -> dict[str, Any]:
    topo = c.Topo()
    bodies = c.event_bodies(n, ROUTE_TYPE)
    if kind == "baseline":
        return await _run_baseline_round(conn, ["route"], bodies, topo)
    # The work queue is never served by the service here (see the module docstring),
    # so the address is never called.
    ct = c.comm_type(ROUTE_TYPE, "http://127.0.0.1:9/rws/api/v1", max_concurrency=1, rps=1)
    raw = topo.config([ct])
    return await _run_service_round(conn, raw, [ROUTE_TYPE], bodies,
                                    topo.work_queue(c.slug(ROUTE_TYPE)), topo,
                                    package_dir=patched if kind == "service_patched" else None)


async def e2e_round(conn: AbstractRobustConnection, sim: c.Sim, kind: str, n: int,
                    patched: Path | None = None) -> dict[str, Any]:
    topo = c.Topo()
    bodies = c.event_bodies(n, E2E_TYPE)
    user = c.account_name(E2E_TYPE)
    await sim.account(user, max_in_flight=10_000, rps=1_000_000)
    if kind == "baseline":
        return await _run_baseline_round(
            conn, ["e2e", sim.base_url, user, "bench-key"], bodies, topo)
    ct = c.comm_type(E2E_TYPE, sim.base_url, max_concurrency=E2E_CONCURRENCY, rps=1000)
    raw = topo.config([ct])
    loop = "uvloop" if kind == "service_uvloop" else "asyncio"
    return await _run_service_round(conn, raw, [E2E_TYPE], bodies, topo.history_queue, topo,
                                    loop, patched if kind == "service_patched" else None)


def _order(arms: list[str], rounds: int) -> list[str]:
    """A B C, C B A, A B C …: each arm runs early and late equally often."""
    order: list[str] = []
    for i in range(rounds):
        order += arms if i % 2 == 0 else arms[::-1]
    return order


async def compare(name: str, rounds: int, run_one: Any,
                  arms: tuple[str, ...] = ("baseline", "service")) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for kind in _order(list(arms), rounds):
        result = await run_one(kind)
        runs[kind].append(result)
        c.log(f"{name}: {kind} {result['events_per_s']:.0f} events/s, "
              f"{result.get('pipeline_cpu_ms_per_event', 0):.3f} CPU ms/event "
              f"(n={result['n']})")

    def med(kind: str, key: str) -> float:
        return c.median([r[key] for r in runs[kind] if key in r])

    out: dict[str, Any] = {"runs": runs}
    for kind in runs:
        out[f"{kind}_median"] = med(kind, "events_per_s")
        out[f"{kind}_cpu_ms_per_event"] = med(kind, "pipeline_cpu_ms_per_event")
        out[f"{kind}_broker_cpu_ms_per_event"] = med(kind, "broker_cpu_ms_per_event")
    base = out["baseline_median"]
    for arm in arms[1:]:
        key = "ratio" if arm == "service" else f"ratio_{arm}"
        out[key] = out[f"{arm}_median"] / base if base else float("nan")
    return out


async def run_router(conn: AbstractRobustConnection, rounds: int, n: int, *,
                     patched: Path | None = None) -> dict[str, Any]:
    """``patched``: an extra arm, the service run from another copy of the package."""
    async def one(kind: str) -> dict[str, Any]:
        return await router_round(conn, kind, n, patched)

    arms = ("baseline", "service") + (("service_patched",) if patched else ())
    return {"n": n, "rounds": rounds, **await compare("router", rounds, one, arms)}


async def run_e2e(conn: AbstractRobustConnection, sim: c.Sim, rounds: int, n: int,
                  *, uvloop: bool = False, patched: Path | None = None) -> dict[str, Any]:
    """Extra arms: ``uvloop``, the same service on uvloop's event loop; ``patched``, the
    service run from another copy of the package."""
    async def one(kind: str) -> dict[str, Any]:
        await sim.reset()
        return await e2e_round(conn, sim, kind, n, patched)

    arms = (("baseline", "service") + (("service_uvloop",) if uvloop else ())
            + (("service_patched",) if patched else ()))
    return {"n": n, "rounds": rounds, "concurrency": E2E_CONCURRENCY,
            **await compare("e2e", rounds, one, arms)}
