"""The soak's printout: faults injected per kind, events published, each invariant, the seed."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

from .invariants import Observations, Verdict
from .schedule import KINDS, Plan


def replay_command(plan: Plan) -> str:
    command = f"make chaos SEED={plan.seed} MINUTES={plan.minutes:g}"
    if plan.replicas != 3:
        command += f" REPLICAS={plan.replicas}"
    if plan.without:
        command += f" WITHOUT={','.join(sorted(plan.without))}"
    return command


def render(plan: Plan, broker: str, obs: Observations, verdicts: list[Verdict],
           took_s: float) -> str:
    zero = datetime.fromtimestamp(obs.started_wall, UTC).strftime("%H:%M:%S.%f")[:-3]
    lines = [f"chaos soak: seed {plan.seed}, {plan.minutes:g} min active, {plan.replicas} "
             f"replicas, broker {broker}, {took_s:.0f} s in all; +0 s is {zero} UTC in "
             "the logs", ""]
    done = Counter(f.kind for f in obs.faults if f.skipped is None)
    skipped = Counter(f.kind for f in obs.faults if f.skipped is not None)
    lines.append(f"{'fault':22} {'injected':>8} {'skipped':>8}")
    for kind in (*KINDS, "publish_retried", "unexpected_exit"):
        if (kind in KINDS and kind not in plan.without) or done[kind] or skipped[kind]:
            lines.append(f"{kind:22} {done[kind]:8} {skipped[kind]:8}")
    lines.append(f"{'total':22} {sum(done.values()):8} {sum(skipped.values()):8}")
    lines.append("")
    published = Counter(p.what for p in obs.published)
    lines.append("events published: " + ", ".join(
        f"{n} {what}" for what, n in sorted(published.items()))
        + f"; {sum(published.values())} in all; {len(obs.poison_ids)} poison messages; "
        f"{len({p.iccid for p in obs.published if p.iccid})} SIMs")
    signals = Counter(s.outcome for ss in obs.signals.values() for s in ss)
    lines.append("signals read: " + ", ".join(f"{n} {o}" for o, n in sorted(signals.items())))
    lines.append("")
    width = max(len(v.name) for v in verdicts)
    lines.append(f"{'invariant':{width}}  {'checked':>7}  verdict")
    for v in verdicts:
        lines.append(f"{v.name:{width}}  {v.checked:7}  {v.status()}")
        for window, n in sorted(v.exceptions.items()):
            lines.append(f"{'':{width}}           {n} x {window}")
    for v in verdicts:
        if v.failures or v.exception_examples:
            lines.append("")
            lines.append(f"{v.name}:")
            lines += [f"  FAILED: {example}" for example in v.failures]
            lines += [f"  in window: {example}" for example in v.exception_examples]
    lines += ["", f"replica logs (not judged): {obs.error_lines} lines at level error; "
              f"{sum(obs.log_notes.values())} lines outside the JSON log"]
    notes = sorted(obs.log_notes.items(), key=lambda kv: -kv[1])
    lines += [f"  {n:5} x {line}" for line, n in notes[:12]]
    ok = all(v.holds for v in verdicts)
    lines += ["", f"{'ALL INVARIANTS HOLD' if ok else 'INVARIANTS FAILED'}; seed {plan.seed}; "
              f"replay: {replay_command(plan)}"]
    return "\n".join(lines)
