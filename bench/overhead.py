"""Throughput against bare and same-design pipelines, same broker, same run, rounds interleaved.

* **router**: a backlog of events on a quorum queue, drained by stage 1 of the service
  (``<prefix>.events`` → ``<prefix>.work.<type>``) or by ``bench.baseline route``
  (consume → publish with confirm → ack). The bench registers first on the work queue,
  which has a single active consumer, so the service's own worker stays idle and only
  stage 1 runs; the bench counts arrivals there. Rate = messages between the first and
  the last arrival / time between them; CPU from the first arrival on.
* **end to end**: events through a whole pipeline to a result on a quorum queue, one PUT
  each to the simulator at 0 ms. Arms: the service (router, worker, signal with confirm);
  ``bench.baseline e2e``, one stage (consume → PUT → publish result → ack);
  ``bench.baseline two-stage``, the service's shape bare (route to a work queue with
  confirm → ack, then consume → PUT → publish result → ack); ``bench.faststream_peer``, the
  same two stages written with FastStream. Every arm gets the same round: start the
  pipeline on empty queues, wait for its consumers, send 64 warm-up events and wait for
  their results (the service's new owner of a type waits ``1 / rps`` + the request timeout
  before its first call: 2 s here), then publish the backlog (confirmed, as fast as the
  bench can) while the pipeline runs. CPU per event = the pipeline process's CPU from just
  before that publish to the last result, / events: every stage's work for them, no
  start-up. (A backlog loaded before the service starts would be routed during that wait
  and its router CPU never counted.) Rate = results between the first and the last of the
  backlog's / time between them.

Rounds alternate the order of the arms (A B C, C B A, …), and the medians are reported.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractRobustConnection

from . import common as c

ROUTE_TYPE = "Bench Route"
E2E_TYPE = "Bench E2E"
E2E_CONCURRENCY = 64
E2E_WARMUP = 64
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


@contextlib.asynccontextmanager
async def _process(name: str, args: list[str]) -> AsyncIterator[c.Proc]:
    proc = c.spawn(name, args)
    try:
        yield proc
    except BaseException:
        c.log(f"{name} stderr, last lines:\n{proc.tail(15)}")
        raise
    finally:
        await proc.stop()


async def _pipeline_round(conn: AbstractRobustConnection,
                          start: Callable[[], AbstractAsyncContextManager[c.Proc]], *, n: int,
                          communicator_type: str, consumers: list[str], results: str,
                          exchange: str = "", routing_key: str) -> dict[str, Any]:
    """One end-to-end round (see the module docstring): ``start()`` is an async context
    manager giving the pipeline's process once the queues exist."""
    warm = c.event_bodies(E2E_WARMUP, communicator_type, series=7)
    bodies = c.event_bodies(n, communicator_type)
    drain = c.Drain(conn, results)
    await drain.start()
    try:
        async with start() as proc:
            await c.wait_consumers(conn, consumers)
            await c.preload(conn, warm, exchange=exchange, routing_key=routing_key)
            await drain.wait_count(len(warm), _TIMEOUT_S)
            proc.check()
            cpu = await drain.measure_from_here(
                lambda: c.preload(conn, bodies, exchange=exchange, routing_key=routing_key),
                n, _TIMEOUT_S, {"pipeline": proc.pid, "broker": c.broker_pid()})
            proc.check()
    finally:
        await drain.close()
    return {"events_per_s": drain.rate(skip=len(warm)), "n": n, **cpu}


_E2E_MODULES = {"baseline": ("baseline", ["-m", "bench.baseline", "e2e"]),
                "two_stage": ("baseline", ["-m", "bench.baseline", "two-stage"]),
                "faststream": ("faststream", ["-m", "bench.faststream_peer"])}


async def e2e_round(conn: AbstractRobustConnection, sim: c.Sim, kind: str, n: int,
                    patched: Path | None = None) -> dict[str, Any]:
    topo = c.Topo()
    user = c.account_name(E2E_TYPE)
    await sim.account(user, max_in_flight=10_000, rps=1_000_000)
    if kind in _E2E_MODULES:
        src, dst, work = f"{topo.tag}.src", f"{topo.tag}.dst", f"{topo.tag}.work"
        topo.extra_queues += [src, dst, work]
        name, module = _E2E_MODULES[kind]
        args = [*module, src, dst, sim.base_url, user, c.SERVICE_KEY]
        if kind != "baseline":
            args.append(work)
        try:
            channel = await conn.channel()
            for queue in (src, dst, work):
                await c.declare_quorum(channel, queue)
            await channel.close()
            return await _pipeline_round(
                conn, lambda: _process(name, args), n=n, communicator_type=E2E_TYPE,
                consumers=[src] if kind == "baseline" else [src, work], results=dst,
                routing_key=src)
        finally:
            await c.delete_topology(conn, topo)
    ct = c.comm_type(E2E_TYPE, sim.base_url, max_concurrency=E2E_CONCURRENCY, rps=1000)
    raw = topo.config([ct])
    loop = "uvloop" if kind == "service_uvloop" else "asyncio"
    package_dir = patched if kind == "service_patched" else None
    try:
        channel = await conn.channel()
        await c.declare_service_topology(channel, raw)
        await channel.close()
        return await _pipeline_round(
            conn, lambda: c.service(raw, loop=loop, package_dir=package_dir), n=n,
            communicator_type=E2E_TYPE,
            consumers=[topo.events_queue, topo.work_queue(c.slug(E2E_TYPE))],
            results=topo.history_queue, exchange=topo.events_exchange,
            routing_key=f"event.{c.EVENT_CODE}")
    finally:
        await c.delete_topology(conn, topo, [E2E_TYPE])


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

    arms = (("baseline", "service", "faststream", "two_stage")
            + (("service_uvloop",) if uvloop else ())
            + (("service_patched",) if patched else ()))
    out = {"n": n, "rounds": rounds, "concurrency": E2E_CONCURRENCY, "warmup": E2E_WARMUP,
           **await compare("e2e", rounds, one, arms)}
    out["service_vs_faststream"] = _ratio(out["service_median"], out["faststream_median"])
    out["service_cpu_vs_two_stage"] = _ratio(out["service_cpu_ms_per_event"],
                                             out["two_stage_cpu_ms_per_event"])
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")
