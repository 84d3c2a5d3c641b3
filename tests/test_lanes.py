"""Order per SIM, coalescing and outcome memory (lanes.py), without I/O.

The stateful test drives :class:`Lanes` the way the worker does, against a model of a
RabbitMQ quorum queue (deliveries, acks, a crash returning what is unacked to the head of
the queue in order, out-of-order redeliveries, duplicates) and a model Control Center.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jasper_consumer.config import Command
from jasper_consumer.events import Job, Lane
from jasper_consumer.lanes import Entry, Immediate, Lanes, Placed, Share, Source, State
from jasper_consumer.memory import Memory, identity
from jasper_consumer.outcomes import ErrorInfo, Outcome, Result

A, B = "89610185000000000001", "89610185000000000002"
ACT, DEACT = Command.ACTIVATE, Command.DEACTIVATE


def job(event_id: str, iccid: str = A, command: Command = ACT, stamp: int = 0,
        replayed: bool = False, lane: Lane = Lane.INTERACTIVE) -> Job:
    return Job(event_id=event_id, event_code=65516 if command is ACT else 65517,
               client_id="c", command=command, iccid=iccid, communicator_type="T",
               stamp=stamp, replayed=replayed, lane=lane)


def placed(lanes: Lanes[str], j: Job) -> Entry[str]:
    result = lanes.deliver(j, j.event_id)
    assert isinstance(result, Placed), result
    return result.entry


def run(lanes: Lanes[str], outcome: Outcome | None = None) -> Entry[str]:
    """Start the next ready entry, finish it, settle every member."""
    entry = lanes.next_ready()
    assert entry is not None
    lanes.start(entry)
    lanes.finish(entry, outcome or Outcome.succeeded(entry.command.target_status, 1))
    for member in entry.members:
        lanes.settled(entry, member)
    return entry


def test_jobs_for_one_sim_start_one_after_another():
    """The second job for a SIM is not ready until the first is settled; another SIM's is."""
    lanes: Lanes[str] = Lanes()
    first = placed(lanes, job("e1", A, ACT, 1))
    placed(lanes, job("e2", A, DEACT, 2))
    other = placed(lanes, job("e3", B, ACT, 3))

    assert lanes.next_ready() is first
    lanes.start(first)
    assert lanes.next_ready() is other
    lanes.finish(first, Outcome.succeeded("ACTIVATED", 1))
    assert lanes.next_ready() is None
    lanes.settled(first, first.members[0])
    second = lanes.next_ready()
    assert second is not None
    assert second.leader.event_id == "e2"


def test_identical_command_joins_a_queued_or_running_call():
    """A second activate for a SIM joins the queued or running activate; it shares its call."""
    lanes: Lanes[str] = Lanes()
    entry = placed(lanes, job("e1", A, ACT, 1))
    assert lanes.deliver(job("e2", A, ACT, 2), "e2") == Placed(entry, joined=True)
    lanes.start(lanes.next_ready())  # type: ignore[arg-type]
    assert lanes.deliver(job("e3", A, ACT, 3), "e3") == Placed(entry, joined=True)
    assert [m.job.event_id for m in entry.members] == ["e1", "e2", "e3"]


def test_no_join_across_another_command():
    """activate, deactivate, activate for a SIM are three calls, in that order."""
    lanes: Lanes[str] = Lanes()
    for n, command in enumerate((ACT, DEACT, ACT), 1):
        result = lanes.deliver(job(f"e{n}", A, command, n), f"e{n}")
        assert isinstance(result, Placed)
        assert not result.joined
    assert [run(lanes).command for _ in range(3)] == [ACT, DEACT, ACT]


def test_a_finished_call_takes_no_followers():
    """A job arriving after its SIM's call finished makes its own call."""
    lanes: Lanes[str] = Lanes()
    entry = placed(lanes, job("e1", A, ACT, 1))
    lanes.start(lanes.next_ready())  # type: ignore[arg-type]
    lanes.finish(entry, Outcome.succeeded("ACTIVATED", 1))

    later = lanes.deliver(job("e2", A, ACT, 2), "e2")

    assert isinstance(later, Placed)
    assert later.entry is not entry
    assert not later.joined


