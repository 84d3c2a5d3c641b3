"""The status page's facts: trackers, what the owner collects off a real Worker, and how
the reports of several processes become one page (no broker)."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import SecretStr

from jasper_consumer import errors
from jasper_consumer.config import Command, Settings, parse_settings
from jasper_consumer.errors import CommunicatorMisconfigured
from jasper_consumer.events import Job, Lane
from jasper_consumer.jasper.limiter import Limiter
from jasper_consumer.outcomes import ErrorInfo
from jasper_consumer.signals import Kind, Signal, SignalError
from jasper_consumer.status import (
    OTHER_WORDS,
    OUTAGE_WORDS,
    PAUSE_WORDS,
    Backlog,
    Failure,
    Finals,
    LaneCounts,
    LaneLatency,
    Latency,
    OwnerFacts,
    PauseFacts,
    Process,
    QueueDepth,
    Report,
    TypeQueues,
    assemble,
    collect,
    owns,
    pause_words,
)
from jasper_consumer.statusboard import StatusBoard

from .fakebroker import Message
from .test_worker import Client, Rig, until

T0 = 1_800_000_000.0  # a fixed unix time
NOW = datetime.fromtimestamp(T0, UTC)


@pytest.fixture
def settings() -> Settings:
    return parse_settings({"communicator_types": [{
        "name": "T", "server_address": "https://j.example/rws/api/v1", "username": "u",
        "api_key": "k", "request_timeout_seconds": 0.01, "requests_per_second": 1000}]}, {})


def two_types() -> Settings:
    return parse_settings({"queue_prefix": "jc", "communicator_types": [
        {"name": name, "server_address": "https://j.example/rws/api/v1",
         "username": f"user-{n}", "api_key": f"secret-key-{n}", "requests_per_second": 2,
         "max_concurrency": 1} for n, name in enumerate(["M2MOne NZ", "M2MOne AU"])]}, {})


def a_job(n: int, *, lane: Lane = Lane.INTERACTIVE, received_at: float = 0.0,
          communicator_type: str = "T") -> Job:
    return Job(event_id=f"e{n}", event_code=65516, client_id=f"c{n}", command=Command.ACTIVATE,
               iccid=f"8961018500{n:010d}", communicator_type=communicator_type, lane=lane,
               received_at=received_at)


def a_signal(job: Job, code: str | None = None, message: str = "Resource not found") -> Signal:
    error = None if code is None else SignalError(code=code, http_status=404,
                                                  message=message, retryable=False)
    return Signal(event_id=job.event_id, client_id=job.client_id, event_code=job.event_code,
                  command=job.command, iccid=job.iccid, communicator_type=job.communicator_type,
                  outcome=Kind.FAILED if error else Kind.SUCCEEDED,
                  sim_status=None if error else "ACTIVATED", error=error, attempts=1,
                  completed_at=NOW, duration_ms=1.0, text="t")


# -- trackers ------------------------------------------------------------------------------

def test_finals_give_p50_and_p99_per_lane_over_the_last_ten_minutes():
    """Publish -> final times are kept per lane; those older than 10 min drop out."""
    clock = [T0]
    finals = Finals(clock=lambda: clock[0])
    for n in range(100):  # interactive: 1 s .. 100 s
        finals.record_final(a_job(n, received_at=T0 - (n + 1)), a_signal(a_job(n)))
    finals.record_final(a_job(500, lane=Lane.BULK, received_at=T0 - 7),
                        a_signal(a_job(500)))

    now = finals.latency("T")
    clock[0] = T0 + 601
    later = finals.latency("T")

    assert now.interactive == Latency(p50_s=50.0, p99_s=99.0, count=100)
    assert now.bulk == Latency(p50_s=7.0, p99_s=7.0, count=1)
    assert later == LaneLatency()


def test_finals_without_a_receive_time_count_no_latency():
    """A job whose router time is unknown (0) gives no latency sample (its failure counts)."""
    finals = Finals(clock=lambda: T0)
    job = a_job(1)
    finals.record_final(job, a_signal(job, "20000001"))

    assert finals.latency("T").interactive.count == 0
    assert [f.code for f in finals.failures("T")] == ["20000001"]


def test_finals_keep_the_last_twenty_failures_newest_first():
    """Only failures are kept, 20 at most, newest first, with client, ICCID, code, meaning."""
    clock = [T0]
    finals = Finals(clock=lambda: clock[0])
    for n in range(30):
        clock[0] = T0 + n
        job = a_job(n)
        finals.record_final(job, a_signal(job, "20000001" if n % 2 else None))
    failures = finals.failures("T")

    assert len(failures) == 15
    assert failures[0] == Failure(at=datetime.fromtimestamp(T0 + 29, UTC), client_id="c29",
                                  iccid=a_job(29).iccid, code="20000001",
                                  message="Resource not found")
    for n in range(30, 60):
        job = a_job(n)
        finals.record_final(job, a_signal(job, "20000001"))
    assert [f.client_id for f in finals.failures("T")] == [f"c{n}" for n in range(59, 39, -1)]
    assert finals.failures("other type") == []


def test_finals_count_dead_lettered_ones_for_ten_minutes():
    """A final whose retries ran out (its copy went to the dead letters) counts 10 min."""
    clock = [T0]
    finals = Finals(clock=lambda: clock[0])
    job = a_job(1)
    finals.record_final(job, a_signal(job, errors.RETRIES_EXHAUSTED))
    finals.record_final(a_job(2), a_signal(a_job(2), "20000001"))

    assert finals.dead_lettered("T") == 1
    clock[0] = T0 + 601
    assert finals.dead_lettered("T") == 0


def test_a_backlog_grows_when_larger_than_thirty_seconds_ago():
    """Growing: at least 30 s of samples, larger than then, and at least 10 jobs."""
    backlog = Backlog()
    assert backlog.add(0.0, 10, 0) is False
    assert backlog.add(29.0, 40, 0) is False  # not 30 s of history yet
    assert backlog.add(31.0, 40, 0) is True
    assert backlog.add(62.0, 40, 0) is False  # flat over the last 30 s
    assert backlog.add(95.0, 5, 0) is False  # smaller
    other = Backlog()
    other.add(0.0, 1, 0)
    assert other.add(40.0, 9, 0) is False  # larger, but small


def test_a_backlog_knows_since_when_jobs_are_parked():
    """The first sample with parked jobs starts the clock; an empty parked queue stops it."""
    backlog = Backlog()
    backlog.add(10.0, 0, 0)
    backlog.add(12.0, 3, 3)
    backlog.add(20.0, 3, 3)

    assert backlog.parked_for(25.0) == 13.0
    backlog.add(30.0, 0, 0)
    assert backlog.parked_for(31.0) is None


def test_the_limiter_counts_calls_started_in_the_last_ten_seconds():
    """calls_per_second is the starts of the last 10 s divided by 10."""
    clock = [100.0]
    limiter = Limiter(1, 1000, clock=lambda: clock[0])

    async def five_calls() -> None:
        for _ in range(5):
            async with limiter:
                pass
            clock[0] += 1.0

    asyncio.run(five_calls())  # starts at 100 .. 104

    assert limiter.calls_per_second() == 0.5
    clock[0] = 112.5
    assert limiter.calls_per_second() == 0.2


@pytest.mark.parametrize(("code", "http_status", "words"), [
    ("10000001", 401, PAUSE_WORDS["10000001"]),
    (errors.UNAUTHORIZED, 401, PAUSE_WORDS[errors.UNAUTHORIZED]),
    ("10000024", 400, PAUSE_WORDS["10000024"]),
    ("10000030", 400, PAUSE_WORDS["10000030"]),
    (errors.JASPER_UNREACHABLE, None, OUTAGE_WORDS),
    ("30000001", 500, OUTAGE_WORDS),
    (errors.UNEXPECTED_RESPONSE, 503, OUTAGE_WORDS),
    ("TLS_UNTRUSTED", None, OTHER_WORDS),
])
def test_every_pause_reason_has_words_for_the_operator(code, http_status, words):
    """Each pause reason of the operator guide's section 5 gets its own words; an
    outage gets the outage's; a reason this page does not know gets generic ones."""
    assert pause_words(ErrorInfo(code, http_status, "m", True)) == words


