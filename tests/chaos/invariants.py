"""The soak's verdicts, computed from what it observed; no I/O, so each check is unit-tested.

Times are ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for the soak, the simulator's
request records and the signals' arrival). A signal's ``completed_at`` is wall-clock time,
converted with the offset the soak measured at its start.

Exceptions allowed, each only inside a window the operator guide names ("Order and
crashes", "While a type is paused") and counted per window:

* a second final signal for an event, when a crash or a broker failure (kill -9, a closed
  connection, ``stop_app``, the consumer timeout, a blackholed or reset connection, a
  publish the soak had to retry) falls between the event's publish and the second one's
  arrival (a router that dies after forwarding an event and before acking it forwards
  it twice: both copies get a final signal, at the same moment);
* a second delayed signal for a job, when such a crash falls between the first delayed
  signal and the broker recording it (its arrival, plus the soak's polling slack);
* a SIM that ends in an older event's status, when at least two kill -9s hit after one of
  its events was delayed (two crashes in a row during a pause).
"""

from __future__ import annotations

import bisect
import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from tests.reliability.conftest import caller_pid

# Fault kinds that are a crash or a broker failure: what may repeat a signal.
CRASH_KINDS = frozenset({"kill9", "close_connections", "stop_app", "consumer_timeout",
                         "blackhole", "reset", "unexpected_exit", "publish_retried"})
STATUS_OF = {"activate": "ACTIVATED", "deactivate": "DEACTIVATED"}
IDLE_BOUND_S = 30.0
COMPLETION_SLACK_S = 2.0  # completed_at (wall clock) vs the soak's monotonic clock
RECORDED_SLACK_S = 1.0  # a signal's arrival at the soak after the broker recorded it
SAMPLE_STALE_S = 5.0
EXAMPLES = 5


@dataclass(frozen=True)
class Signal:
    event_id: str
    outcome: str  # succeeded, failed, delayed
    code: str | None
    completed_mono: float
    arrived: float


@dataclass(frozen=True)
class Published:
    order: int  # publish order (the soak publishes one at a time, each confirmed)
    event_id: str
    what: str  # event, local_failure, unknown_iccid, closing
    iccid: str | None
    type_name: str
    command: str
    at: float


@dataclass(frozen=True)
class Injected:
    """A fault as carried out: ``start``..``end`` (monotonic), or skipped with a reason."""

    kind: str
    start: float
    end: float
    target: str = ""
    skipped: str | None = None


@dataclass(frozen=True)
class ReplicaSample:
    t: float
    replica: int
    alive: bool
    ready: bool | None  # None: no answer
    up: dict[str, float] | None = None  # jasper_communicator_up by type, when read
    why: str = ""  # what /readyz said when not ready


@dataclass(frozen=True)
class QueueSample:
    t: float
    depths: dict[str, int]