def test_same_event_id_on_two_sims_is_two_jobs():
    """One event id for two devices: each SIM gets its own call and outcome (hole 3)."""
    lanes: Lanes[str] = Lanes()
    placed(lanes, job("e1", A, ACT, 1))
    run(lanes)

    second = lanes.deliver(job("e1", B, ACT, 2), "e1b")

    assert isinstance(second, Placed)
    assert not second.joined


def test_a_duplicate_repeats_the_remembered_outcome_without_a_call():
    """A redelivered job (same identity) gets its remembered outcome with 0 attempts."""
    lanes: Lanes[str] = Lanes()
    placed(lanes, job("e1", A, ACT, 1))
    run(lanes, Outcome.succeeded("ACTIVATED", 2))

    assert lanes.deliver(job("e1", A, ACT, 1), "again") == \
        Immediate(Outcome.succeeded("ACTIVATED", 0))
    assert isinstance(lanes.deliver(job("e1", A, ACT, 1, replayed=True), "replay"), Placed)


def test_a_follower_never_takes_a_remembered_outcome():
    """A new job right behind a redelivered duplicate makes its own call (hole 4a)."""
    lanes: Lanes[str] = Lanes()
    placed(lanes, job("e1", A, ACT, 10))
    run(lanes)
    placed(lanes, job("e3", A, DEACT, 20))
    run(lanes)

    assert isinstance(lanes.deliver(job("e1", A, ACT, 10), "dup"), Immediate)
    follower = lanes.deliver(job("e2", A, ACT, 30), "e2")

    assert isinstance(follower, Placed)
    assert not follower.joined
    assert run(lanes).command is ACT


def test_an_older_job_is_superseded_and_takes_no_followers():
    """An older job behind a newer one is SUPERSEDED; a newer job behind it calls (hole 4b)."""
    lanes: Lanes[str] = Lanes()
    placed(lanes, job("new", A, DEACT, 50))
    run(lanes)

    stale = lanes.deliver(job("old", A, ACT, 40), "old")
    follower = lanes.deliver(job("later", A, ACT, 60), "later")

    assert isinstance(stale, Immediate)
    assert stale.outcome.error is not None
    assert (stale.outcome.error.code, stale.outcome.attempts) == ("SUPERSEDED", 0)
    assert "new" in stale.outcome.error.message
    assert isinstance(follower, Placed)
    assert not follower.joined


def test_a_job_older_than_one_queued_is_superseded():
    """Newer wins also against a job that is only queued."""
    lanes: Lanes[str] = Lanes()
    placed(lanes, job("new", A, DEACT, 50))

    assert isinstance(lanes.deliver(job("old", A, ACT, 40), "old"), Immediate)


def test_unknown_stamps_are_never_compared():
    """Stamp 0 (an old message, a hand-made job) neither supersedes nor is superseded."""
    lanes: Lanes[str] = Lanes()
    placed(lanes, job("new", A, DEACT, 50))
    run(lanes)

    assert isinstance(lanes.deliver(job("nostamp", A, ACT, 0), "x"), Placed)


def test_a_paused_call_waits_again_at_the_head_of_its_lane():
    """take_queued moves out what waits behind a call under way at once; the call's own
    entry follows once unstarted."""
    lanes: Lanes[str] = Lanes()
    first = placed(lanes, job("e1", A, ACT, 1))
    placed(lanes, job("e2", A, DEACT, 2))
    lanes.start(lanes.next_ready())  # type: ignore[arg-type]

    assert [e.leader.event_id for e in lanes.take_queued(A)] == ["e2"]
    lanes.unstart(first)
    taken = lanes.take_queued(A)

    assert [e.leader.event_id for e in taken] == ["e1"]
    assert lanes.next_ready() is None
    assert len(lanes) == 0


