"""What the status page shows (operator guide, section 14): the facts as frozen models,
the rolling trackers behind them, and :func:`collect`, which reads one type's facts off
its owning :class:`~.worker.Worker`.

::

    owner ── collect(worker) ──▶ OwnerFacts ─┐
    every process: presence, queue depths ───┴─▶ Report ─▶ <prefix>.status (fanout, TTL)
    every process ◀── every process's Report ── assemble() ─▶ StatusReport ─▶ GET /, /status.json

:class:`Finals` keeps, per communicator type, the publish → final signal times of the
last 10 minutes per lane and the last 20 failures; ``History.final`` feeds it.
:func:`assemble` is pure: from the reports a process has heard (each with its age) it
builds the page's facts for every configured type — owner, standbys, pause, limits,
backlog, latency, failures — or "no owner for N s". Nothing here holds a secret: type
names, hosts, pids, client ids, ICCIDs, error codes and their messages.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from . import errors
from .events import Job, Lane
from .outcomes import ErrorInfo

if TYPE_CHECKING:
    from .config import Settings
    from .signals import Signal
    from .worker import Worker

WINDOW_S = 600.0  # publish -> final percentiles over the last 10 minutes
MAX_SAMPLES = 10_000  # per lane and type: percentiles of at most the last 10,000 finals
FAILURES_KEPT = 20
CALLS_WINDOW_S = 10.0  # calls per second "now": over the last 10 s
TREND_WINDOW_S = 30.0  # a backlog grows when it is larger than 30 s ago ...
BACKLOG_MIN = 10  # ... and holds at least this many jobs

#: Why a type paused, in an operator's words, by the pause error's code (operator guide, section 5).
#: A code not listed (a new pause reason) shows the generic words and its own message.
PAUSE_WORDS: dict[str, str] = {
    "10000001": "Control Center refused the credentials: the API key or user name is "
                "wrong, or this host's IP address is not in the account's allowed range. "
                "Fix the key; a rotated api_key_file applies at the next probe, no restart.",
    errors.UNAUTHORIZED: "Control Center refused the credentials (HTTP 401 without an error "
                         "code). Check the user name and API key, and that server_address "
                         "is Control Center and not a proxy asking for its own login.",
    "10000024": "Control Center does not serve the API version in server_address (it must "
                "end with the version, e.g. /rws/api/v1). Fix the config and restart.",
    "10000030": "The API user's role may not change SIMs (Edit Device Details). Ask the "
                "Control Center administrator. Echo may pass without it: the type then "
                "pauses again after each resume and probes less often (up to every 5 min).",
}
OUTAGE_WORDS = ("Control Center is not answering properly (an outage): calls kept failing "
                "and Echo failed too. The service probes and resumes by itself; tell the "
                "carrier if it lasts.")
OTHER_WORDS = ("Paused by the error below. The service probes with Echo and resumes by "
               "itself once the probe passes.")
_OUTAGE_CODES = frozenset({errors.JASPER_UNREACHABLE, errors.UNEXPECTED_RESPONSE,
                           *errors.RETRYABLE_CODES})


def pause_words(error: ErrorInfo) -> str:
    """Why the type is paused, for a person at the monitoring centre."""
    if error.code in PAUSE_WORDS:
        return PAUSE_WORDS[error.code]
    if error.code in _OUTAGE_CODES or (error.http_status or 0) in errors.RETRYABLE_HTTP:
        return OUTAGE_WORDS
    return OTHER_WORDS


def _at(unix_s: float) -> datetime:
    return datetime.fromtimestamp(unix_s, UTC)


# -- the facts -----------------------------------------------------------------------------

class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class Process(_Frozen):
    host: str
    pid: int


class PauseFacts(_Frozen):
    code: str
    http_status: int | None
    message: str
    words: str
    since: datetime | None
    next_probe_at: datetime | None


class LaneCounts(_Frozen):
    interactive: int = 0
    bulk: int = 0


class Latency(_Frozen):
    p50_s: float | None = None
    p99_s: float | None = None
    count: int = 0


class LaneLatency(_Frozen):
    interactive: Latency = Latency()
    bulk: Latency = Latency()


class Failure(_Frozen):
    at: datetime
    client_id: str
    iccid: str | None
    code: str
    message: str


class QueueDepth(_Frozen):
    ready: int
    consumers: int


class TypeQueues(_Frozen):
    """A type's queues as a passive declare saw them (None: no such queue, or not read)."""

    work: QueueDepth | None = None
    bulk: QueueDepth | None = None
    parked: QueueDepth | None = None