# -- collect() on a real Worker ------------------------------------------------------------

def body(n: int, *, lane: str = "interactive", received_at: float = 0.0) -> dict[str, Any]:
    return {"event_id": f"e{n}", "event_code": 65516, "client_id": f"c{n}",
            "command": "activate", "iccid": f"8961018500{n:010d}", "communicator_type": "T",
            "stamp": n, "lane": lane, "received_at": received_at}


async def test_collect_reads_a_running_owner(settings: Settings):
    """Held jobs per lane, the oldest one's age, calls/s and limits come off the worker."""
    client = Client(settings)
    rig = Rig(settings, client)
    worker, history = rig.worker, rig.history
    assert not owns(worker)
    history.hold.clear()  # signals unconfirmed: the jobs stay held
    now = time.time()
    for n, lane in enumerate(["interactive", "bulk", "bulk"]):
        rig.broker.publish(rig.work if lane == "interactive" else rig.bulk, Message(
            json.dumps(body(n, lane=lane, received_at=now - 30 + n)).encode()))
    await worker.start()
    await until(lambda: len(client.calls) == 1 and len(worker.lanes) == 3)

    facts = collect(worker, Finals(), TypeQueues(
        work=QueueDepth(ready=4, consumers=2), bulk=QueueDepth(ready=6, consumers=2)),
        Backlog(), now_s=now)

    assert owns(worker)
    assert (facts.held, facts.waiting) == (LaneCounts(interactive=1, bulk=2),
                                           LaneCounts(interactive=5, bulk=8))
    assert (facts.backlog, facts.parked, facts.paused) == (13, 0, None)
    assert facts.oldest_waiting_age_s == 30.0
    assert not facts.oldest_waiting_at_least
    assert (facts.calls_per_second, facts.requests_per_second) == (0.1, 1000)
    assert (facts.in_flight, facts.max_concurrency) == (0, 1)
    history.hold.set()
    await worker.stop(1)