def test_interactive_entries_start_before_older_bulk_ones():
    """With bulk work queued first, an interactive job is the next to start."""
    lanes: Lanes[str] = Lanes()
    placed(lanes, job("b1", A, DEACT, 1, lane=Lane.BULK))
    placed(lanes, job("b2", B, DEACT, 2, lane=Lane.BULK))
    interactive = placed(lanes, job("i1", "89610185000000000009", ACT, 3))

    assert lanes.next_ready() is interactive
    assert lanes.next_ready().leader.event_id == "b1"  # type: ignore[union-attr]


def test_a_bulk_entry_in_the_way_of_an_interactive_one_is_served_as_interactive():
    """An interactive job behind a bulk one for its SIM lends the bulk entry its turn."""
    lanes: Lanes[str] = Lanes()
    placed(lanes, job("other", B, DEACT, 1, lane=Lane.BULK))
    blocking = placed(lanes, job("b", A, DEACT, 2, lane=Lane.BULK))
    placed(lanes, job("i", A, ACT, 3))

    assert lanes.next_ready(Lane.INTERACTIVE) is blocking


def test_share_gives_bulk_its_minimum_while_both_wait_and_everything_else():
    """At 0.1, bulk takes every tenth call while both wait, and every call alone."""
    share = Share(0.1)
    picks = [share.pick(interactive=True, bulk=True) for _ in range(100)]

    assert picks.count(Lane.BULK) == 10
    assert share.pick(interactive=False, bulk=True) is Lane.BULK
    assert share.pick(interactive=True, bulk=False) is Lane.INTERACTIVE
    assert share.pick(interactive=False, bulk=False) is None


def test_an_entry_in_doubt_waits_until_resolved_or_guarded():
    """A job that another source may still precede does not start until that source is
    seen drained, or a guard for its SIM is written."""
    lanes: Lanes[str] = Lanes()
    first = placed(lanes, job("i1", A, ACT, 10))
    lanes.deliver(job("i2", B, ACT, 11), "i2", doubts={Source.BULK})
    first_doubt = first.doubts

    assert not first_doubt
    assert lanes.next_ready() is first
    lanes.start(first)
    assert lanes.next_ready() is None
    lanes.resolve(Source.BULK, lanes.clock)
    second = lanes.next_ready()
    assert second is not None
    assert second.leader.event_id == "i2"


def test_a_guard_supersedes_an_older_job_that_comes_later_and_outlives_memory():
    """After a guarded interactive job, an older bulk job for the SIM is SUPERSEDED even
    when the outcome memory has forgotten everything."""
    lanes: Lanes[str] = Lanes(Memory(max_bytes=64 * 1024))
    entry = lanes.deliver(job("new", A, ACT, 50), "new", doubts={Source.BULK})
    assert isinstance(entry, Placed)
    lanes.guarded(entry.entry, *lanes.guard_for(entry.entry))
    run(lanes)
    for n in range(5000):  # fill the memory with other SIMs' outcomes
        placed(lanes, job(f"x{n}", f"8961018599{n:010d}", ACT, 100 + n))
        run(lanes)

    late = lanes.deliver(job("old", A, DEACT, 40, lane=Lane.BULK), "old")

    assert lanes.memory.newest(A) is None
    assert isinstance(late, Immediate)
    assert late.outcome.error is not None
    assert late.outcome.error.code == "SUPERSEDED"


def test_guards_go_once_every_source_drained_after_them():
    """forget_guards drops the guards whose sources were seen drained after they were made,
    not later ones."""
    lanes: Lanes[str] = Lanes()
    first = lanes.deliver(job("g1", A, ACT, 5), "g1", doubts={Source.BULK})
    assert isinstance(first, Placed)
    lanes.guarded(first.entry, *lanes.guard_for(first.entry))
    drained_at = lanes.clock
    second = lanes.deliver(job("g2", B, ACT, 6), "g2", doubts={Source.BULK})
    assert isinstance(second, Placed)
    lanes.guarded(second.entry, *lanes.guard_for(second.entry))

    assert lanes.forget_guards({Source.BULK: drained_at}) == 1
    assert set(lanes.guards) == {B}