class OwnerFacts(_Frozen):
    """What the owning process knows about one communicator type."""

    communicator_type: str
    collected_at: datetime
    paused: PauseFacts | None
    calls_per_second: float
    requests_per_second: float
    in_flight: int
    max_concurrency: int
    held: LaneCounts  # taken from the queues by the owner, final signal not yet sent
    parked: int  # in the parked queue, as the owner counts them
    queues: TypeQueues
    waiting: LaneCounts
    backlog: int
    backlog_growing: bool
    oldest_waiting_age_s: float | None
    oldest_waiting_at_least: bool  # jobs are parked: their age is bounded from below
    time_to_final: LaneLatency
    dead_lettered_10m: int
    failures: list[Failure]


class Report(_Frozen):
    """One process's message on ``<prefix>.status``: who it is, what it owns, what it saw."""

    instance: str
    host: str
    pid: int
    version: str
    started_at: datetime
    sent_at: datetime
    owned: list[OwnerFacts]
    queues: dict[str, TypeQueues]  # by communicator type name
    dead_letters: int | None
    stopping: bool = False


# -- the page's facts (GET /status.json) ---------------------------------------------------

State = Literal["running", "paused", "no_owner"]


class ProcessStatus(_Frozen):
    host: str
    pid: int
    version: str
    started_at: datetime
    last_heard_s: float
    owns: list[str]


class TypeStatus(_Frozen):
    name: str
    state: State
    attention: list[str]
    owner: Process | None
    facts_age_s: float | None
    no_owner_for_s: float | None
    standbys: list[Process]
    pause: PauseFacts | None
    calls_per_second: float | None
    requests_per_second: float
    in_flight: int | None
    max_concurrency: int
    waiting: LaneCounts | None
    held: LaneCounts | None
    queued: TypeQueues
    parked: int | None
    backlog: int | None
    backlog_growing: bool
    oldest_waiting_age_s: float | None
    oldest_waiting_at_least: bool
    time_to_final: LaneLatency | None
    dead_lettered_10m: int | None
    failures: list[Failure]


class StatusReport(_Frozen):
    queue_prefix: str
    generated_at: datetime
    served_by: Process
    broker_connected: bool
    refresh_seconds: int
    facts_ttl_seconds: float
    dead_letters: int | None
    processes: list[ProcessStatus]
    communicator_types: list[TypeStatus]


# -- trackers ------------------------------------------------------------------------------

def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty sequence."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


class Finals:
    """Per communicator type: publish → final signal times (10 min, per lane), the last 20
    failures and the dead-lettered ones. Fed by ``History.final``; bounded in size."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._times: dict[tuple[str, Lane], deque[tuple[float, float]]] = {}
        self._failures: dict[str, deque[Failure]] = {}
        self._exhausted: dict[str, deque[float]] = {}

    def record_final(self, job: Job, signal: Signal) -> None:
        """A job's final signal was confirmed."""
        now = self._clock()
        name = job.communicator_type
        if job.received_at > 0:
            ring = self._times.get((name, job.lane))
            if ring is None:
                ring = self._times[(name, job.lane)] = deque(maxlen=MAX_SAMPLES)
            ring.append((now, max(0.0, now - job.received_at)))
        if signal.error is None:
            return
        failures = self._failures.get(name)
        if failures is None:
            failures = self._failures[name] = deque(maxlen=FAILURES_KEPT)
        failures.append(Failure(at=_at(now), client_id=signal.client_id, iccid=signal.iccid,
                                code=signal.error.code, message=signal.error.message))
        if signal.error.code == errors.RETRIES_EXHAUSTED:
            self._exhausted.setdefault(name, deque(maxlen=MAX_SAMPLES)).append(now)

    def latency(self, name: str) -> LaneLatency:
        """p50 and p99 per lane over the last 10 minutes."""
        since = self._clock() - WINDOW_S
        lanes = {}
        for lane in Lane:
            values = sorted(s for t, s in self._times.get((name, lane), ()) if t >= since)
            lanes[lane.value] = Latency(
                p50_s=round(percentile(values, 0.5), 3) if values else None,
                p99_s=round(percentile(values, 0.99), 3) if values else None,
                count=len(values))
        return LaneLatency.model_validate(lanes)

    def failures(self, name: str) -> list[Failure]:
        """The last 20 failures, newest first."""
        return list(reversed(self._failures.get(name, ())))

    def dead_lettered(self, name: str) -> int:
        """Finals that also went to the dead letters (retries ran out) in the last 10 min."""
        since = self._clock() - WINDOW_S
        return sum(1 for t in self._exhausted.get(name, ()) if t >= since)


