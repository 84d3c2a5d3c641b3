"""``python -m bench``: run every scenario, write ``bench/results/*.json`` and BENCHMARKS.md.

Order: rate fidelity (quiet machine first), router overhead, end to end, isolation, a
paused type's delayed signals, a commission's time to live behind a bulk backlog, the first
call after a first start, a clean hand-over and a crash, idle overhead, memory. Memory runs
last and gets what is left of ``--budget-s`` (it stops at 200,000 events or when its time
is up), so the whole run stays bounded. A scenario that fails is recorded as failed and
the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import backlog, latency, memory, overhead, pause, rate, report, takeover
from . import common as c

SCENARIOS = ("rate", "router", "e2e", "isolation", "pause", "backlog", "takeover", "idle",
             "memory")
_MEMORY_RESERVE_S = 25.0  # stopping, clean-up and writing after the memory scenario
_MEMORY_MIN_S = 40.0


def _plan(quick: bool) -> dict[str, Any]:
    if quick:  # a smoke run of every scenario, for working on the bench itself
        return {"rate_s": 8, "rate_types": (1, 4), "router": (1, 1000), "e2e": (1, 1000),
                "isolation": (2000, 15, 0.3), "pause": ((1000,), ()), "idle": 5,
                "backlog": ((2000,), 15, 0.5), "takeover": 1,
                "memory": (10_000, 20_000),
                "budget_s": 150}
    return {"rate_s": 60, "rate_types": (1, 20), "router": (3, 4000), "e2e": (3, 2000),
            "isolation": (10_000, 60, 0.3), "pause": ((1000, 10_000), (10_000,)), "idle": 30,
            "backlog": ((2000, 10_000), 30, 0.5), "takeover": 3,
            "memory": (100_000, 200_000),
            "budget_s": 570}


async def _sweep_stale() -> None:
    """Delete queues and exchanges an interrupted earlier bench run left behind (never
    those of a bench that is still running: the bench's pid is part of every name)."""
    if shutil.which("rabbitmqctl") is None:
        return
    found: dict[str, list[str]] = {}
    for kind in ("queues", "exchanges"):
        proc = await asyncio.create_subprocess_exec(
            "rabbitmqctl", "-q", f"list_{kind}", "name", stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL)
        out, _ = await proc.communicate()
        found[kind] = [n for n in out.decode().split()
                       if n.startswith(f"{c.PREFIX}-") and not c.owner_alive(n)]
    if not any(found.values()):
        return
    c.log(f"deleting {sum(map(len, found.values()))} leftovers of an earlier bench run")
    async with c.connect() as conn:
        for kind, names in found.items():
            for name in names:
                channel = await conn.channel()
                if kind == "queues":
                    await channel.queue_delete(name)
                else:
                    await channel.exchange_delete(name)
                await channel.close()


async def _run(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    plan = _plan(args.quick)
    budget_s = args.budget_s or plan["budget_s"]
    started = time.monotonic()
    only = set(args.only.split(",")) if args.only else set(SCENARIOS)
    results: dict[str, Any] = {}
    ok = True
    await _sweep_stale()
    async with c.connect() as conn, c.simulator() as sim:
        machine = report.machine(conn)
        # Other work on a shared machine may close connections or restart the broker; a
        # scenario that saw that is marked, since its numbers then say little.
        lost: list[float] = []
        conn.close_callbacks.add(lambda *_: lost.append(time.monotonic()))
        uvloop = args.uvloop and c.has_uvloop()

        async def rate_both() -> dict[str, Any]:
            out = {}
            for types in plan["rate_types"]:
                out[f"types_{types}"] = await rate.run_rate(
                    conn, sim, types=types, rps=5.0, duration_s=plan["rate_s"])
                c.log(f"rate: {types} type(s): {_brief(out[f'types_{types}'])}")
            return out

        def memory_run() -> Awaitable[dict[str, Any]]:
            left = budget_s - (time.monotonic() - started) - _MEMORY_RESERVE_S
            backlog, target = plan["memory"]
            return memory.run_memory(conn, sim, backlog=backlog, target=target,
                                     budget_s=max(_MEMORY_MIN_S, left))

        steps: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
            "rate": rate_both,
            "router": lambda: overhead.run_router(conn, *plan["router"], patched=args.patched),
            "e2e": lambda: overhead.run_e2e(conn, sim, *plan["e2e"], uvloop=uvloop,
                                            patched=args.patched),
            "isolation": lambda: latency.run_isolation(
                conn, sim, backlog=plan["isolation"][0], events=plan["isolation"][1],
                interval_s=plan["isolation"][2]),
            "pause": lambda: pause.run_pause(conn, sim, sizes=plan["pause"][0],
                                           bulk_sizes=plan["pause"][1]),
            "backlog": lambda: backlog.run_backlog(
                conn, sim, sizes=plan["backlog"][0], events=plan["backlog"][1],
                interval_s=plan["backlog"][2]),
            "takeover": lambda: takeover.run_takeover(conn, sim, rounds=plan["takeover"]),
            "idle": lambda: latency.run_idle(conn, sim, events=plan["idle"]),
            "memory": memory_run,
        }
        for name in SCENARIOS:
            if name not in only:
                continue
            c.log(f"{name}: starting ({time.monotonic() - started:.0f} s into the run)")
            t0 = time.monotonic()
            try:
                results[name] = await steps[name]()
            except Exception as exc:
                ok = False
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                traceback.print_exc()
            results[name]["seconds"] = round(time.monotonic() - t0, 1)
            if any(t >= t0 for t in lost):
                results[name]["disturbed"] = "the broker closed the bench's connection"
                c.log(f"{name}: disturbed, the broker closed connections meanwhile")
            if name != "rate":
                c.log(f"{name}: {_brief(results[name])}")
    machine["commit_at_end"] = report.commit()
    return {"command": args.command, "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "quick": args.quick, "duration_s": round(time.monotonic() - started, 1),
            "machine": machine, "results": results}, ok


def _brief(result: dict[str, Any]) -> str:
    keys = [k for k, v in result.items() if isinstance(v, int | float) and not
            isinstance(v, bool)]
    return ", ".join(f"{k}={result[k]:.3g}" for k in keys[:10]
                     if not (isinstance(result[k], float) and math.isnan(result[k])))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="short smoke run of every scenario (results not comparable)")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(SCENARIOS)}")
    parser.add_argument("--budget-s", type=float, help="time for the whole run (default 570)")
    parser.add_argument("--uvloop", action="store_true",
                        help="add the service on uvloop as another end-to-end arm (+20 s)")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    parser.add_argument("--patched", type=Path, metavar="DIR",
                        help="also run router and e2e with the jasper_consumer package in DIR "
                             "(e.g. a proposed fix), interleaved with the others")
    args = parser.parse_args()
    args.command = "make bench" if not sys.argv[1:] else "python -m bench " + " ".join(
        sys.argv[1:])
    data, ok = asyncio.run(_run(args))
    c.RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    raw = c.RESULTS / f"bench-{stamp}.json"
    raw.write_text(json.dumps(data, indent=2, default=str) + "\n")
    (c.RESULTS / "latest.json").write_text(raw.read_text())
    c.log(f"raw results: {raw.relative_to(c.ROOT)}")
    section = report.render(data, raw.relative_to(c.ROOT))
    print(section)
    if not (args.no_write or args.quick or args.only or args.patched):
        report.write(c.ROOT / "BENCHMARKS.md", section)
        c.log("BENCHMARKS.md results section rewritten")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
