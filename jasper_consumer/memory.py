"""The memory of recent outcomes: by identity (``event_id``, ICCID, command) and the newest
stamp applied per SIM, bounded in bytes, the oldest forgotten first. It lives in one
process (a crash loses it); :mod:`.lanes` uses it to repeat a duplicate's outcome without
a call and to supersede an older job (operator guide, section 4, Order and crashes)."""

from __future__ import annotations

import sys

from .config import Command
from .events import Job
from .outcomes import Outcome

Identity = tuple[str, str, Command]


def identity(job: Job) -> Identity:
    return (job.event_id, job.iccid, job.command)


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