@dataclass
class Observations:
    types: list[dict[str, Any]]  # name, slug, account, max_concurrency
    prefix: str
    published: list[Published] = field(default_factory=list)
    signals: dict[str, list[Signal]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    sim_status: dict[str, str | None] = field(default_factory=dict)
    faults: list[Injected] = field(default_factory=list)
    sigterms: list[tuple[int, int, int | None]] = field(default_factory=list)
    unexpected_exits: list[tuple[int, int, int | None, float]] = field(default_factory=list)
    replica_samples: list[ReplicaSample] = field(default_factory=list)
    queue_samples: list[QueueSample] = field(default_factory=list)
    poison_ids: list[str] = field(default_factory=list)
    dead: dict[str, str | None] = field(default_factory=dict)
    restored: list[str] = field(default_factory=list)  # what was not restored at the end
    not_ready: list[str] = field(default_factory=list)  # replicas not ready in the quiet phase
    log_notes: dict[str, int] = field(default_factory=dict)  # replicas' stderr lines, counted
    error_lines: int = 0  # log lines at level error
    started: float = 0.0
    started_wall: float = 0.0  # time.time() at ``started``: to find a moment in the logs


@dataclass
class Verdict:
    name: str
    checked: int = 0
    failures: list[str] = field(default_factory=list)
    failed: int = 0
    exceptions: dict[str, int] = field(default_factory=dict)
    exception_examples: list[str] = field(default_factory=list)

    @property
    def holds(self) -> bool:
        return self.failed == 0

    def fail(self, example: str) -> None:
        self.failed += 1
        if len(self.failures) < EXAMPLES:
            self.failures.append(example)

    def allow(self, window: str, example: str) -> None:
        self.exceptions[window] = self.exceptions.get(window, 0) + 1
        if len(self.exception_examples) < EXAMPLES:
            self.exception_examples.append(example)

    def status(self) -> str:
        if not self.holds:
            return f"FAILED ({self.failed} of {self.checked})"
        if self.exceptions:
            total = sum(self.exceptions.values())
            return f"holds; {total} exceptions in named windows"
        return "holds"


def _rel(obs: Observations, t: float, digits: int = 1) -> str:
    return f"+{t - obs.started:.{digits}f}s"


def crash_between(obs: Observations, lo: float, hi: float) -> Injected | None:
    """The crash or broker failure whose span meets ``[lo, hi]`` closest to ``hi`` (the
    likeliest cause of what happened at ``hi``), or None."""
    hits = [f for f in obs.faults
            if f.skipped is None and f.kind in CRASH_KINDS and f.start <= hi and f.end >= lo]
    return max(hits, key=lambda f: (min(f.end, hi), f.start), default=None)


def _finals(signals: list[Signal]) -> list[Signal]:
    return sorted((s for s in signals if s.outcome in ("succeeded", "failed")),
                  key=lambda s: s.arrived)


def every_event_final(obs: Observations) -> Verdict:
    v = Verdict("every event has a final signal")
    for p in obs.published:
        v.checked += 1
        if not _finals(obs.signals.get(p.event_id, [])):
            seen = [s.outcome for s in obs.signals.get(p.event_id, [])]
            v.fail(f"{p.event_id} ({p.what}, {p.type_name}, {p.command} {p.iccid}, published "
                   f"{_rel(obs, p.at)}): signals {seen or 'none'}")
    return v


def one_final_per_event(obs: Observations) -> Verdict:
    v = Verdict("one final signal per event (a duplicate only after a crash)")
    for p in obs.published:
        finals = _finals(obs.signals.get(p.event_id, []))
        if not finals:
            continue
        v.checked += 1
        for extra in finals[1:]:
            cause = crash_between(obs, p.at, extra.arrived)
            example = (f"{p.event_id} ({p.type_name} {p.command} {p.iccid}): finals "
                       f"{[(s.outcome, s.code, _rel(obs, s.arrived)) for s in finals]}")
            if cause is None:
                v.fail(example + "; no crash or broker failure in between")
            else:
                v.allow(f"duplicate final after {cause.kind}",
                        f"{example}; {cause.kind} {cause.target} at {_rel(obs, cause.start)}")
    return v


def one_delayed_per_job(obs: Observations) -> Verdict:
    v = Verdict("at most one delayed signal per job")
    for p in obs.published:
        delayed = sorted((s for s in obs.signals.get(p.event_id, []) if s.outcome == "delayed"),
                         key=lambda s: s.arrived)
        if not delayed:
            continue
        v.checked += 1
        if len(delayed) < 2:
            continue
        first = delayed[0]
        cause = crash_between(obs, first.completed_mono - COMPLETION_SLACK_S,
                              first.arrived + RECORDED_SLACK_S)
        example = (f"{p.event_id} ({p.type_name} {p.command} {p.iccid}): {len(delayed)} delayed "
                   f"at {[_rel(obs, s.arrived) for s in delayed]}")
        if cause is None:
            v.fail(example + "; no crash between the first one and its recording")
        else:
            v.allow(f"second delayed after {cause.kind} in its publish",
                    f"{example}; {cause.kind} {cause.target} at {_rel(obs, cause.start)}")
    return v


def sims_end_in_newest_status(obs: Observations) -> Verdict:
    v = Verdict("each SIM ends in its newest event's status")
    newest: dict[str, Published] = {}
    by_iccid: dict[str, list[Published]] = defaultdict(list)
    for p in obs.published:
        if p.what in ("event", "closing") and p.iccid:
            by_iccid[p.iccid].append(p)
            if p.iccid not in newest or p.order > newest[p.iccid].order:
                newest[p.iccid] = p
    kills = sorted(f.start for f in obs.faults
                   if f.skipped is None and f.kind in ("kill9", "unexpected_exit"))
    for iccid, p in sorted(newest.items()):
        finals = _finals(obs.signals.get(p.event_id, []))
        if not finals:
            continue  # counted by "every event has a final signal"
        v.checked += 1
        want, got = STATUS_OF[p.command], obs.sim_status.get(iccid)
        last = finals[-1]
        if last.outcome != "succeeded":
            v.fail(f"SIM {iccid}: its newest event {p.event_id} ({p.command}) ended "
                   f"{last.outcome} {last.code} even after the quiet phase; SIM is {got}")
            continue
        if got == want:
            continue
        example = (f"SIM {iccid} ({p.type_name}) is {got}, its newest event {p.event_id} "
                   f"({p.command}, published {_rel(obs, p.at)}) succeeded")
        delayed_at = [s.arrived for e in by_iccid[iccid] for s in obs.signals.get(e.event_id, [])
                      if s.outcome == "delayed"]
        after = len(kills) - bisect.bisect_left(kills, min(delayed_at)) if delayed_at else 0
        if after >= 2:
            v.allow("older event after two crashes during a pause",
                    f"{example}; {after} kill -9 after its first delayed signal")
        else:
            v.fail(example)
    return v


def account_limits(obs: Observations) -> Verdict:
    """The simulator counted no call over an account's concurrency or rate; each violation
    is shown with the account's other calls around it (which process, when).

    The simulator stamps a call when its own event loop gets to it. A rate "violation" in
    whose second the simulator's loop stalled (``stalls`` in its stats) is a measurement
    window, not a burst: the service spaced its starts, the stall compressed them as seen.
    Such violations are allowed and counted; any other fails."""
    v = Verdict("0 concurrency or rate violations per account")
    seen = obs.stats.get("max_in_flight_seen", {})
    stalls = sorted(tuple(x) for x in obs.stats.get("stalls", []))
    stall_ends = [t for t, _ in stalls]
    by_account = obs.stats.get("violations_by_account", {})
    calls = sorted((r for r in obs.requests if r.get("account")), key=lambda r: r["started"])
    for t in obs.types:
        v.checked += 1
        most = int(seen.get(t["account"], 0))
        recorded = sum(1 for r in calls if r["account"] == t["account"] and r.get("violation"))
        if most > t["max_concurrency"] or int(by_account.get(t["account"], 0)) > recorded:
            v.fail(f"account {t['account']}: {by_account.get(t['account'], 0)} violations, "
                   f"{most} calls in flight (limit {t['max_concurrency']})")
    starts = [r["started"] for r in calls]
    for r in calls:
        if not r.get("violation"):
            continue
        window = calls[bisect.bisect_left(starts, r["started"] - 1.0):
                       bisect.bisect_right(starts, r["started"])]
        others = [c for c in window if c is not r and c["account"] == r["account"]
                  and (r["violation"] == "rate" or c["finished"] > r["started"])]
        around = [f"pid {caller_pid(c.get('user_agent'))} {c['method']} "
                  f"{_rel(obs, c['started'], 3)}..{_rel(obs, c['finished'], 3)}"
                  for c in others]
        gaps = ""
        stalled: list[tuple[float, float]] = []
        if r["violation"] == "rate" and others:
            spaced = [c["started"] for c in others] + [r["started"]]
            steps = [round((b - a) * 1000) for a, b in itertools.pairwise(spaced)]
            interval = 1000 / float(next((t.get("requests_per_second", 0) for t in obs.types
                                          if t["account"] == r["account"]), 0) or 1)
            gaps = (f"; gaps between starts {steps} ms as the simulator saw them, "
                    f"1/rps = {interval:.0f} ms")
            # a stall delays the stamp of the call handled right after it: from just before
            lo = bisect.bisect_left(stall_ends, spaced[0] - 0.05)
            stalled = list(stalls[lo:bisect.bisect_right(stall_ends, r["started"] + 0.05)])
        example = (f"  {r['violation']} violation on account {r['account']}: pid "
                   f"{caller_pid(r.get('user_agent'))} {r['method']} at "
                   f"{_rel(obs, r['started'], 3)}; the account's calls "
                   + ("in the second before" if r["violation"] == "rate" else "in flight")
                   + f": {around[-8:]}{gaps}")
        shortfall_s = 0.0
        if r["violation"] == "rate" and others:
            rate = float(next((t.get("requests_per_second", 0) for t in obs.types
                               if t["account"] == r["account"]), 0) or 1)
            shortfall_s = max(1 / rate - (b - a) for a, b in itertools.pairwise(spaced))
        # A stall explains the violation only if it was at least as long as the gap was
        # short (a stall of 7 ms cannot make a gap 48 ms short).
        if stalled and max(late for _, late in stalled) >= shortfall_s - 0.003:
            worst = max(late for _, late in stalled)
            v.allow("the simulator's own loop stalled in that second",
                    example + f"; simulator loop stalled {len(stalled)} time(s), up to "
                    f"{worst * 1000:.0f} ms")
        else:
            v.fail(example)
    return v


def no_overlap_between_processes(obs: Observations) -> Verdict:
    v = Verdict("no two processes' calls on one account overlapped")
    by_account: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    for r in obs.requests:
        pid = caller_pid(r.get("user_agent"))
        if r.get("account") is None or pid is None:
            continue
        by_account[r["account"]].append((r["started"], r["finished"], pid))
    for account, calls in sorted(by_account.items()):
        calls.sort()
        v.checked += len(calls)
        open_calls: list[tuple[float, float, int]] = []
        for start, end, pid in calls:
            open_calls = [c for c in open_calls if c[1] > start]
            for other in open_calls:
                if other[2] != pid:
                    v.fail(f"account {account}: pid {other[2]}'s call {_rel(obs, other[0])}.."
                           f"{_rel(obs, other[1])} overlaps pid {pid}'s {_rel(obs, start)}.."
                           f"{_rel(obs, end)}")
                    break
            open_calls.append((start, end, pid))
    return v


def _any_in(times: list[float], lo: float, hi: float) -> bool:
    i = bisect.bisect_left(times, lo)
    return i < len(times) and times[i] <= hi


def no_type_left_idle(obs: Observations, bound_s: float = IDLE_BOUND_S) -> Verdict:
    """No type left more than ``bound_s`` with waiting jobs (work, bulk or parked queue) and
    no call to its account, unless it was paused or a running replica was not ready.

    For each queue sample at ``t``: jobs waited in every sample of ``[t - bound_s, t]``
    (samples at most ``SAMPLE_STALE_S`` apart), no running replica answered "not ready"
    and none reported the type paused in that span, and no call of the account started
    or ended in it: a failure (the first per type is described, with its stretch)."""
    v = Verdict(f"no type left > {bound_s:.0f} s with waiting jobs and no owner calling")
    samples = sorted(obs.replica_samples, key=lambda s: s.t)
    unready = [s.t for s in samples if s.alive and s.ready is not True]
    calls: dict[str, list[float]] = defaultdict(list)  # starts and ends: any in the span
    for r in obs.requests:
        if r.get("account") is not None:
            calls[r["account"]] += [r["started"], r["finished"]]
    for times in calls.values():
        times.sort()
    queue_samples = sorted(obs.queue_samples, key=lambda q: q.t)
    for t in obs.types:
        paused = [s.t for s in samples
                  if s.alive and s.up is not None and s.up.get(t["name"], 1.0) == 0.0]
        queues = {f"{obs.prefix}.{kind}.{t['slug']}" for kind in ("work", "bulk", "parked")}
        work = f"{obs.prefix}.work.{t['slug']}"
        run_start: float | None = None
        previous = float("-inf")
        worst, first = 0.0, ""
        for sample in queue_samples:
            # The owner always holds one anchor token of the work queue (unacknowledged, so
            # in "messages"): it is no job waiting.
            waiting = sum(max(0, n - 1) if q == work else n
                          for q, n in sample.depths.items() if q in queues)
            if waiting == 0 or sample.t - previous > SAMPLE_STALE_S:
                run_start = None
            previous = sample.t
            if waiting == 0:
                continue
            v.checked += 1
            if run_start is None:
                run_start = sample.t
            lo = sample.t - bound_s
            if (run_start > lo or _any_in(unready, lo, sample.t)
                    or _any_in(paused, lo, sample.t)
                    or _any_in(calls.get(t["account"], []), lo, sample.t)):
                continue
            worst = max(worst, sample.t - run_start)
            if not first:
                first = (f"{t['name']}: {waiting} jobs waiting at {_rel(obs, sample.t)}, no "
                         f"call to account {t['account']} in the {bound_s:.0f} s before, every "
                         f"running replica ready and the type not paused; waiting since "
                         f"{_rel(obs, run_start)}")
        if first:
            v.fail(f"{first} (longest such stretch {worst:.0f} s)")
    return v


def sigterm_exits_zero(obs: Observations) -> Verdict:
    v = Verdict("every SIGTERM ended with exit 0")
    for replica, pid, code in obs.sigterms:
        v.checked += 1
        if code != 0:
            v.fail(f"replica {replica} pid {pid}: "
                   + ("did not exit within the bound" if code is None else f"exit {code}"))
    return v


def no_unexpected_exit(obs: Observations) -> Verdict:
    v = Verdict("no replica exited by itself")
    v.checked = len({pid for _, pid, _ in obs.sigterms}) + len(obs.unexpected_exits)
    for replica, pid, code, at in obs.unexpected_exits:
        v.fail(f"replica {replica} pid {pid} exited {code} at {_rel(obs, at)}")
    return v


def poison_dead_lettered(obs: Observations) -> Verdict:
    v = Verdict("every poison message dead-lettered")
    for mid in obs.poison_ids:
        v.checked += 1
        if mid not in obs.dead:
            v.fail(f"{mid} is not in the dead-letter queue")
    return v


def everything_restored(obs: Observations) -> Verdict:
    v = Verdict("every fault healed (consumer timeout, nodes, accounts, proxies)")
    v.checked = len(obs.faults)
    for what in obs.restored:
        v.fail(what)
    return v


def ready_after_healing(obs: Observations) -> Verdict:
    v = Verdict("every replica ready within 60 s of each (re)start and once faults heal")
    v.checked = len({s.replica for s in obs.replica_samples})
    for what in obs.not_ready:
        v.fail(what)
    return v


CHECKS = (every_event_final, one_final_per_event, sims_end_in_newest_status,
          one_delayed_per_job, account_limits, no_overlap_between_processes,
          no_type_left_idle, sigterm_exits_zero, no_unexpected_exit, ready_after_healing,
          poison_dead_lettered, everything_restored)


def verdicts(obs: Observations) -> list[Verdict]:
    return [check(obs) for check in CHECKS]
