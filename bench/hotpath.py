"""Profile the service's hot path: a backlog of events end to end, sampled by py-spy.

``python -m bench.hotpath [--events N] [--tool py-spy|cprofile]`` starts the simulator
(0 ms, limits out of the way) and the service (one communicator type, 64 calls in
flight), publishes ``N`` events while the service runs, and prints where the service
process spent its time: per function, inclusive and self, as a share of all samples.
Raw output stays in ``bench/results/`` (``profile.*``).

py-spy (``pip install py-spy``) samples from outside the process, so the numbers are
not inflated by the profiler; cProfile (``--tool cprofile``) adds call counts but slows
every Python call, which overstates small functions.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import pstats
import re
import shutil
import subprocess
import sys
from pathlib import Path

from . import common as c
from . import overhead

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for marker in ("site-packages/", "jasper_consumer/", "lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "jasper_consumer/":
                path = "jasper_consumer/" + path
            break
    return f"{m['func']} ({path})"


def _area(frame: str) -> str:
    """The package a frame belongs to: ``aiormq``, ``asyncio``, ``jasper_consumer``…"""
    m = re.search(r"\(([^)]*)\)$", frame)
    path = m[1] if m else frame
    first = path.split("/", 1)[0]
    if first.endswith(".py"):
        first = first[:-3]
    return first or "?"


def summarize_pyspy(raw: Path, top: int) -> str:
    """Inclusive and self shares per function from py-spy's collapsed stacks."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_s)
        frames = [_short(f) for f in stack.split(";")]
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
        areas[_area(frames[-1])] += count
    lines = [f"{total} samples", "\n-- self time by package --"]
    lines += [f"{100 * n / total:6.1f}%  {name}" for name, n in areas.most_common(20)]
    ours = [(n, f) for f, n in inclusive.items() if f.endswith(".py)") and
            "(jasper_consumer/" in f]
    lines.append("\n-- jasper_consumer functions, inclusive --")
    lines += [f"{100 * n / total:6.1f}%  {f}" for n, f in sorted(ours, reverse=True)[:top]]
    for title, counter in (("inclusive", inclusive), ("self", own)):
        lines.append(f"\n-- top {top} by {title} share --")
        lines += [f"{100 * n / total:6.1f}%  {name}" for name, n in counter.most_common(top)]
    return "\n".join(lines)


async def run(events: int, tool: str, top: int) -> str:
    c.RESULTS.mkdir(parents=True, exist_ok=True)
    topo = c.Topo()
    name = overhead.E2E_TYPE
    async with c.connect() as conn, c.simulator() as sim:
        user = c.account_name(name)
        await sim.account(user, max_in_flight=10_000, rps=1_000_000)
        ct = c.comm_type(name, sim.base_url, max_concurrency=overhead.E2E_CONCURRENCY, rps=1000)
        raw_cfg = topo.config([ct])
        try:
            channel = await conn.channel()
            await c.declare_service_topology(channel, raw_cfg)
            await channel.close()
            drain = c.Drain(conn, topo.history_queue)
            await drain.start()
            bodies = c.event_bodies(events, name)
            prof = c.RESULTS / "profile.cprofile"
            async with c.service(raw_cfg, profile=prof if tool == "cprofile" else None) as proc:
                await c.wait_consumers(conn, [topo.events_queue])
                spy = None
                raw = c.RESULTS / "profile.pyspy.txt"
                if tool == "py-spy":
                    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
                    spy = subprocess.Popen(  # noqa: ASYNC220 - a one-off helper process
                        [exe, "record", "--pid", str(proc.pid), "--rate", "250",
                         "--format", "raw", "--output", str(raw), "--nonblocking"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    await asyncio.sleep(1.0)
                await c.preload(conn, bodies, exchange=topo.events_exchange,
                                routing_key=f"event.{c.EVENT_CODE}", batch=500)
                cpu = await drain.measure(events, 300, {"service": proc.pid})
                if spy is not None:
                    spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
                    await asyncio.to_thread(spy.wait, 30)
            await drain.close()
        finally:
            await c.delete_topology(conn, topo, [name])
    head = (f"{events} events end to end at {drain.rate():.0f} events/s, "
            f"{cpu['service_cpu_ms_per_event']:.3f} service CPU ms/event ({tool})")
    if tool == "py-spy":
        return head + "\n" + summarize_pyspy(raw, top)
    stats = pstats.Stats(str(prof))
    out = c.RESULTS / "profile.cprofile.txt"
    with out.open("w") as f:
        stats.stream = f  # type: ignore[attr-defined]
        stats.sort_stats("cumulative").print_stats(top)
        stats.sort_stats("tottime").print_stats(top)
    return head + "\n" + out.read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--tool", choices=["py-spy", "cprofile"], default="py-spy")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    print(asyncio.run(run(args.events, args.tool, args.top)))


if __name__ == "__main__":
    main()