def test_a_guard_against_two_sources_goes_only_once_both_were_drained_after_it():
    """A guard made for doubts on the bulk queue and on the work queue's window stays while
    either may still hold an older job: one drained source is not enough."""
    lanes: Lanes[str] = Lanes()
    placed = lanes.deliver(job("g1", A, ACT, 5), "g1", doubts={Source.BULK, Source.WORK})
    assert isinstance(placed, Placed)
    lanes.guarded(placed.entry, *lanes.guard_for(placed.entry))
    after = lanes.clock

    assert lanes.forget_guards({Source.BULK: after}) == 0
    assert lanes.forget_guards({Source.BULK: after, Source.WORK: after - 1}) == 0
    assert lanes.forget_guards({Source.BULK: after, Source.WORK: after}) == 1
    assert not lanes.guards


def test_a_job_in_doubt_does_not_join_a_call_under_way():
    """An identical command in doubt gets a call of its own after the one under way: the
    guard must be in the broker before the call that serves it."""
    lanes: Lanes[str] = Lanes()
    first = placed(lanes, job("e1", A, ACT, 1))
    lanes.start(lanes.next_ready())  # type: ignore[arg-type]

    joined = lanes.deliver(job("e2", A, ACT, 2, lane=Lane.BULK), "e2", doubts={Source.WORK})

    assert isinstance(joined, Placed)
    assert joined.entry is not first


def test_memory_is_bounded_in_bytes_and_forgets_the_oldest():
    """10,000 remembered failures with long messages stay within the byte budget."""
    memory = Memory(max_bytes=256 * 1024)
    error = ErrorInfo("19999999", 400, "x" * 200, False)
    for n in range(10_000):
        memory.record(job(f"event-{n:05d}", A, ACT, n + 1), Outcome.failed(error, 1))

    assert memory.bytes <= memory.max_bytes
    assert memory.outcome(identity(job("event-09999", A, ACT))) is not None
    assert memory.outcome(identity(job("event-00000", A, ACT))) is None
    assert memory.newest(A) == (10_000, "event-09999")


def test_remembered_successes_share_one_value():
    """Identical successes are one shared object, not one per event."""
    lanes: Lanes[str] = Lanes()
    for n in range(3):
        placed(lanes, job(f"e{n}", f"8961018500000000010{n}", ACT, n + 1))
        run(lanes)
    kept = {id(lanes.memory.outcome(identity(job(f"e{n}", f"8961018500000000010{n}", ACT))))
            for n in range(3)}
    assert len(kept) == 1


# -- the stateful model -------------------------------------------------------------------


@dataclass
class Message:
    job: Job
    tag: int = 0


@dataclass
class Process:
    """One service process: its lanes (memory included) and its unacked deliveries."""

    lanes: Lanes[Message] = field(default_factory=Lanes)
    unacked: list[Message] = field(default_factory=list)


