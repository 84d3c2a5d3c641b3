"""``python -m tests.chaos.timeline DIR --at 555 [--before 30] [--after 10] [--grep RE]``:
a soak's replica logs and faults merged on the soak's clock (+seconds), around a moment
the report names, for finding out why an invariant failed."""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.timeline", description=__doc__)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--at", type=float, required=True, help="seconds after +0")
    parser.add_argument("--before", type=float, default=20.0)
    parser.add_argument("--after", type=float, default=10.0)
    parser.add_argument("--grep", default="", help="only lines matching this regex")
    parser.add_argument("--calls", action="store_true",
                        help="also the simulator's requests (account, pid, status)")
    args = parser.parse_args(argv)
    obs = json.loads((args.workdir / "observations.json").read_text())
    started, wall0 = obs["started"], obs.get("started_wall")
    lo, hi = args.at - args.before, args.at + args.after
    pattern = re.compile(args.grep) if args.grep else None
    rows: list[tuple[float, str]] = []
    for fault in obs["faults"]:
        for edge, t in (("begins", fault["start"]), ("ends", fault["end"])):
            if lo <= t - started <= hi:
                rows.append((t - started, f"SOAK      {fault['kind']} {edge} {fault['target']}"))
    for log in sorted(args.workdir.glob("replica-*.log")) if wall0 is not None else []:
        name = log.stem
        for line in log.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
                t = datetime.fromisoformat(entry["ts"]).timestamp() - wall0
            except (ValueError, KeyError):
                continue
            if lo <= t <= hi and (pattern is None or pattern.search(line)):
                extra = {k: v for k, v in entry.items()
                         if k not in ("ts", "level", "logger", "msg", "traceback")}
                rows.append((t, f"{name} {entry.get('level', '')[:4]} {entry.get('msg', '')} "
                                f"{extra if extra else ''}"[:300]))
    if args.calls:
        for r in obs["requests"]:
            t = r["started"] - started
            if lo <= t <= hi:
                rows.append((t, f"SIM       account {r['account']} {r['method']} "
                                f"{r['path'][-24:]} -> {r['http_status']} "
                                f"{r.get('violation') or ''} until +{r['finished'] - started:.3f} "
                                f"{(r.get('user_agent') or '')[-12:]}"))
    for t, text in sorted(rows):
        print(f"+{t:8.3f}s {text}")


if __name__ == "__main__":
    main()
