"""One soak from a seed to its printed verdicts (shared by the CLI and the pytest test)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from . import brokers
from .invariants import Verdict, verdicts
from .report import render
from .schedule import make_plan
from .soak import Soak, default_workdir


async def run_soak(seed: int, minutes: float, *, replicas: int = 3, broker: str = "auto",
                   workdir: Path | None = None, without: frozenset[str] = frozenset(),
                   say: Callable[[str], None] | None = None) -> tuple[bool, list[Verdict]]:
    """Run the soak of ``seed``; print the plan, the faults as they happen and the report;
    return whether every invariant held, and the verdicts."""
    def out(line: str) -> None:
        print(line, flush=True)

    say = say or out
    began = time.monotonic()
    target = await brokers.choose(broker)
    plan = make_plan(seed, minutes, replicas, len(target.stoppable), without)
    workdir = workdir or default_workdir(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    say(f"seed {seed}: {minutes:g} min, {replicas} replicas, broker {target.kind} "
        f"({', '.join(n.label for n in target.nodes)}); {len(plan.publishes)} messages and "
        f"{len(plan.faults)} faults planned"
        + (f" (left out: {', '.join(sorted(without))})" if without else ""))
    for fault in plan.faults:
        say(f"  plan +{fault.at_s:6.1f}s {fault.describe()}")
    obs = await Soak(plan, target, workdir, say).run()
    results = verdicts(obs)
    report = render(plan, target.kind, obs, results, time.monotonic() - began)
    say(report)
    (workdir / "report.txt").write_text(report + "\n")
    (workdir / "observations.json").write_text(json.dumps(
        {"faults": [asdict(f) for f in obs.faults], "sigterms": obs.sigterms,
         "unexpected_exits": obs.unexpected_exits, "started": obs.started,
         "started_wall": obs.started_wall,
         "published": [asdict(p) for p in obs.published],
         "signals": {e: [asdict(s) for s in ss] for e, ss in obs.signals.items()},
         "requests": obs.requests, "stats": obs.stats,
         "replica_samples": [asdict(s) for s in obs.replica_samples],
         "queue_samples": [asdict(s) for s in obs.queue_samples]},
        default=str))
    say(f"logs, report and observations in {workdir}")
    return all(v.holds for v in results), results