class LanesAgainstABroker(RuleBasedStateMachine):
    """Random deliveries, calls, settles, crashes (with and without losing memory),
    out-of-order redeliveries and duplicates; every SIM must end in the status of its
    newest event, except in the one window the operator guide names."""

    @initialize()
    def start(self) -> None:
        self.queue: list[Message] = []  # the work queue, head first
        self.process = Process()
        self.sims: dict[str, Command | None] = {A: None, B: None}
        self.published: list[Job] = []
        self.stamp = 0
        self.tag = 0
        self.covered: set[tuple[str, str, Command]] = set()  # identities a call served
        self.reported: list[tuple[Job, Outcome]] = []
        self.applied_stamp: dict[str, int] = {}  # newest stamp applied per SIM (by anyone)
        # Which memory applied it: the model's own count of crashes that lost memory, so
        # the window is judged from the model, never from the memory under test.
        self.generation = 0
        self.applied_in: dict[str, int] = {}
        self.window: set[str] = set()  # SIMs where the documented window was hit

    # producers

    @rule(iccid=st.sampled_from([A, B]), command=st.sampled_from([ACT, DEACT]))
    def publish(self, iccid: str, command: Command) -> None:
        """A new event for one SIM."""
        self._publish(f"e{self.stamp + 1}", iccid, command)

    @rule(command=st.sampled_from([ACT, DEACT]))
    def publish_for_two_devices(self, command: Command) -> None:
        """One event of a client with two devices: one message per SIM, one event id."""
        event_id = f"e{self.stamp + 1}"
        for iccid in (A, B):
            self._publish(event_id, iccid, command)

    def _publish(self, event_id: str, iccid: str, command: Command) -> None:
        self.stamp += 1
        new = job(event_id, iccid, command, self.stamp)
        self.published.append(new)
        self.queue.append(Message(new))

    @precondition(lambda self: self.published)
    @rule(data=st.data())
    def duplicate_of_an_old_job(self, data: st.DataObject) -> None:
        """An older job comes again at the back: a nack, a replay, a second publish."""
        self.queue.append(Message(data.draw(st.sampled_from(self.published))))

    def _remembers_newer(self, iccid: str) -> bool:
        return self.applied_in.get(iccid) == self.generation

    @precondition(lambda self: any(s > 1 for s in self.applied_stamp.values()))
    @rule(data=st.data(), command=st.sampled_from([ACT, DEACT]))
    def a_late_event(self, data: st.DataObject, command: Command) -> None:
        """An event of its own (a new id) that reaches the queue after newer ones for its SIM
        were applied: it carries an older stamp (held up upstream, replayed)."""
        iccid = data.draw(st.sampled_from(
            sorted(i for i, s in self.applied_stamp.items() if s > 1)))
        stamp = data.draw(st.integers(1, self.applied_stamp[iccid] - 1))
        late = job(f"late{len(self.published)}", iccid, command, stamp)
        self.published.append(late)
        self.queue.append(Message(late))

    # the worker

    @precondition(lambda self: self.queue)
    @rule()
    def deliver(self) -> None:
        message = self.queue.pop(0)
        if (self.applied_stamp.get(message.job.iccid, 0) > message.job.stamp
                and not self._remembers_newer(message.job.iccid)):
            # The window (operator guide, "Order and crashes"): an older job reaches a
            # process that never saw the newer one applied for its SIM.
            self.window.add(message.job.iccid)
        self.tag += 1
        message = Message(message.job, self.tag)
        self.process.unacked.append(message)
        result = self.process.lanes.deliver(message.job, message)
        if isinstance(result, Immediate):
            self._report(message.job, result.outcome)
            self.process.unacked.remove(message)

    @rule()
    def call(self) -> None:
        lanes = self.process.lanes
        entry = lanes.next_ready()
        if entry is None:
            return
        lanes.start(entry)
        self.sims[entry.iccid] = entry.command
        newest = max(m.job.stamp for m in entry.members)
        if newest >= self.applied_stamp.get(entry.iccid, 0):
            self.applied_stamp[entry.iccid] = newest
            self.applied_in[entry.iccid] = self.generation
        self.covered.update(entry.identities())
        lanes.finish(entry, Outcome.succeeded(entry.command.target_status, 1))

    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        done = [(e, m) for e in self.process.lanes.entries() if e.state is State.DONE
                for m in e.members if not m.settled]
        if not done:
            return
        entry, member = data.draw(st.sampled_from(done))
        assert entry.outcome is not None
        self._report(member.job, entry.outcome)
        self.process.unacked.remove(member.payload)
        self.process.lanes.settled(entry, member)

    @rule(memory_lost=st.booleans())
    def crash(self, memory_lost: bool) -> None:
        """The channel closes: unacked messages return to the head, in delivery order."""
        returned = sorted(self.process.unacked, key=lambda m: m.tag)
        self.queue[:0] = [Message(m.job) for m in returned]
        memory = None if memory_lost else self.process.lanes.memory
        if memory_lost:
            self.generation += 1
        self.process = Process(Lanes(memory))

    def _report(self, reported: Job, outcome: Outcome) -> None:
        self.reported.append((reported, outcome))

    # what must always hold

    @invariant()
    def no_sim_reported_changed_without_a_call_for_it(self) -> None:
        for reported, outcome in self.reported:
            if outcome.result is Result.SUCCEEDED:
                assert identity(reported) in self.covered, reported

    @invariant()
    def a_lane_has_at_most_one_call_under_way(self) -> None:
        for iccid in (A, B):
            lane = self.process.lanes.lane(iccid)
            assert sum(e.state is not State.QUEUED for e in lane) <= 1
            assert all(e.state is State.QUEUED for e in lane[1:])

    def teardown(self) -> None:
        """Drain everything; each SIM ends in its newest event's status, but in the window."""
        if not hasattr(self, "queue"):
            return
        for _ in range(10_000):
            if not self.queue and not len(self.process.lanes):
                break
            if self.queue:
                self.deliver()
            self.call()
            for entry in list(self.process.lanes.entries()):
                for member in list(entry.members):
                    if entry.state is State.DONE and not member.settled:
                        assert entry.outcome is not None
                        self._report(member.job, entry.outcome)
                        self.process.unacked.remove(member.payload)
                        self.process.lanes.settled(entry, member)
        assert not self.queue, "the drain did not finish"
        assert not len(self.process.lanes), "the drain did not finish"
        for iccid in (A, B):
            events = [j for j in self.published if j.iccid == iccid]
            if events and iccid not in self.window:
                assert self.sims[iccid] is max(events, key=lambda j: j.stamp).command, iccid


