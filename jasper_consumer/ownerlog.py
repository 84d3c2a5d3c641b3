"""The ownership log of a communicator type: ``<prefix>.owner.<slug>``, a quorum queue of
small JSON records that only the type's owner writes. It holds two facts that must
outlive a process (operator guide, section 4, Order and crashes):

* **whether the previous owner let go cleanly.** A new owner writes ``owned`` before its
  first call; an owner that stops on SIGTERM writes ``released`` once its last call has
  ended. The next owner reads the log: an ``owned`` without its ``released`` means the
  previous owner crashed or lost its connection and may still have a request open, so
  the new one waits one call interval plus the request timeout before its first call.
  A ``released`` one, or an empty log (the type's first owner ever), lets it call at once.
* **the guards.** A guard ``(ICCID, stamp, event id)`` says that a job for the SIM was
  applied while another queue might still hold an older one; that older one, whoever
  gets it, is superseded instead of applied (:mod:`.lanes`). Guards are written before
  the call they protect and read back by every new owner.

Records::

    {"kind": "owned", "owner": "<uuid>", "host": "...", "pid": 1234, "at": 1733490000.1}
    {"kind": "released", "owner": "<uuid>", "at": 1733490100.2, "not_before": 1733490100.4}
    {"kind": "guards", "guards": [["8961...", 1000000000042, "event-id"], ...]}

A take-over reads every record (``basic.get``, held unacked), writes what is still true
(the guards, and its own ``owned``), then acks what it read: a crash in between leaves a
superset, which is harmless (an extra guard only supersedes a job older than one that
was applied or will be). :meth:`OwnerLog.compact` does the same when guards are dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from .edge import Acks
from .history import History

log = logging.getLogger(__name__)

MAX_RECORDS = 200_000  # read at most this many records at a take-over (a log this long is a bug)
GuardRecord = tuple[str, int, str]  # (ICCID, stamp, event id)


@dataclass(frozen=True)
class Reading:
    """What a new owner learns from the log."""

    must_wait: bool  # a previous owner may still have a call open
    first_ever: bool  # the log was empty
    guards: dict[str, tuple[int, str]] = field(default_factory=dict)  # ICCID -> (stamp, id)
    previous: str = ""  # the last owner's host and pid, for the log line
    unreadable: int = 0  # records that were not one of the shapes above (ignored)
    not_before: float = 0.0  # unix time: a clean hand-over's last call's start + one interval


def read(bodies: Iterable[bytes]) -> Reading:
    """Decide from the log's records (oldest first); no I/O."""
    owned: dict[str, str] = {}
    released: set[str] = set()
    guards: dict[str, tuple[int, str]] = {}
    unreadable = count = 0
    previous = ""
    not_before = 0.0
    for body in bodies:
        count += 1
        try:
            record = json.loads(body)
            kind = record["kind"]
            if kind == "owned":
                owned[str(record["owner"])] = previous = \
                    f"{record.get('host', '?')} pid {record.get('pid', '?')}"
            elif kind == "released":
                released.add(str(record["owner"]))
                not_before = max(not_before, float(record.get("not_before") or 0.0))
            elif kind == "guards":
                for iccid, stamp, event_id in record["guards"]:
                    current = guards.get(str(iccid))
                    if current is None or int(stamp) > current[0]:
                        guards[str(iccid)] = (int(stamp), str(event_id))
            else:
                unreadable += 1
        except (ValueError, KeyError, TypeError, RecursionError):
            unreadable += 1
    return Reading(must_wait=bool(set(owned) - released), first_ever=count == 0,
                   guards=guards, previous=previous, unreadable=unreadable,
                   not_before=not_before)


def owned_record(owner: str) -> bytes:
    return json.dumps({"kind": "owned", "owner": owner, "host": socket.gethostname(),
                       "pid": os.getpid(), "at": time.time()}).encode()


def released_record(owner: str, not_before: float = 0.0) -> bytes:
    """``not_before``: unix time before which the next owner must not start a call (the
    account's spacing across the hand-over)."""
    return json.dumps({"kind": "released", "owner": owner, "at": time.time(),
                       "not_before": not_before}).encode()


def guards_record(guards: Iterable[GuardRecord]) -> bytes:
    return json.dumps({"kind": "guards", "guards": [list(g) for g in guards]}).encode()


class OwnerLog:
    """One type's ownership log, seen from the process that owns (or takes) the type."""

    def __init__(self, queue_name: str, publisher: History,
                 open_channel: Callable[[], Awaitable[AbstractChannel]], acks: Acks) -> None:
        self.queue_name = queue_name
        self._acks = acks
        self._publisher = publisher
        self._open_channel = open_channel
        self.owner = ""  # this ownership's id, once taken
        self.appended = 0  # guard records written since the last compaction

    async def take_over(self, guards: Callable[[Reading], Iterable[GuardRecord]]
                        ) -> Reading:
        """Read the log, then write what stays true: ``guards(reading)`` (the guards to
        keep) and this process's ``owned``; then ack what was read."""
        self.owner = uuid.uuid4().hex
        return await self._rewrite(guards, owned=True)

    async def compact(self, guards: Iterable[GuardRecord]) -> None:
        """Replace the log by ``guards`` and this ownership's ``owned`` record."""
        kept = list(guards)
        await self._rewrite(lambda _: kept, owned=True)

    async def append(self, guards: Iterable[GuardRecord]) -> None:
        """Write guards (returns once the broker has confirmed them)."""
        await self._write(guards_record(guards))
        self.appended += 1

    async def release(self, not_before: float = 0.0) -> None:
        """This owner has let go cleanly: no call of it is open any more, and the next may
        start at ``not_before`` (unix time)."""
        if self.owner:
            await self._write(released_record(self.owner, not_before))

    async def _write(self, body: bytes) -> None:
        await self._publisher.to_queue(self.queue_name, body, None)

    async def _rewrite(self, keep: Callable[[Reading], Iterable[GuardRecord]], *,
                       owned: bool) -> Reading:
        channel = await self._open_channel()
        try:
            queue = await channel.get_queue(self.queue_name, ensure=False)
            got: list[AbstractIncomingMessage] = []
            while len(got) < MAX_RECORDS:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                got.append(message)
            reading = read(m.body for m in got)
            if reading.unreadable:
                log.warning("ownership log %s: %d unreadable record(s) ignored",
                            self.queue_name, reading.unreadable)
            kept = list(keep(reading))
            if kept:
                await self._write(guards_record(kept))
            if owned:
                await self._write(owned_record(self.owner))
            if got and not await self._acks.ack(got[-1], multiple=True):
                raise RuntimeError(f"could not ack the records read from {self.queue_name} "
                                   "(its channel was lost)")  # the take-over gives it back
            self.appended = 0
            return reading
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
