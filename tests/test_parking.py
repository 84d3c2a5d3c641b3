"""Parking's decisions (parking.ParkRules) with the lanes, without I/O.

The stateful test drives ParkRules and Lanes the way the worker does, against a model of
the work and parked queues, a history exchange and an account whose key can be broken
and fixed: deliveries, moves to the parked queue (a publish that the broker confirms or
not, then an ack), pauses, resumes, re-pauses while draining, crashes and hand-backs
(channels closed: unacked messages return to the head, in order), and a tiny memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jasper_consumer.config import Command
from jasper_consumer.events import Job, Lane
from jasper_consumer.lanes import Immediate, Lanes, Source, State
from jasper_consumer.memory import Memory, identity
from jasper_consumer.outcomes import Outcome
from jasper_consumer.parking import BulkMode, ParkRules

A, B = "89610185000000000001", "89610185000000000002"
ACT, DEACT = Command.ACTIVATE, Command.DEACTIVATE
WINDOW = 3  # the owner's prefetch on the work queue, and on the parked queue


def job(n: int, iccid: str, command: Command) -> Job:
    return Job(event_id=f"e{n}", event_code=65516, client_id="c", command=command,
               iccid=iccid, communicator_type="T", stamp=n, lane=Lane.INTERACTIVE)


def test_parking_is_active_while_paused_or_while_jobs_wait_there():
    """A pause, or a parked queue that is not empty, sends new jobs there."""
    rules = ParkRules()
    j = job(1, A, ACT)

    assert not rules.wants(j, paused=False, lane_here=False, known=False)
    assert rules.wants(j, paused=True, lane_here=False, known=False)
    rules.parked(j)
    assert rules.wants(job(2, A, ACT), paused=False, lane_here=False, known=False)
    assert not rules.wants(job(2, A, ACT), paused=False, lane_here=True, known=False)
    assert rules.bulk_mode(paused=False) is BulkMode.HOLD
    assert rules.bulk_mode(paused=True) is BulkMode.PARK


def test_a_job_parked_again_needs_no_second_signal():
    """The identity of a parked or read-back job is remembered: no second delayed signal."""
    rules = ParkRules()
    j = job(1, A, ACT)
    assert rules.needs_signal(j)
    rules.parked(j)

    assert not rules.needs_signal(j)


@dataclass
class Copy:
    job: Job
    source: Source
    suspect: bool = False  # a copy whose delayed signal may repeat (the named window)
    joined: bool = False  # joined its SIM's work from before a pause instead of parking


@dataclass
class Move:
    copy: Copy
    confirmed: bool = False


@dataclass
class Owner:
    lanes: Lanes[Copy]
    rules: ParkRules = field(default_factory=ParkRules)
    paused: bool = False
    held: dict[Source, list[Copy]] = field(
        default_factory=lambda: {Source.WORK: [], Source.PARKED: []})
    moves: list[Move] = field(default_factory=list)
    pending: list[Copy] = field(default_factory=list)  # settled at once (no call)


class ParkingAgainstABroker(RuleBasedStateMachine):
    """At most one delayed signal per job but in the window of one publish (a crash
    between a move's confirm and its ack), every job ends with a final signal, no job is
    applied after a newer one for its SIM (but a copy of a job already applied), and
    every SIM ends in its newest event's status."""

    @initialize()
    def start(self) -> None:
        self.work: list[Copy] = []
        self.parked: list[Copy] = []
        self.ledger: list[tuple[str, int, str]] = []
        self.owner = self._new_owner()
        self.key_wrong = False
        self.stamp = 0
        self.published: list[Job] = []
        self.delayed: dict[tuple[str, str, Command], int] = {}
        self.finals: set[tuple[str, str, Command]] = set()
        self.window: set[tuple[str, str, Command]] = set()
        self.status: dict[str, Command] = {}
        self.applied: dict[str, int] = {}
        self.applied_ids: set[tuple[str, str, Command]] = set()
        self.sims_in_window: set[str] = set()

    def _new_owner(self) -> Owner:
        owner = Owner(Lanes(Memory(max_bytes=1)))  # it forgets at once: guards must hold
        owner.rules.count = len(getattr(self, "parked", []))  # the take-over reads it
        owner.lanes.load_guards(getattr(self, "ledger", []))
        return owner

    # the world

    @rule(iccid=st.sampled_from([A, B]), command=st.sampled_from([ACT, DEACT]))
    def publish(self, iccid: str, command: Command) -> None:
        self.stamp += 1
        new = job(self.stamp, iccid, command)
        self.published.append(new)
        self.work.append(Copy(new, Source.WORK))

    @precondition(lambda self: self.published)
    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        """The same event again (a producer's second publish): the same job."""
        self.work.append(Copy(data.draw(st.sampled_from(self.published)), Source.WORK))

    @rule()
    def break_the_key(self) -> None:
        self.key_wrong = True

    @rule()
    def fix_the_key(self) -> None:
        self.key_wrong = False

    # the owner's shell

    def _place(self, copy: Copy) -> None:
        o = self.owner
        if copy.source is Source.PARKED:
            doubts = {Source.PARKED} if o.rules.more_behind() else set()
        else:
            doubts = set() if o.rules.drained() else {Source.PARKED}
        placed = o.lanes.deliver(copy.job, copy, doubts)
        if isinstance(placed, Immediate):
            o.pending.append(copy)

    @precondition(lambda self: self.work and len(self.owner.held[Source.WORK]) < WINDOW)
    @rule()
    def deliver_work(self) -> None:
        o = self.owner
        copy = self.work.pop(0)
        o.held[Source.WORK].append(copy)
        lane = o.lanes.lane(copy.job.iccid)
        lane_here = bool(lane) and not any(m.payload.source is Source.PARKED
                                           for e in lane for m in e.members)
        if o.rules.wants(copy.job, paused=o.paused, lane_here=lane_here,
                         known=o.lanes.known(copy.job) is not None):
            o.moves.append(Move(copy))
        else:
            copy.joined = o.rules.active(o.paused) and lane_here
            self._place(copy)

    @precondition(lambda self: any(not m.confirmed for m in self.owner.moves))
    @rule(data=st.data())
    def confirm_a_move(self, data: st.DataObject) -> None:
        """The broker confirms a move: the delayed signal went out, the copy is parked."""
        o = self.owner
        move = data.draw(st.sampled_from([m for m in o.moves if not m.confirmed]))
        key = identity(move.copy.job)
        if o.rules.needs_signal(move.copy.job):
            self.delayed[key] = self.delayed.get(key, 0) + 1
        self.parked.append(Copy(move.copy.job, Source.PARKED))
        o.rules.parked(move.copy.job)
        move.confirmed = True

    @precondition(lambda self: any(m.confirmed for m in self.owner.moves))
    @rule(data=st.data())
    def ack_a_move(self, data: st.DataObject) -> None:
        o = self.owner
        move = data.draw(st.sampled_from([m for m in o.moves if m.confirmed]))
        o.moves.remove(move)
        o.held[Source.WORK].remove(move.copy)

    @precondition(lambda self: not self.owner.paused)
    @rule()
    def start_call(self) -> None:
        """A runner takes the next entry (up to two calls under way at once)."""
        o = self.owner
        if sum(e.state is State.STARTED for e in o.lanes.entries()) >= 2:
            return
        entry = o.lanes.next_ready()
        if entry is not None:
            o.lanes.start(entry)

    @rule(data=st.data())
    def end_call(self, data: st.DataObject) -> None:
        """A call under way ends: Control Center refuses it while the key is wrong (the type
        pauses, the entry waits again and is parked with what queues behind it), else the
        SIM is set."""
        o = self.owner
        started = [e for e in o.lanes.entries() if e.state is State.STARTED]
        if not started:
            return
        entry = data.draw(st.sampled_from(started))
        if self.key_wrong:
            o.lanes.unstart(entry)
            if not o.paused:
                self._pause()
            self._park_queued(entry.iccid)
            return
        self.end_call_of(entry)

    def call(self) -> None:
        self.start_call()
        for entry in [e for e in self.owner.lanes.entries() if e.state is State.STARTED]:
            if self.key_wrong:
                self.owner.lanes.unstart(entry)
                continue
            self.end_call_of(entry)

    def end_call_of(self, entry: Any) -> None:
        o = self.owner
        waiting = [c.job.stamp for c in (*self.parked, *o.held[Source.PARKED])]
        oldest_parked = min(waiting, default=None)
        if oldest_parked is not None:
            # Oldest first: while a pause's backlog waits, no newer job from the work queue
            # is applied, but one that joined its SIM's work from before the pause.
            for member in entry.members:
                copy = member.payload
                assert (copy.source is Source.PARKED or copy.joined
                        or member.job.stamp < oldest_parked
                        or identity(member.job) in self.applied_ids), (
                    f"{member.job.event_id} applied before the parked e{oldest_parked}")
        newest = self.applied.get(entry.iccid, 0)
        for member in entry.members:
            if member.job.stamp < newest:
                # The window of "Order and crashes": a copy of a job already applied that
                # the owner no longer remembers. Anything else is a bug.
                assert identity(member.job) in self.applied_ids or member.payload.suspect, (
                    f"{member.job.event_id} applied after stamp {newest} for {entry.iccid}")
                self.sims_in_window.add(entry.iccid)
        self.applied_ids.update(entry.identities())
        self.applied[entry.iccid] = max(newest, *(m.job.stamp for m in entry.members))
        self.status[entry.iccid] = entry.command
        o.lanes.finish(entry, Outcome.succeeded(entry.command.target_status, 1))

    def _park_queued(self, iccid: str) -> None:
        """Parker.park_queued: the SIM's entries not started move, in order."""
        o = self.owner
        if not o.paused:
            return
        for entry in o.lanes.take_queued(iccid):
            for member in entry.members:
                if member.payload.source is Source.WORK:
                    o.moves.append(Move(member.payload))

    def _pause(self) -> None:
        """on_pause: parked jobs not started go back (their channel closes once no parked
        call is under way), every queued entry moves to the parked queue."""
        o = self.owner
        o.paused = True
        o.lanes.drop(lambda c: c.source is not Source.PARKED)
        for iccid in o.lanes.iccids():
            self._park_queued(iccid)

    @precondition(lambda self: self.owner.paused and self.owner.rules.draining and not any(
        e.state is not State.QUEUED and any(m.payload.source is Source.PARKED
                                            for m in e.members)
        for e in self.owner.lanes.entries()))
    @rule()
    def close_the_parked_channel(self) -> None:
        """No parked job's call or settle is under way: the channel closes, the rest return."""
        o = self.owner
        o.lanes.drop(lambda c: c.source is not Source.PARKED)
        back = [c for c in o.held[Source.PARKED] if c not in o.pending]
        self.parked[:0] = [Copy(c.job, Source.PARKED) for c in back]
        o.held[Source.PARKED] = [c for c in o.held[Source.PARKED] if c in o.pending]
        o.rules.returned(len(back))
        o.rules.draining = False

    @precondition(lambda self: self.owner.paused and not self.key_wrong
                  and not self.owner.rules.draining)
    @rule()
    def resume(self) -> None:
        """An Echo probe passes: the type resumes and drains its parked queue first."""
        o = self.owner
        o.paused = False
        if o.rules.should_drain(paused=False):
            o.rules.draining = True

    @precondition(lambda self: not self.owner.paused and not self.owner.rules.draining
                  and self.owner.rules.should_drain(paused=False))
    @rule()
    def start_draining(self) -> None:
        self.owner.rules.draining = True

    @precondition(lambda self: self.owner.rules.draining and self.parked
                  and len(self.owner.held[Source.PARKED]) < WINDOW)
    @rule()
    def drain(self) -> None:
        o = self.owner
        copy = self.parked.pop(0)
        o.rules.read_back(copy.job)
        o.held[Source.PARKED].append(copy)
        self._place(copy)

    def _settle(self, copy: Copy) -> None:
        o = self.owner
        self.finals.add(identity(copy.job))
        o.held[copy.source].remove(copy)
        if copy.source is Source.PARKED:
            o.rules.acked()
            if o.rules.count == 0:
                o.rules.draining = False  # the worker stops at an empty queue too

    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        o = self.owner
        done = [(e, m) for e in o.lanes.entries() if e.state is State.DONE
                for m in e.members if not m.settled]
        if done:
            entry, member = data.draw(st.sampled_from(done))
            self._settle(member.payload)
            o.lanes.settled(entry, member)

    @precondition(lambda self: self.owner.pending)
    @rule()
    def settle_at_once(self) -> None:
        self._settle(self.owner.pending.pop(0))

    @rule(data=st.data())
    def guard(self, data: st.DataObject) -> None:
        o = self.owner
        if o.rules.drained() and not any(c.source is Source.PARKED for c in o.pending):
            o.lanes.resolve(Source.PARKED, o.lanes.clock)
        waiting = o.lanes.uncleared()
        if waiting:
            entry = data.draw(st.sampled_from(waiting))
            clock, stamp, event_id = o.lanes.guard_for(entry)
            self.ledger.append((entry.iccid, stamp, event_id))
            o.lanes.guarded(entry, clock, stamp, event_id)

    @rule(landed=st.booleans())
    def crash(self, landed: bool) -> None:
        """The owner dies or its channels close (a hand-back): unacked messages return to
        the head of their queues in order; a move not yet confirmed may or may not have
        reached the broker (``landed``); one confirmed but not acked is in both places."""
        o = self.owner
        for move in o.moves:
            key = identity(move.copy.job)
            if not move.confirmed and landed:
                if o.rules.needs_signal(move.copy.job):
                    self.delayed[key] = self.delayed.get(key, 0) + 1
                self.parked.append(Copy(move.copy.job, Source.PARKED))
                move.confirmed = True
            if move.confirmed:
                self.window.add(key)
        for source, queue in ((Source.WORK, self.work), (Source.PARKED, self.parked)):
            suspect = {id(m.copy) for m in o.moves if m.confirmed}
            queue[:0] = [Copy(c.job, source, suspect=id(c) in suspect or c.suspect)
                         for c in o.held[source]]
        self.owner = self._new_owner()

    @invariant()
    def at_most_one_delayed_signal_per_job(self) -> None:
        for key, count in self.delayed.items():
            assert count <= 1 or key in self.window, (key, count)

    def teardown(self) -> None:
        if not hasattr(self, "work"):
            return
        self.key_wrong = False
        for _ in range(20_000):
            o = self.owner
            if not (self.work or self.parked or len(o.lanes) or o.moves or o.pending
                    or any(o.held.values())):
                break
            if o.paused and not o.rules.draining:
                self.resume()
            elif o.paused and not any(e.state is not State.QUEUED and any(
                    m.payload.source is Source.PARKED for m in e.members)
                    for e in o.lanes.entries()):
                self.close_the_parked_channel()
            if not o.paused and not o.rules.draining and o.rules.should_drain(paused=False):
                self.start_draining()
            for move in list(o.moves):
                if not move.confirmed:
                    self.owner.moves[self.owner.moves.index(move)].confirmed = True
                    key = identity(move.copy.job)
                    if o.rules.needs_signal(move.copy.job):
                        self.delayed[key] = self.delayed.get(key, 0) + 1
                    self.parked.append(Copy(move.copy.job, Source.PARKED))
                    o.rules.parked(move.copy.job)
                o.moves.remove(move)
                o.held[Source.WORK].remove(move.copy)
            if self.work and len(o.held[Source.WORK]) < WINDOW:
                self.deliver_work()
            if o.rules.draining and self.parked and len(o.held[Source.PARKED]) < WINDOW:
                self.drain()
            if o.rules.drained() and not any(c.source is Source.PARKED for c in o.pending):
                o.lanes.resolve(Source.PARKED, o.lanes.clock)
            for entry in o.lanes.uncleared():
                clock, stamp, event_id = o.lanes.guard_for(entry)
                self.ledger.append((entry.iccid, stamp, event_id))
                o.lanes.guarded(entry, clock, stamp, event_id)
            if not o.paused:
                self.call()
            while o.pending:
                self.settle_at_once()
            for entry in list(o.lanes.entries()):
                for member in list(entry.members):
                    if entry.state is State.DONE and not member.settled:
                        self._settle(member.payload)
                        o.lanes.settled(entry, member)
        assert not self.work, "the drain did not finish"
        assert not self.parked, "the drain did not finish"
        for published in self.published:
            assert identity(published) in self.finals, published.event_id
        for iccid in (A, B):
            events = [j for j in self.published if j.iccid == iccid]
            if events and iccid not in self.sims_in_window:
                assert self.status[iccid] is max(events, key=lambda j: j.stamp).command


ParkingAgainstABroker.TestCase.settings = settings(
    max_examples=600, stateful_step_count=60, deadline=None, derandomize=True,
    suppress_health_check=list(HealthCheck))
test_parking_against_a_broker = ParkingAgainstABroker.TestCase


def test_a_job_parked_behind_a_newer_one_is_superseded_after_the_resume():
    """E1's call is under way when another SIM's call pauses the type: E2, queued behind
    E1, is parked at once and E1 after its call ends, behind E2. After the resume E2 is
    drained first and, with the parked queue holding more, applied under a guard; E1 is
    then SUPERSEDED, though the memory forgot everything."""
    lanes: Lanes[Source] = Lanes(Memory(max_bytes=1))
    rules = ParkRules()
    e1, e2 = job(1, A, ACT), job(2, A, DEACT)
    lanes.deliver(e1, Source.WORK)
    first = lanes.next_ready()
    assert first is not None
    lanes.start(first)
    lanes.deliver(e2, Source.WORK)
    parked = [e.leader for e in lanes.take_queued(A)]  # the pause: E2 moves at once
    lanes.unstart(first)  # E1's call ends refused
    parked += [e.leader for e in lanes.take_queued(A)]
    for j in parked:
        rules.parked(j)
    assert [j.event_id for j in parked] == ["e2", "e1"]

    rules.read_back(e2)
    placed = lanes.deliver(e2, Source.PARKED,
                           {Source.PARKED} if rules.more_behind() else set())
    entry = lanes.next_ready()
    assert entry is None  # in doubt: E1 may still come from the parked queue
    assert not isinstance(placed, Immediate)
    lanes.guarded(placed.entry, *lanes.guard_for(placed.entry))
    entry = lanes.next_ready()
    assert entry is not None
    lanes.start(entry)
    lanes.finish(entry, Outcome.succeeded("DEACTIVATED", 1))
    lanes.settled(entry, entry.members[0])
    rules.acked()
    rules.read_back(e1)
    late = lanes.deliver(e1, Source.PARKED)

    assert isinstance(late, Immediate)
    assert late.outcome.error is not None
    assert late.outcome.error.code == "SUPERSEDED"