class Backlog:
    """One type's backlog as its owner sees it over time: "growing" when it is larger than
    30 s ago and not small; and since when jobs are parked (their own ages are not known
    while they wait there, so this bounds the oldest job's age from below)."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()
        self._parked_since: float | None = None

    def add(self, at_s: float, backlog: int, parked: int) -> bool:
        """Record the backlog at monotonic time ``at_s``; True while it grows."""
        self._samples.append((at_s, backlog))
        while len(self._samples) > 1 and self._samples[1][0] <= at_s - TREND_WINDOW_S:
            self._samples.popleft()
        if parked <= 0:
            self._parked_since = None
        elif self._parked_since is None:
            self._parked_since = at_s
        then_s, then = self._samples[0]
        return at_s - then_s >= TREND_WINDOW_S and backlog > then and backlog >= BACKLOG_MIN

    def parked_for(self, at_s: float) -> float | None:
        """Seconds since this owner first saw jobs parked (None: none are)."""
        return None if self._parked_since is None else at_s - self._parked_since


# -- reading the owner ---------------------------------------------------------------------

def owns(worker: Worker) -> bool:
    """This process owns the worker's type: the active consumer of its work queue."""
    return worker._owner is not None  # the worker's only record of its ownership


def collect(worker: Worker, finals: Finals, queues: TypeQueues, backlog: Backlog, *,
            now_s: float | None = None) -> OwnerFacts:
    """The owner's facts about ``worker``'s type. Everything read from the worker is read
    here, so that a change of the worker needs a change of this function only."""
    now = time.time() if now_s is None else now_s
    mono = time.monotonic()
    ct = worker.ct
    pause = worker.pause
    limiter = worker._client.limiter
    held = {Lane.INTERACTIVE: 0, Lane.BULK: 0}
    oldest: float | None = None
    for entry in worker.lanes.entries():
        for member in entry.members:
            if member.settled or member.payload.parked:
                continue  # a parked job is counted in the parked queue
            held[member.job.lane] += 1
            received = member.job.received_at
            if received > 0 and (oldest is None or received < oldest):
                oldest = received
    parked = worker.parking.rules.count
    waiting = LaneCounts(
        interactive=held[Lane.INTERACTIVE] + (queues.work.ready if queues.work else 0),
        bulk=held[Lane.BULK] + (queues.bulk.ready if queues.bulk else 0))
    total = waiting.interactive + waiting.bulk + parked
    growing = backlog.add(mono, total, parked)
    oldest_age = None if oldest is None else now - oldest
    at_least = False
    if parked > 0:  # parked jobs have waited at least as long as the pause, or as we saw them
        bounds = [b for b in (backlog.parked_for(mono),
                              None if pause.since is None else now - pause.since)
                  if b is not None]
        if bounds and (oldest_age is None or max(bounds) > oldest_age):
            oldest_age, at_least = max(bounds), True
    paused = None
    if pause.error is not None:
        paused = PauseFacts(
            code=pause.error.code, http_status=pause.error.http_status,
            message=pause.error.message, words=pause_words(pause.error),
            since=None if pause.since is None else _at(pause.since),
            next_probe_at=None if pause.next_probe_at is None else _at(pause.next_probe_at))
    return OwnerFacts(
        communicator_type=ct.name, collected_at=_at(now), paused=paused,
        calls_per_second=round(limiter.calls_per_second(CALLS_WINDOW_S), 2),
        requests_per_second=ct.requests_per_second, in_flight=limiter.in_flight,
        max_concurrency=ct.max_concurrency,
        held=LaneCounts(interactive=held[Lane.INTERACTIVE], bulk=held[Lane.BULK]),
        parked=parked, queues=queues, waiting=waiting, backlog=total, backlog_growing=growing,
        oldest_waiting_age_s=None if oldest_age is None else round(oldest_age, 1),
        oldest_waiting_at_least=at_least, time_to_final=finals.latency(ct.name),
        dead_lettered_10m=finals.dead_lettered(ct.name), failures=finals.failures(ct.name))


