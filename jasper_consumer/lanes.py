"""Order per SIM, coalescing and the memory of recent outcomes: no I/O, no tasks.

A *lane* is the queue of work for one ICCID; each item is an :class:`Entry`: one API
call (a command for that SIM) and the jobs it serves (its *members*). The worker tells
:class:`Lanes` what happens — :meth:`~Lanes.deliver`, :meth:`~Lanes.start`,
:meth:`~Lanes.finish`, :meth:`~Lanes.settle` — and performs what it answers. Rules:

* **order** — an entry starts only when it is at the head of its lane, and the next entry
  of the lane only after the previous one is *settled* (every member's signal confirmed
  and its message acked or moved on), so no crash can leave a later job for the SIM
  acked and an earlier one waiting;
* **coalescing** — a job joins the lane's *last* entry when that entry is for the same
  command and its call is queued or in flight: no other command for the SIM lies
  between them. A finished entry, a remembered outcome or a superseded job never takes
  followers; a duplicate of a job already in the lane (same identity) joins its entry;
* **identity** — a job is (``event_id``, ICCID, command) (SPEC §3): an outcome is reused
  only for the same identity, never for another SIM or command;
* **newer wins** — a job whose router stamp is older than one already applied or queued
  for its SIM is not applied (``SUPERSEDED``); stamps are compared only when both are
  known (a stamp of 0 is "unknown": old messages, hand-made jobs);
* **memory** — :class:`Memory` keeps outcomes by identity and the newest stamp per SIM,
  bounded in bytes, oldest forgotten first. It lives in one process: a crash loses it
  (see docs/operator-guide.md, "Order and crashes", for what that means).
"""

from __future__ import annotations

import heapq
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, TypeVar

from .config import Command
from .events import Job
from .outcomes import Outcome, superseded

M = TypeVar("M")  # what the worker keeps per member (the job and its message)
Identity = tuple[str, str, Command]


def identity(job: Job) -> Identity:
    return (job.event_id, job.iccid, job.command)


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