async def test_collect_reads_a_paused_owner(settings: Settings):
    """A wrong key: the pause's code, message, words, since and next probe; parked jobs
    and a lower bound on the oldest one's age."""
    client = Client(settings, CommunicatorMisconfigured("10000001", "Invalid credentials", 401))
    rig = Rig(settings, client)
    worker = rig.worker
    await worker.start()
    before = time.time()
    for n in range(3):
        rig.broker.publish(rig.work, Message(json.dumps(body(n)).encode()))
    await until(lambda: len(rig.broker.queues.get(rig.parked, [])) == 3
                and worker.pause.next_probe_at is not None)

    facts = collect(worker, Finals(), TypeQueues(), Backlog(), now_s=time.time() + 5)

    assert facts.paused is not None
    assert (facts.paused.code, facts.paused.http_status) == ("10000001", 401)
    assert facts.paused.words == PAUSE_WORDS["10000001"]
    assert facts.paused.since is not None
    assert facts.paused.next_probe_at is not None
    assert before <= facts.paused.since.timestamp() <= time.time()
    assert 0.9 <= (facts.paused.next_probe_at - facts.paused.since).total_seconds() <= 1.5
    assert (facts.parked, facts.backlog) == (3, 3)
    assert facts.oldest_waiting_at_least
    assert facts.oldest_waiting_age_s is not None
    assert facts.oldest_waiting_age_s >= 5
    await worker.stop(1)
    assert worker.pause.since is None
    assert worker.pause.next_probe_at is None


# -- assemble() ----------------------------------------------------------------------------

def owner_facts(name: str, **over: Any) -> OwnerFacts:
    fields: dict[str, Any] = {
        "communicator_type": name, "collected_at": NOW, "paused": None,
        "calls_per_second": 0.8, "requests_per_second": 2.0, "in_flight": 1,
        "max_concurrency": 1, "held": LaneCounts(interactive=1), "parked": 0,
        "queues": TypeQueues(work=QueueDepth(ready=2, consumers=2)),
        "waiting": LaneCounts(interactive=3, bulk=0), "backlog": 3,
        "backlog_growing": False, "oldest_waiting_age_s": 4.2,
        "oldest_waiting_at_least": False,
        "time_to_final": LaneLatency(interactive=Latency(p50_s=0.4, p99_s=1.2, count=40)),
        "dead_lettered_10m": 0, "failures": [], **over}
    return OwnerFacts(**fields)


def paused_facts(code: str, message: str, http_status: int | None = 401) -> PauseFacts:
    return PauseFacts(code=code, http_status=http_status, message=message,
                      words=pause_words(ErrorInfo(code, http_status, message, True)),
                      since=datetime.fromtimestamp(T0 - 125, UTC),
                      next_probe_at=datetime.fromtimestamp(T0 + 12, UTC))


def report(host: str, pid: int, owned: list[OwnerFacts], **over: Any) -> Report:
    fields: dict[str, Any] = {
        "instance": f"{host}-{pid}", "host": host, "pid": pid, "version": "0.1.0",
        "started_at": NOW, "sent_at": NOW, "owned": owned,
        "queues": {"M2MOne NZ": TypeQueues(work=QueueDepth(ready=2, consumers=2)),
                   "M2MOne AU": TypeQueues(work=QueueDepth(ready=7, consumers=2),
                                           parked=QueueDepth(ready=1, consumers=0))},
        "dead_letters": 3, **over}
    return Report(**fields)


ME = Process(host="pod-b", pid=7)