# -- the page ------------------------------------------------------------------------------

def assemble(
    settings: Settings, heard: Iterable[tuple[Report, float]], *, me: Process,
    no_owner_s: Mapping[str, float], broker_connected: bool, refresh_s: int,
    ttl_s: float, now_s: float | None = None,
) -> StatusReport:
    """The page's facts from the reports heard (each with its age in s; older than
    ``ttl_s`` counts as gone). ``no_owner_s``: per type, seconds since an owner of it was
    last heard (or since this process started listening)."""
    now = time.time() if now_s is None else now_s
    live = sorted(((r, age) for r, age in heard if age <= ttl_s and not r.stopping),
                  key=lambda ra: ra[1])  # freshest first
    owners: dict[str, tuple[Report, OwnerFacts, float]] = {}
    queues: dict[str, TypeQueues] = {}
    dead: int | None = None
    for report, age in live:
        for facts in report.owned:
            owners.setdefault(facts.communicator_type, (report, facts, age))
        for name, q in report.queues.items():
            queues.setdefault(name, q)
        if dead is None:
            dead = report.dead_letters
    types = []
    for ct in settings.communicator_types:
        owner = owners.get(ct.name)
        standbys = sorted((Process(host=r.host, pid=r.pid) for r, _ in live
                           if owner is None or r.instance != owner[0].instance),
                          key=lambda p: (p.host, p.pid))
        if owner is None:
            q = queues.get(ct.name, TypeQueues())
            gone = no_owner_s.get(ct.name, 0.0)
            types.append(TypeStatus(
                name=ct.name, state="no_owner", attention=[f"no owner for {gone:.0f} s"],
                owner=None, facts_age_s=None, no_owner_for_s=round(gone, 1),
                standbys=standbys, pause=None, calls_per_second=None,
                requests_per_second=ct.requests_per_second, in_flight=None,
                max_concurrency=ct.max_concurrency, waiting=None, held=None, queued=q,
                parked=q.parked.ready if q.parked else None, backlog=None,
                backlog_growing=False, oldest_waiting_age_s=None,
                oldest_waiting_at_least=False, time_to_final=None, dead_lettered_10m=None,
                failures=[]))
            continue
        report, f, age = owner
        attention = (["paused"] if f.paused else []) + (
            ["backlog growing"] if f.backlog_growing else [])
        types.append(TypeStatus(
            name=ct.name, state="paused" if f.paused else "running", attention=attention,
            owner=Process(host=report.host, pid=report.pid), facts_age_s=round(age, 1),
            no_owner_for_s=None, standbys=standbys, pause=f.paused,
            calls_per_second=f.calls_per_second, requests_per_second=f.requests_per_second,
            in_flight=f.in_flight, max_concurrency=f.max_concurrency, waiting=f.waiting,
            held=f.held, queued=f.queues, parked=f.parked, backlog=f.backlog,
            backlog_growing=f.backlog_growing, oldest_waiting_age_s=f.oldest_waiting_age_s,
            oldest_waiting_at_least=f.oldest_waiting_at_least, time_to_final=f.time_to_final,
            dead_lettered_10m=f.dead_lettered_10m, failures=f.failures))
    processes = [ProcessStatus(host=r.host, pid=r.pid, version=r.version,
                               started_at=r.started_at, last_heard_s=round(age, 1),
                               owns=[f.communicator_type for f in r.owned])
                 for r, age in sorted(live, key=lambda ra: (ra[0].host, ra[0].pid))]
    return StatusReport(
        queue_prefix=settings.queue_prefix, generated_at=_at(now), served_by=me,
        broker_connected=broker_connected, refresh_seconds=refresh_s, facts_ttl_seconds=ttl_s,
        dead_letters=dead, processes=processes, communicator_types=types)