class Memory:
    """Recent outcomes by identity and the newest applied stamp per ICCID, bounded in bytes."""

    _ENTRY_OVERHEAD = 160  # dict slot, key tuple and bookkeeping, measured with tracemalloc

    def __init__(self, max_bytes: int = 4 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._outcomes: dict[Identity, tuple[Outcome, int]] = {}
        self._newest: dict[str, tuple[int, str, int]] = {}  # iccid -> (stamp, event_id, size)

    def __len__(self) -> int:
        return len(self._outcomes)

    def outcome(self, key: Identity) -> Outcome | None:
        found = self._outcomes.get(key)
        return found[0] if found is not None else None

    def newest(self, iccid: str) -> tuple[int, str] | None:
        found = self._newest.get(iccid)
        return (found[0], found[1]) if found is not None else None

    def record(self, job: Job, outcome: Outcome) -> None:
        key = identity(job)
        size = (self._ENTRY_OVERHEAD + sys.getsizeof(job.event_id) + sys.getsizeof(job.iccid)
                + _outcome_size(outcome))
        old = self._outcomes.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._outcomes[key] = (outcome, size)
        self.bytes += size
        if job.stamp:
            current = self._newest.get(job.iccid)
            if current is None or job.stamp > current[0]:
                nsize = self._ENTRY_OVERHEAD + sys.getsizeof(job.iccid) + sys.getsizeof(
                    job.event_id)
                if current is not None:
                    self.bytes -= current[2]
                    del self._newest[job.iccid]
                self._newest[job.iccid] = (job.stamp, job.event_id, nsize)
                self.bytes += nsize
        self._trim()

    def _trim(self) -> None:
        while self.bytes > self.max_bytes and (self._outcomes or self._newest):
            # Forget the older half of what is oldest in either table, one at a time.
            if self._outcomes and (len(self._outcomes) >= len(self._newest) or not self._newest):
                _, (_, size) = next(iter(self._outcomes.items()))
                del self._outcomes[next(iter(self._outcomes))]
            else:
                _, (_, _, size) = next(iter(self._newest.items()))
                del self._newest[next(iter(self._newest))]
            self.bytes -= size


_INTERNED: dict[Outcome, Outcome] = {}


def _outcome_size(outcome: Outcome) -> int:
    """Successes are shared values (one per status and attempt count): they cost nothing."""
    if outcome.error is None:
        return 0
    return outcome.size()


def intern(outcome: Outcome) -> Outcome:
    """One shared instance per distinct success (status, attempts): 10,000 remembered
    successes keep one object alive, not 10,000."""
    if outcome.error is not None or outcome.attempts > 16:
        return outcome
    return _INTERNED.setdefault(outcome, outcome)


class Lanes(Generic[M]):
    """Every lane of one communicator type; see the module docstring."""

    def __init__(self, memory: Memory | None = None) -> None:
        self.memory = memory or Memory()
        self._lanes: dict[str, list[Entry[M]]] = {}
        self._ready: list[Entry[M]] = []
        self._seq = 0

    def __len__(self) -> int:
        """Entries not yet settled, in every lane."""
        return sum(len(lane) for lane in self._lanes.values())

    def entries(self) -> Iterator[Entry[M]]:
        for lane in self._lanes.values():
            yield from lane

    # -- events ----------------------------------------------------------------------------

    def deliver(self, job: Job, payload: M) -> Immediate[M] | Placed[M]:
        """A job arrived (in delivery order): where it goes."""
        lane = self._lanes.get(job.iccid)
        key = identity(job)
        if lane:
            for waiting in lane:  # a duplicate of a job already in the lane shares its call
                if waiting.state is not State.DONE and key in waiting.identities():
                    waiting.members.append(Member(job, payload))
                    return Placed(waiting, joined=True)
        immediate = self._known(job, lane)
        if immediate is not None:
            return immediate
        if lane:
            last = lane[-1]
            if last.command is job.command and last.state is not State.DONE:
                last.members.append(Member(job, payload))
                return Placed(last, joined=True)
        self._seq += 1
        entry: Entry[M] = Entry(job.iccid, job.command, self._seq, [Member(job, payload)])
        if lane is None:
            lane = self._lanes[job.iccid] = []
        lane.append(entry)
        if len(lane) == 1:
            heapq.heappush(self._ready, entry)
        return Placed(entry, joined=False)

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
        """The event id of a newer job applied or queued for the SIM, if any."""
        if not job.stamp:
            return None
        best: tuple[int, str] | None = self.memory.newest(job.iccid)
        for entry in lane or ():
            for member in entry.members:
                if member.job.stamp and (best is None or member.job.stamp > best[0]):
                    best = (member.job.stamp, member.job.event_id)
        if best is not None and best[0] > job.stamp:
            return best[1]
        return None

    def next_ready(self) -> Entry[M] | None:
        """The oldest entry that may start now, or None."""
        while self._ready:
            entry = heapq.heappop(self._ready)
            if entry.state is State.QUEUED and self._is_head(entry):
                return entry
        return None

    def _is_head(self, entry: Entry[M]) -> bool:
        lane = self._lanes.get(entry.iccid)
        return bool(lane) and lane[0] is entry  # type: ignore[index]

    def start(self, entry: Entry[M]) -> None:
        assert entry.state is State.QUEUED, entry
        assert self._is_head(entry), entry
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
        elif lane[0].state is State.QUEUED:
            heapq.heappush(self._ready, lane[0])

    def iccids(self) -> list[str]:
        return list(self._lanes)

    def lane(self, iccid: str) -> list[Entry[M]]:
        return list(self._lanes.get(iccid, ()))

    def unstart(self, entry: Entry[M]) -> None:
        """A started call did not apply (the type paused under it): it waits again."""
        assert entry.state is State.STARTED, entry
        entry.state = State.QUEUED
        heapq.heappush(self._ready, entry)

    def take_lane(self, iccid: str) -> list[Entry[M]]:
        """Remove the SIM's lane if no call of it is under way (the type paused: its jobs
        move to the parked queue, in order); [] if one is."""
        lane = self._lanes.get(iccid)
        if not lane or any(e.state is not State.QUEUED for e in lane):
            return []
        del self._lanes[iccid]
        return lane

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
            elif lane[0].state is State.QUEUED:
                heapq.heappush(self._ready, lane[0])
        return dropped

    def clear(self) -> None:
        """Forget every lane (ownership lost: the broker redelivers their messages)."""
        self._lanes.clear()
        self._ready.clear()
