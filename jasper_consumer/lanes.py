"""Order per SIM, coalescing, interactive first, and the memory of recent outcomes: no
I/O, no tasks.

A *lane* is the queue of work for one ICCID; each item is an :class:`Entry`: one API
call (a command for that SIM) and the jobs it serves (its *members*). The worker tells
:class:`Lanes` what happens — :meth:`~Lanes.deliver`, :meth:`~Lanes.start`,
:meth:`~Lanes.finish`, :meth:`~Lanes.settled` — and performs what it answers. Rules:

* **order** — an entry starts only when it is at the head of its lane, and the next entry
  of the lane only after the previous one is *settled* (every member's signal confirmed
  and its message acked or moved on), so no crash can leave a later job for the SIM
  acked and an earlier one waiting;
* **coalescing** — a job joins the lane's *last* entry when that entry is for the same
  command and its call is queued or in flight: no other command for the SIM lies
  between them. A finished entry, a remembered outcome or a superseded job never takes
  followers; a duplicate of a job already in the lane (same identity) joins its entry;
* **identity** — a job is (``event_id``, ICCID, command) (docs/asyncapi.yaml): an outcome is reused
  only for the same identity, never for another SIM or command;
* **newer wins** — a job whose router stamp is older than one already applied or queued
  for its SIM is not applied (``SUPERSEDED``); stamps are compared only when both are
  known (a stamp of 0 is "unknown": old messages, hand-made jobs);
* **interactive first** — every entry is interactive or bulk (:class:`~.events.Lane`); an
  entry whose lane holds an interactive job is served as interactive (it stands in the
  way of one). :class:`Share` says which class takes the account's next call;
* **cleared** — an entry starts only once no *other source* (the bulk queue, the work
  queue beyond the owner's prefetch, the parked queue beyond what it drains) may still
  deliver an older job for its SIM: the worker passes those doubts to :meth:`deliver`
  and removes them with :meth:`resolve` (the source was seen drained) or
  :meth:`guarded` (a *guard* for the SIM is written to the broker, so that an older job
  that comes later, to this process or to the next owner, is superseded);
* **memory** — :class:`~.memory.Memory` keeps outcomes by identity and the newest stamp per SIM,
  bounded in bytes, oldest forgotten first. Guards are kept apart from it and never
  forgotten while a source may still hold an older job (see docs/operator-guide.md,
  "Order and crashes").
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, TypeVar

from .config import Command
from .events import Job, Lane
from .memory import Identity, Memory, identity, intern
from .outcomes import Outcome, superseded

M = TypeVar("M")  # what the worker keeps per member (the job and its message)


class Source(Enum):
    """Where a job can come from besides the one it came from (see *cleared* above)."""

    WORK = "work"  # the work queue, beyond the owner's prefetch window
    BULK = "bulk"  # the bulk queue
    PARKED = "parked"  # the parked queue, beyond what the owner drains


class State(Enum):
    QUEUED = "queued"
    STARTED = "started"
    DONE = "done"


@dataclass(eq=False)
class Member(Generic[M]):
    job: Job
    payload: M
    settled: bool = False


@dataclass(eq=False)
class Entry(Generic[M]):
    """One API call for one ICCID and command, and the jobs (members) it serves."""

    iccid: str
    command: Command
    seq: int
    members: list[Member[M]] = field(default_factory=list)
    state: State = State.QUEUED
    outcome: Outcome | None = None
    attempts: int = 0  # calls made for it by tries that the type's pause interrupted
    lane: Lane = Lane.BULK  # interactive once any member is
    doubts: dict[Source, int] = field(default_factory=dict)  # source -> clock of the doubt

    def __lt__(self, other: Entry[M]) -> bool:  # heap order: oldest first
        return self.seq < other.seq

    @property
    def leader(self) -> Job:
        return self.members[0].job

    def identities(self) -> Iterator[Identity]:
        return (identity(m.job) for m in self.members)


@dataclass(frozen=True)
class Immediate(Generic[M]):
    """Settle at once, without a call: a remembered duplicate or a superseded job."""

    outcome: Outcome
    coalesced: bool = False


@dataclass(frozen=True)
class Placed(Generic[M]):
    """The job is a member of ``entry``; ``joined`` when it shares an existing call."""

    entry: Entry[M]
    joined: bool


class Share:
    """Which class of job takes the account's next call: interactive first; while both
    wait, bulk at least ``min_share`` of the calls (a deficit counter), so it never
    starves; with no interactive job waiting, bulk takes every call."""

    def __init__(self, min_share: float) -> None:
        self.min_share = min_share
        self._credit = 0.0

    def pick(self, interactive: bool, bulk: bool) -> Lane | None:
        if interactive and bulk:
            self._credit += self.min_share
            if self._credit >= 1.0 - 1e-9:
                self._credit -= 1.0
                return Lane.BULK
            return Lane.INTERACTIVE
        self._credit = 0.0
        if interactive:
            return Lane.INTERACTIVE
        return Lane.BULK if bulk else None


@dataclass(frozen=True, slots=True)
class Guard:
    """A job for the SIM, newer than ``stamp`` excluded, was (or is about to be) applied
    while another source might still deliver older ones: those are superseded."""

    stamp: int
    event_id: str
    clock: int  # Lanes.clock when it was made
    sources: frozenset[Source]  # the sources it guards against (in doubt when it was made)


class Lanes(Generic[M]):
    """Every lane of one communicator type; see the module docstring."""

    def __init__(self, memory: Memory | None = None) -> None:
        self.memory = memory if memory is not None else Memory()
        self.guards: dict[str, Guard] = {}
        self.clock = 0  # counts deliveries and guards: orders them against drains
        self._lanes: dict[str, list[Entry[M]]] = {}
        self._ready: dict[Lane, list[Entry[M]]] = {Lane.INTERACTIVE: [], Lane.BULK: []}
        self._seq = 0

    def __len__(self) -> int:
        """Entries not yet settled, in every lane."""
        return sum(len(lane) for lane in self._lanes.values())

    def entries(self) -> Iterator[Entry[M]]:
        for lane in self._lanes.values():
            yield from lane

    # -- events ----------------------------------------------------------------------------

    def deliver(self, job: Job, payload: M,
                doubts: Collection[Source] = ()) -> Immediate[M] | Placed[M]:
        """A job arrived (in delivery order): where it goes. ``doubts``: the sources that
        may still deliver an older job for its SIM (see *cleared*)."""
        self.clock += 1
        lane = self._lanes.get(job.iccid)
        key = identity(job)
        placed: Placed[M] | None = None
        if lane:
            for waiting in lane:  # a duplicate of a job already in the lane shares its call
                if waiting.state is not State.DONE and key in waiting.identities():
                    placed = Placed(waiting, joined=True)
                    break
        if placed is None:
            immediate = self._known(job, lane)
            if immediate is not None:
                return immediate
            last = lane[-1] if lane else None
            # A job in doubt joins only a call not started yet: its own guard must be
            # written before the call that serves it.
            if (last is not None and last.command is job.command
                    and (last.state is State.QUEUED
                         or (last.state is State.STARTED and not doubts))):
                placed = Placed(last, joined=True)
        if placed is None:
            self._seq += 1
            entry: Entry[M] = Entry(job.iccid, job.command, self._seq, lane=job.lane)
            if lane is None:
                lane = self._lanes[job.iccid] = []
            lane.append(entry)
            placed = Placed(entry, joined=False)
        entry = placed.entry
        entry.members.append(Member(job, payload))
        if entry.state is State.QUEUED:
            for source in doubts:
                entry.doubts[source] = self.clock
        if job.lane is Lane.INTERACTIVE:
            entry.lane = Lane.INTERACTIVE
        assert lane is not None
        self._push(lane[0], lane)
        return placed

    def known(self, job: Job) -> Immediate[M] | None:
        """What :meth:`deliver` would settle at once for ``job`` (a remembered duplicate, a
        superseded job), without placing it; None when it needs a call."""
        return self._known(job, self._lanes.get(job.iccid))

    def _known(self, job: Job, lane: list[Entry[M]] | None) -> Immediate[M] | None:
        if not job.replayed:
            known = self.memory.outcome(identity(job))
            if known is not None:
                return Immediate(Outcome(known.result, known.sim_status, known.error, 0))
        newer = self._newer(job, lane)
        if newer is not None:
            return Immediate(superseded(newer))
        return None

    def _newer(self, job: Job, lane: list[Entry[M]] | None) -> str | None:
        """The event id of a newer job applied, guarded or queued for the SIM, if any."""
        if not job.stamp:
            return None
        best: tuple[int, str] | None = self.memory.newest(job.iccid)
        guard = self.guards.get(job.iccid)
        if guard is not None and (best is None or guard.stamp > best[0]):
            best = (guard.stamp, guard.event_id)
        for entry in lane or ():
            for member in entry.members:
                if member.job.stamp and (best is None or member.job.stamp > best[0]):
                    best = (member.job.stamp, member.job.event_id)
        if best is not None and best[0] > job.stamp:
            return best[1]
        return None

    # -- choosing the next call ------------------------------------------------------------

    def _push(self, head: Entry[M], lane: list[Entry[M]]) -> None:
        """Offer a lane's head to the class(es) that may start it."""
        if head.state is not State.QUEUED or head.doubts:
            return
        heapq.heappush(self._ready[Lane.BULK if head.lane is Lane.BULK else Lane.INTERACTIVE],
                       head)
        if head.lane is Lane.BULK and any(e.lane is Lane.INTERACTIVE for e in lane):
            heapq.heappush(self._ready[Lane.INTERACTIVE], head)  # it stands in the way

    def _peek(self, lane: Lane) -> Entry[M] | None:
        heap = self._ready[lane]
        while heap:
            entry = heap[0]
            if entry.state is State.QUEUED and not entry.doubts and self._is_head(entry):
                return entry
            heapq.heappop(heap)
        return None

    def waiting(self, lane: Lane) -> bool:
        """Whether an entry of ``lane`` could start now."""
        return self._peek(lane) is not None

    def next_ready(self, lane: Lane | None = None) -> Entry[M] | None:
        """The oldest entry of ``lane`` (default: of either, interactive first) that may
        start now, or None; it is taken off the ready list (:meth:`start` it)."""
        for which in ((lane,) if lane is not None else (Lane.INTERACTIVE, Lane.BULK)):
            entry = self._peek(which)
            if entry is not None:
                heapq.heappop(self._ready[which])
                return entry
        return None

    def _is_head(self, entry: Entry[M]) -> bool:
        lane = self._lanes.get(entry.iccid)
        return bool(lane) and lane[0] is entry  # type: ignore[index]

    # -- doubts and guards -----------------------------------------------------------------

    def uncleared(self) -> list[Entry[M]]:
        """Queued entries that may not start yet: a source may still hold an older job."""
        return [e for e in self.entries() if e.doubts and e.state is State.QUEUED]

    def resolve(self, source: Source, upto: int) -> None:
        """``source`` was seen drained (every job it held delivered and settled) after
        clock ``upto``: doubts on it from then or before are gone."""
        for lane in self._lanes.values():
            for entry in lane:
                if entry.doubts.get(source, upto + 1) <= upto:
                    del entry.doubts[source]
            if lane:
                self._push(lane[0], lane)

    def guard_for(self, entry: Entry[M]) -> tuple[int, int, str]:
        """(clock, stamp, event id) of the guard the entry needs: take it before writing the
        guard, and pass it to :meth:`guarded` once the broker has confirmed it."""
        newest = max(entry.members, key=lambda m: m.job.stamp).job
        self.clock += 1
        return self.clock, newest.stamp, newest.event_id

    def guarded(self, entry: Entry[M], clock: int, stamp: int, event_id: str) -> None:
        """The guard from :meth:`guard_for` is in the broker: doubts up to ``clock`` go
        (a job that joined meanwhile keeps its own)."""
        cleared = frozenset(s for s, at in entry.doubts.items() if at <= clock)
        current = self.guards.get(entry.iccid)
        if stamp and (current is None or stamp >= current.stamp):
            self.guards[entry.iccid] = Guard(stamp, event_id, clock, cleared | (
                current.sources if current is not None else frozenset()))
        for source in cleared:
            del entry.doubts[source]
        lane = self._lanes.get(entry.iccid)
        if lane:
            self._push(lane[0], lane)

    def forget_guards(self, drained_at: Mapping[Source, int]) -> int:
        """A source seen drained at clock ``drained_at[source]`` can deliver no job older
        than those delivered before: a guard goes once every source it guards against was
        seen drained after it was made. Returns how many went."""
        gone = [iccid for iccid, g in self.guards.items()
                if all(drained_at.get(s, -1) >= g.clock for s in g.sources)]
        for iccid in gone:
            del self.guards[iccid]
        return len(gone)

    def load_guards(self, guards: Iterable[tuple[str, int, str]]) -> None:
        """Guards read back from the broker at a take-over."""
        for iccid, stamp, event_id in guards:
            current = self.guards.get(iccid)
            if current is None or stamp > current.stamp:  # against whatever it was
                self.guards[iccid] = Guard(stamp, event_id, self.clock, frozenset(Source))

    # -- calls -----------------------------------------------------------------------------

    def start(self, entry: Entry[M]) -> None:
        assert entry.state is State.QUEUED, entry
        assert self._is_head(entry), entry
        assert not entry.doubts, entry
        entry.state = State.STARTED

    def finish(self, entry: Entry[M], outcome: Outcome) -> None:
        """The call ended: every member gets ``outcome``; it is remembered per identity."""
        assert entry.state is State.STARTED, entry
        entry.state = State.DONE
        entry.outcome = outcome
        stored = intern(outcome)
        for member in entry.members:
            self.memory.record(member.job, stored)

    def settled(self, entry: Entry[M], member: Member[M]) -> bool:
        """One member's message is settled; True when the entry is gone from its lane."""
        member.settled = True
        if entry.state is not State.DONE or not all(m.settled for m in entry.members):
            return False
        self._remove(entry)
        return True

    def _remove(self, entry: Entry[M]) -> None:
        lane = self._lanes[entry.iccid]
        lane.remove(entry)
        if not lane:
            del self._lanes[entry.iccid]
        else:
            self._push(lane[0], lane)

    def iccids(self) -> list[str]:
        return list(self._lanes)

    def lane(self, iccid: str) -> list[Entry[M]]:
        return list(self._lanes.get(iccid, ()))

    def unstart(self, entry: Entry[M]) -> None:
        """A started call did not apply (the type paused under it): it waits again."""
        assert entry.state is State.STARTED, entry
        entry.state = State.QUEUED
        lane = self._lanes[entry.iccid]
        self._push(lane[0], lane)

    def take_queued(self, iccid: str) -> list[Entry[M]]:
        """Remove and return the SIM's entries whose call has not started, in order (the
        type paused: their jobs move to the parked queue). An entry whose call is under
        way stays; it follows once its call ends, if it did not apply."""
        lane = self._lanes.get(iccid)
        if not lane:
            return []
        taken = [e for e in lane if e.state is State.QUEUED]
        if not taken:
            return []
        kept = [e for e in lane if e.state is not State.QUEUED]
        if kept:
            self._lanes[iccid] = kept
        else:
            del self._lanes[iccid]
        return taken

    def drop(self, keep: Callable[[M], bool]) -> int:
        """Forget members whose payload ``keep`` rejects, in entries not started (their
        messages went back to the broker); entries left without members go. Returns the
        number of members forgotten."""
        dropped = 0
        for iccid in list(self._lanes):
            lane = self._lanes[iccid]
            for entry in list(lane):
                if entry.state is not State.QUEUED:
                    continue
                before = len(entry.members)
                entry.members = [m for m in entry.members if keep(m.payload)]
                dropped += before - len(entry.members)
                if not entry.members:
                    lane.remove(entry)
            if not lane:
                del self._lanes[iccid]
            else:
                self._push(lane[0], lane)
        return dropped

    def counts(self) -> dict[Lane, int]:
        """Jobs waiting for a call, per class (for the status page)."""
        out = {Lane.INTERACTIVE: 0, Lane.BULK: 0}
        for entry in self.entries():
            if entry.state is State.QUEUED:
                for member in entry.members:
                    out[member.job.lane] += 1
        return out

    def clear(self) -> None:
        """Forget every lane and guard (ownership lost: the broker redelivers their
        messages, and the guards are in the broker for the next owner)."""
        self._lanes.clear()
        for heap in self._ready.values():
            heap.clear()
        self.guards.clear()