def test_any_replica_shows_the_owner_and_its_standbys():
    """The owner of each type is the freshest report claiming it; the others stand by."""
    settings = two_types()
    heard = [(report("pod-a", 1, [owner_facts("M2MOne NZ"), owner_facts("M2MOne AU")]), 1.0),
             (report("pod-b", 7, []), 0.2)]

    page = assemble(settings, heard, me=ME, no_owner_s={}, broker_connected=True,
                    refresh_s=5, ttl_s=10, now_s=T0)

    nz, au = page.communicator_types
    assert (nz.state, nz.owner, nz.standbys) == ("running", Process(host="pod-a", pid=1),
                                                 [Process(host="pod-b", pid=7)])
    assert (nz.calls_per_second, nz.in_flight, nz.facts_age_s) == (0.8, 1, 1.0)
    assert au.owner == Process(host="pod-a", pid=1)
    assert [(p.host, p.owns) for p in page.processes] == [
        ("pod-a", ["M2MOne NZ", "M2MOne AU"]), ("pod-b", [])]
    assert page.dead_letters == 3


def test_an_owner_not_heard_within_the_ttl_is_no_owner():
    """A report older than the TTL (a dead owner) leaves its types with no owner for N s,
    with the queue depths any live process saw."""
    settings = two_types()
    heard = [(report("pod-a", 1, [owner_facts("M2MOne NZ")]), 11.0),
             (report("pod-b", 7, []), 0.5)]

    page = assemble(settings, heard, me=ME, no_owner_s={"M2MOne NZ": 11.0, "M2MOne AU": 30},
                    broker_connected=True, refresh_s=5, ttl_s=10, now_s=T0)

    nz, au = page.communicator_types
    assert (nz.state, nz.owner, nz.no_owner_for_s, nz.attention) == (
        "no_owner", None, 11.0, ["no owner for 11 s"])
    assert nz.standbys == [Process(host="pod-b", pid=7)]
    assert au.queued.work == QueueDepth(ready=7, consumers=2)
    assert au.parked == 1
    assert [p.host for p in page.processes] == ["pod-b"]


def test_a_stopping_process_is_gone_at_once():
    """A process that said it stops is neither owner nor standby."""
    heard = [(report("pod-a", 1, [], stopping=True), 0.1), (report("pod-b", 7, []), 0.1)]

    page = assemble(two_types(), heard, me=ME, no_owner_s={}, broker_connected=True,
                    refresh_s=5, ttl_s=10, now_s=T0)

    assert [p.host for p in page.processes] == ["pod-b"]
    assert page.communicator_types[0].standbys == [Process(host="pod-b", pid=7)]


def test_paused_and_growing_types_ask_for_attention():
    """A paused type says so and why; a growing backlog is named too."""
    paused = paused_facts("10000001", "Invalid credentials")
    heard = [(report("pod-a", 1, [owner_facts("M2MOne NZ", backlog_growing=True),
                                  owner_facts("M2MOne AU", paused=paused)]), 1.0)]

    nz, au = assemble(two_types(), heard, me=ME, no_owner_s={}, broker_connected=True,
                      refresh_s=5, ttl_s=10, now_s=T0).communicator_types

    assert (nz.state, nz.attention) == ("running", ["backlog growing"])
    assert (au.state, au.attention, au.pause) == ("paused", ["paused"], paused)


def test_no_secret_of_the_config_reaches_the_facts():
    """User names, API keys and the AMQP password are removed from the error texts the
    owner shares (Control Center may echo them)."""
    settings = two_types().model_copy(update={
        "amqp_url": SecretStr("amqp://svc-user:amqp-pass-9@rabbit/")})
    board = StatusBoard(settings, Finals())
    failure = Failure(at=NOW, client_id="c", iccid=None, code="X",
                      message="user user-0 with key secret-key-0 refused (amqp-pass-9)")
    facts = owner_facts("M2MOne NZ", failures=[failure],
                        paused=paused_facts("10000001", "user-1 refused"))

    text = board._scrubbed(facts).model_dump_json()

    for secret in ("user-0", "secret-key-0", "user-1", "amqp-pass-9", "svc-user"):
        assert secret not in text
    assert "user *** with key *** refused (***)" in text


def test_the_board_forgets_a_silent_process_and_counts_since_its_owner_was_heard():
    """A report not refreshed within the TTL is dropped; its type shows no owner for the
    time since the report came; a stopping report removes its process at once."""
    board = StatusBoard(two_types(), Finals())
    now = time.monotonic()
    board._listening_since = now - 60  # listening for a minute
    board._remember(report("pod-a", 1, [owner_facts("M2MOne NZ")]), now - 12)
    board._remember(report("pod-b", 7, [owner_facts("M2MOne AU")]), now - 1)

    nz, au = board.snapshot().communicator_types

    assert (nz.state, au.state) == ("no_owner", "running")
    assert 12 <= (nz.no_owner_for_s or 0) < 13
    board._remember(report("pod-b", 7, [], stopping=True), time.monotonic())
    assert board.snapshot().processes == []