LanesAgainstABroker.TestCase.settings = settings(
    max_examples=600, stateful_step_count=50, deadline=None, derandomize=True,
    suppress_health_check=list(HealthCheck))
test_lanes_against_a_broker = LanesAgainstABroker.TestCase


# -- the model with two lanes -------------------------------------------------------------


@dataclass
class Copy:
    """A message on a queue: a job, and whether it is a re-published copy of an older one
    (a replay: the documented window of "Order and crashes" covers only those)."""

    job: Job
    source: Source
    duplicate: bool = False


@dataclass
class Owner:
    """The owning process: its lanes, a deliberately tiny memory, its unacked messages."""

    lanes: Lanes[Copy]
    held: dict[Source, list[Copy]] = field(
        default_factory=lambda: {Source.WORK: [], Source.BULK: []})
    pending: list[Copy] = field(default_factory=list)  # superseded/duplicates, not settled
    drained_at: dict[Source, int] = field(default_factory=dict)


SIMS = [A, B, "89610185000000000003"]
PREFETCH = 2  # the owner's window on the work queue (saturates easily)


def tiny_memory() -> Memory:
    return Memory(max_bytes=64 * 1024)


class TwoLanesAgainstABroker(RuleBasedStateMachine):
    """Interactive jobs on the work queue (pushed, prefetch 2), bulk jobs on the bulk queue
    (pulled), long bulk backlogs, replays, crashes that lose the process and its memory,
    and a memory so small it forgets: no job is ever applied after a newer job for its SIM
    (by the router's stamp), whichever lane each came by, except a replayed copy reaching
    a process that forgot (the window named in the operator guide)."""

    @initialize()
    def start(self) -> None:
        self.queues: dict[Source, list[Copy]] = {Source.WORK: [], Source.BULK: []}
        self.ledger: list[tuple[str, int, str]] = []  # the guards in the broker
        self.owner = Owner(Lanes(tiny_memory()))
        self.published: list[Job] = []
        self.stamp = 0
        self.status: dict[str, Command] = {}
        self.applied: dict[str, int] = {}  # newest stamp applied per SIM, by anyone
        self.applied_ids: set[tuple[str, str, Command]] = set()
        self.windows: set[str] = set()
        # Window 2 of the guide: a bulk job delivered while the owner saw room in its work
        # window, though the broker had not pushed an older commission of the SIM yet;
        # those commissions, and once the owner dies before them, the ones it may apply late.
        self.at_edge: set[tuple[str, str, Command]] = set()
        self.edge_crashed: set[tuple[str, str, Command]] = set()

    # producers (the router: stamps grow; a lane per job)

    def _publish(self, iccid: str, command: Command, lane: Lane) -> None:
        self.stamp += 1
        new = job(f"e{self.stamp}", iccid, command, self.stamp, lane=lane)
        self.published.append(new)
        source = Source.WORK if lane is Lane.INTERACTIVE else Source.BULK
        self.queues[source].append(Copy(new, source))

    @rule(iccid=st.sampled_from(SIMS), command=st.sampled_from([ACT, DEACT]),
          lane=st.sampled_from([Lane.INTERACTIVE, Lane.BULK]))
    def publish(self, iccid: str, command: Command, lane: Lane) -> None:
        self._publish(iccid, command, lane)

    @rule(data=st.data(), size=st.integers(5, 30))
    def bulk_backlog(self, data: st.DataObject, size: int) -> None:
        """A clean-up: many bulk jobs at once (some for SIMs that interactive jobs use)."""
        for _ in range(size):
            self._publish(data.draw(st.sampled_from(SIMS)), DEACT, Lane.BULK)

    @precondition(lambda self: self.published)
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        """An old job comes again at the back of its queue (a replay, a second publish)."""
        old = data.draw(st.sampled_from(self.published))
        source = Source.WORK if old.lane is Lane.INTERACTIVE else Source.BULK
        self.queues[source].append(Copy(old, source, duplicate=True))

    # the owner's shell: what the worker does

    def _deliver(self, copy: Copy, doubts: set[Source]) -> None:
        self.owner.held[copy.source].append(copy)
        placed = self.owner.lanes.deliver(copy.job, copy, doubts)
        if isinstance(placed, Immediate):
            self.owner.pending.append(copy)

    @precondition(lambda self: self.queues[Source.WORK]
                  and len(self.owner.held[Source.WORK]) < PREFETCH)
    @rule()
    def push_work(self) -> None:
        """The broker pushes the work queue's head while the owner has prefetch left; until
        a pull proves the bulk queue drained, it may hold an older job for the SIM."""
        self._deliver(self.queues[Source.WORK].pop(0), {Source.BULK})

    @rule()
    def pull_bulk(self) -> None:
        """basic.get on the bulk queue; with the work queue's window full, an older
        interactive job for the SIM may be waiting beyond it."""
        if self.queues[Source.BULK]:
            saturated = len(self.owner.held[Source.WORK]) >= PREFETCH
            copy = self.queues[Source.BULK].pop(0)
            if not saturated:
                self.at_edge.update(identity(c.job) for c in self.queues[Source.WORK]
                                    if c.job.iccid == copy.job.iccid
                                    and c.job.stamp < copy.job.stamp)
            self._deliver(copy, {Source.WORK} if saturated else set())
        elif not any(c.source is Source.BULK for c in self.owner.pending):
            self._drained(Source.BULK)

    @precondition(lambda self: not self.queues[Source.WORK]
                  or len(self.owner.held[Source.WORK]) >= PREFETCH)
    @rule()
    def see_work_window(self) -> None:
        """The owner sees its work window not full (the broker has pushed all it had)."""
        if (len(self.owner.held[Source.WORK]) < PREFETCH
                and not any(c.source is Source.WORK for c in self.owner.pending)):
            self._drained(Source.WORK)

    def _drained(self, source: Source) -> None:
        lanes = self.owner.lanes
        lanes.resolve(source, lanes.clock)
        self.owner.drained_at[source] = lanes.clock
        lanes.forget_guards(self.owner.drained_at)
        self.ledger = [(i, g.stamp, g.event_id) for i, g in lanes.guards.items()]

    @rule(data=st.data())
    def write_guard(self, data: st.DataObject) -> None:
        waiting = self.owner.lanes.uncleared()
        if not waiting:
            return
        entry = data.draw(st.sampled_from(waiting))
        clock, stamp, event_id = self.owner.lanes.guard_for(entry)
        self.ledger.append((entry.iccid, stamp, event_id))  # confirmed by the broker
        self.owner.lanes.guarded(entry, clock, stamp, event_id)

    @rule(lane=st.sampled_from([Lane.INTERACTIVE, Lane.BULK, None]))
    def call(self, lane: Lane | None) -> None:
        lanes = self.owner.lanes
        entry = lanes.next_ready(lane)
        if entry is None:
            return
        lanes.start(entry)
        newest = self.applied.get(entry.iccid, 0)
        for member in entry.members:
            if member.job.stamp and member.job.stamp < newest:
                # The window: a copy of a job already applied (returned unacked by a crash,
                # or replayed) that the owner no longer remembers. Anything else is a bug.
                assert (member.payload.duplicate or identity(member.job) in self.applied_ids
                        or identity(member.job) in self.edge_crashed), (
                    f"{member.job.event_id} (stamp {member.job.stamp}, {member.job.lane}) "
                    f"applied after stamp {newest} for {entry.iccid}")
                self.windows.add(entry.iccid)
        self.applied_ids.update(entry.identities())
        self.applied[entry.iccid] = max(newest, *(m.job.stamp for m in entry.members))
        self.status[entry.iccid] = entry.command
        lanes.finish(entry, Outcome.succeeded(entry.command.target_status, 1))

    def _ack(self, copy: Copy) -> None:
        self.owner.held[copy.source].remove(copy)

    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        done = [(e, m) for e in self.owner.lanes.entries() if e.state is State.DONE
                for m in e.members if not m.settled]
        if done:
            entry, member = data.draw(st.sampled_from(done))
            self._ack(member.payload)
            self.owner.lanes.settled(entry, member)

    @precondition(lambda self: self.owner.pending)
    @rule()
    def settle_at_once(self) -> None:
        self._ack(self.owner.pending.pop(0))

    @rule(memory_lost=st.booleans())
    def crash(self, memory_lost: bool) -> None:
        """The owner dies (or hands over): what it held returns to the head of each queue,
        in order; the next owner reads the guards back from the broker."""
        for source, held in self.owner.held.items():
            self.queues[source][:0] = [Copy(c.job, c.source, c.duplicate) for c in held]
        self.edge_crashed |= {i for i in self.at_edge
                              if any(identity(c.job) == i for c in self.queues[Source.WORK])}
        memory = tiny_memory() if memory_lost else self.owner.lanes.memory
        self.owner = Owner(Lanes(memory))
        self.owner.lanes.load_guards(self.ledger)

    def teardown(self) -> None:
        if not hasattr(self, "queues"):
            return
        for _ in range(20_000):
            if not any(self.queues.values()) and not len(self.owner.lanes) \
                    and not self.owner.pending:
                break
            if self.queues[Source.WORK] and len(self.owner.held[Source.WORK]) < PREFETCH:
                self.push_work()
            self.pull_bulk()
            self.see_work_window()
            for entry in self.owner.lanes.uncleared():
                clock, stamp, event_id = self.owner.lanes.guard_for(entry)
                self.ledger.append((entry.iccid, stamp, event_id))
                self.owner.lanes.guarded(entry, clock, stamp, event_id)
            self.call(None)
            while self.owner.pending:
                self.settle_at_once()
            for entry in list(self.owner.lanes.entries()):
                for member in list(entry.members):
                    if entry.state is State.DONE and not member.settled:
                        self._ack(member.payload)
                        self.owner.lanes.settled(entry, member)
        assert not any(self.queues.values()), "the drain did not finish"
        for iccid in SIMS:
            events = [j for j in self.published if j.iccid == iccid]
            if events and iccid not in self.windows:
                assert self.status[iccid] is max(events, key=lambda j: j.stamp).command, iccid


TwoLanesAgainstABroker.TestCase.settings = settings(
    max_examples=800, stateful_step_count=60, deadline=None, derandomize=True,
    suppress_health_check=list(HealthCheck))
test_two_lanes_against_a_broker = TwoLanesAgainstABroker.TestCase
