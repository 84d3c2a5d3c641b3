"""The worker (stage 2) on an in-memory broker (tests/fakebroker.py) with Control Center
replaced by a script: ownership, lanes, the pause, the take-over."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from jasper_consumer import calls
from jasper_consumer.anchor import ANCHOR_BEHIND
from jasper_consumer.app import worker_parts
from jasper_consumer.bulk import PUSHED_PREFETCH
from jasper_consumer.config import Command, RetrySettings, Settings, parse_settings
from jasper_consumer.edge import Acks
from jasper_consumer.errors import CommunicatorMisconfigured, JasperError, JasperRetryable
from jasper_consumer.jasper.limiter import Limiter
from jasper_consumer.metrics import Metrics
from jasper_consumer.ownerlog import owned_record, released_record
from jasper_consumer.signals import Kind
from jasper_consumer.topology import TOKEN_HEADER, Names
from jasper_consumer.worker import Worker

from .fakebroker import Broker, History, Message

ICCID = "89610185002345678901"
OTHER = "89610185002345678902"


class Client:
    """Control Center: answers each PUT from a script (default: success); ``gate`` holds
    the calls of one ICCID until set."""

    def __init__(self, settings: Settings, *answers: JasperError | None) -> None:
        self.ct = settings.communicator_types[0]
        self.limiter = Limiter(self.ct.max_concurrency, self.ct.requests_per_second)
        self.answers = list(answers)
        self.calls: list[tuple[str, Command]] = []
        self.called_at: list[float] = []  # loop time of each call, at the call
        self.gates: dict[str, asyncio.Event] = {}

    async def put_status(self, iccid: str, command: Command, *, admit: Any = None,
                         granted: bool = False) -> str:
        if not granted:
            await self.limiter.acquire()
        try:
            if admit is not None:
                admit()
        except BaseException:
            self.limiter.discard()
            raise
        try:
            self.calls.append((iccid, command))
            self.called_at.append(asyncio.get_running_loop().time())
            if iccid in self.gates:
                await self.gates[iccid].wait()
            answer = self.answers.pop(0) if self.answers else None
            if answer is not None:
                raise answer
            return command.target_status
        finally:
            self.limiter.release()

    async def probe(self) -> None:
        await asyncio.sleep(3600)


def make_settings(**type_fields: Any) -> Settings:
    return parse_settings({"communicator_types": [{
        "name": "T", "server_address": "https://j.example/rws/api/v1", "username": "u",
        "api_key": "k", "request_timeout_seconds": 0.5, "requests_per_second": 1000,
        **type_fields}]}, {})


@pytest.fixture
def settings() -> Settings:
    return make_settings()


class Rig:
    """A worker on the fake broker, with names of its queues."""

    def __init__(self, settings: Settings, client: Client, broker: Broker | None = None,
                 prefetch: int = 64) -> None:
        self.settings, self.client = settings, client
        self.broker = broker or Broker()
        self.history = History(self.broker)
        names = Names.from_settings(settings)
        ct = settings.communicator_types[0]
        self.work, self.bulk = names.work_queue(ct), names.bulk_queue(ct)
        self.parked, self.owner_log = names.parked_queue(ct), names.owner_queue(ct)
        metrics = Metrics(CollectorRegistry())
        parts = worker_parts(ct, settings, names, client,  # type: ignore[arg-type]
                             self.history, metrics,  # type: ignore[arg-type]
                             self.broker.open_channel,  # type: ignore[arg-type]
                             Acks(), parked_at_once=4)
        self.worker = Worker(ct, settings, client,  # type: ignore[arg-type]
                             self.history, metrics, parts,  # type: ignore[arg-type]
                             names=names,
                             open_channel=self.broker.open_channel,  # type: ignore[arg-type]
                             prefetch=prefetch)

    def job(self, n: int, command: str = "activate", iccid: str = ICCID,
            lane: str = "interactive") -> None:
        body = json.dumps({"event_id": f"e{n}", "event_code": 65516, "client_id": "c",
                           "command": command, "iccid": iccid, "communicator_type": "T",
                           "stamp": n, "lane": lane}).encode()
        self.broker.publish(self.work if lane == "interactive" else self.bulk,
                            Message(body, message_id=f"e{n}"))

    def finals(self) -> list[str]:
        return [e for e, k, _ in self.history.signals if k is not Kind.DELAYED]


async def until(condition: Callable[[], bool], timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def test_a_job_is_acked_only_after_its_signal_is_confirmed(settings: Settings):
    """The message stays unacked while its signal is not confirmed; then it is acked."""
    rig = Rig(settings, Client(settings))
    await rig.worker.start()
    rig.history.hold.clear()
    rig.job(1)

    await until(lambda: bool(rig.client.calls))
    await asyncio.sleep(0.02)
    assert rig.broker.channels[0].unacked  # the job (and the anchor) still held
    held = [m for m in rig.broker.channels[0].unacked if not m.headers]
    assert held
    rig.history.hold.set()
    await until(lambda: all(m.acked for m in held))

    assert rig.history.signals[0][:2] == ("e1", Kind.SUCCEEDED)
    await rig.worker.stop(1)


async def test_the_first_owner_ever_calls_at_once(settings: Settings):
    """With an empty ownership log (a first start) there is no wait before the first call,
    however long the request timeout."""
    settings = make_settings(request_timeout_seconds=30)
    rig = Rig(settings, Client(settings))
    await rig.worker.start()
    started = asyncio.get_running_loop().time()
    rig.job(1)

    await until(lambda: bool(rig.client.calls), timeout=2)

    assert rig.client.called_at[0] - started < 1.0
    await rig.worker.stop(1)


async def test_after_a_clean_hand_over_the_new_owner_calls_at_once(settings: Settings):
    """A log whose last owner recorded that it released the type: no wait."""
    settings = make_settings(request_timeout_seconds=30)
    rig = Rig(settings, Client(settings))
    rig.broker.publish(rig.owner_log, Message(owned_record("old")))
    rig.broker.publish(rig.owner_log, Message(released_record("old")))
    await rig.worker.start()
    started = asyncio.get_running_loop().time()
    rig.job(1)

    await until(lambda: bool(rig.client.calls), timeout=2)

    assert rig.client.called_at[0] - started < 1.0
    await rig.worker.stop(1)


async def test_after_a_crash_the_new_owner_waits_before_its_first_call(settings: Settings):
    """A previous owner that did not record a release may have a request open: the first
    call waits one interval plus the request timeout."""
    settings = make_settings(request_timeout_seconds=0.3)
    rig = Rig(settings, Client(settings))
    rig.broker.publish(rig.owner_log, Message(owned_record("crashed")))
    await rig.worker.start()
    started = asyncio.get_running_loop().time()
    rig.job(1)

    await until(lambda: bool(rig.client.calls))

    assert rig.client.called_at[0] - started >= 0.3
    await rig.worker.stop(1)


async def test_a_clean_stop_records_the_release_once_its_calls_ended(settings: Settings):
    """SIGTERM: after the last call, the log gets ``released`` for this ownership."""
    rig = Rig(settings, Client(settings))
    await rig.worker.start()
    rig.job(1)
    await until(lambda: bool(rig.finals()))

    await rig.worker.stop(1)

    kinds = [json.loads(m.body)["kind"] for m in rig.broker.queues[rig.owner_log]]
    assert kinds == ["owned", "released"]


async def test_interactive_jobs_go_before_bulk_jobs_waiting(settings: Settings):
    """With bulk jobs waiting, a commission takes the next call."""
    settings = make_settings(requests_per_second=20)
    rig = Rig(settings, Client(settings))
    for n in range(1, 21):
        rig.job(n, "deactivate", iccid=f"8961018500{n:010d}", lane="bulk")
    await rig.worker.start()
    await until(lambda: len(rig.client.calls) >= 2)
    rig.job(100, iccid=ICCID)

    await until(lambda: (ICCID, Command.ACTIVATE) in rig.client.calls)

    assert rig.client.calls.index((ICCID, Command.ACTIVATE)) <= 4
    await rig.worker.stop(1)


async def test_an_older_bulk_job_after_a_newer_commission_is_superseded(settings: Settings):
    """A bulk decommission (older) still queued when a commission of the same SIM is applied
    is SUPERSEDED; the SIM ends ACTIVATED."""
    rig = Rig(settings, Client(settings))
    for n in range(1, 11):  # a bulk backlog in front
        rig.job(n, "deactivate", iccid=f"8961018500{n:010d}", lane="bulk")
    rig.job(11, "deactivate", iccid=ICCID, lane="bulk")
    rig.job(12, "activate", iccid=ICCID)
    await rig.worker.start()

    await until(lambda: {"e11", "e12"} <= set(rig.finals()))

    calls_for_sim = [c for c in rig.client.calls if c[0] == ICCID]
    assert calls_for_sim[-1] == (ICCID, Command.ACTIVATE)
    outcomes = {e: f.get("error") for e, k, f in rig.history.signals if e in ("e11", "e12")}
    if (ICCID, Command.DEACTIVATE) not in calls_for_sim:  # not applied first: superseded
        assert outcomes["e11"] is not None
        assert outcomes["e11"].code == "SUPERSEDED"
    await rig.worker.stop(1)


async def test_jobs_of_a_paused_type_are_parked_with_their_delayed_signal(settings: Settings):
    """A wrong key pauses the type: the job that hit it and those behind it each get one
    delayed signal that also parks them (BCC key), and are acked; no further call."""
    client = Client(settings, CommunicatorMisconfigured("10000001", "Invalid credentials", 401))
    rig = Rig(settings, client)
    await rig.worker.start()
    for n in range(1, 6):
        rig.job(n, "activate" if n % 2 else "deactivate")

    await until(lambda: len(rig.broker.queues.get(rig.parked, [])) == 5)

    delayed = [(e, f["park_key"], f["attempts"]) for e, k, f in rig.history.signals
               if k is Kind.DELAYED]
    assert sorted(delayed) == sorted([("e1", rig.parked, 1)]
                                     + [(f"e{n}", rig.parked, 0) for n in range(2, 6)])
    assert client.calls == [(ICCID, Command.ACTIVATE)]
    assert rig.worker.parking.rules.count == 5
    await rig.worker.stop(1)


async def test_a_failing_token_publish_never_signals_a_parked_job_twice(settings: Settings):
    """Parking is one publish; a token that cannot be published (the anchor's renewal)
    costs no second delayed signal (issue #16, defect 3)."""
    settings = settings.model_copy(update={"hold_refresh_seconds": 0.05})
    client = Client(settings, CommunicatorMisconfigured("10000001", "Invalid credentials", 401))
    rig = Rig(settings, client)
    await rig.worker.start()
    await until(lambda: rig.worker.owner)
    rig.history.fail = lambda queue, headers: "x-jasper-token" in headers
    for n in range(1, 4):
        rig.job(n)

    await until(lambda: len(rig.broker.queues.get(rig.parked, [])) == 3)
    await asyncio.sleep(0.2)  # several renewals fail meanwhile

    delayed = [e for e, k, _ in rig.history.signals if k is Kind.DELAYED]
    assert sorted(delayed) == ["e1", "e2", "e3"]
    await rig.worker.stop(1)


async def test_a_pause_parks_what_waits_behind_a_call_under_way_at_once(settings: Settings):
    """With max_concurrency 2, a pause that hits another SIM parks the jobs queued behind a
    call still under way without waiting for that call (issue #16, defect 5)."""
    settings = make_settings(max_concurrency=2)
    client = Client(settings, CommunicatorMisconfigured("10000001", "Invalid", 401))
    client.gates[ICCID] = asyncio.Event()
    rig = Rig(settings, client)
    await rig.worker.start()
    rig.job(1, iccid=ICCID)  # its call hangs
    await until(lambda: len(client.calls) == 1)
    rig.job(2, "deactivate", iccid=ICCID)
    rig.job(3, iccid=OTHER)  # its call pauses the type
    await until(lambda: len(client.calls) == 2)

    await until(lambda: any(e == "e2" and k is Kind.DELAYED
                            for e, k, _ in rig.history.signals), timeout=2)

    client.gates[ICCID].set()
    await rig.worker.stop(1)


async def test_the_retry_budget_does_not_count_the_wait_for_the_account(settings: Settings):
    """The first event after a crash take-over meets one 500: it is retried, though the
    take-over's wait was longer than its whole retry budget."""
    settings = make_settings(request_timeout_seconds=0.4).model_copy(update={
        "retry": RetrySettings(max_attempts=3, initial_delay_seconds=0.01,
                               max_delay_seconds=0.02, max_elapsed_seconds=0.3)})
    client = Client(settings, JasperRetryable("30000001", "Unknown server error", 500))
    rig = Rig(settings, client)
    rig.broker.publish(rig.owner_log, Message(owned_record("crashed")))
    await rig.worker.start()
    rig.job(1)

    await until(lambda: bool(rig.finals()))

    assert [k for e, k, _ in rig.history.signals] == [Kind.SUCCEEDED]
    assert len(client.calls) == 2
    await rig.worker.stop(1)


async def test_losing_the_channel_stops_every_call(settings: Settings):
    """When the work queue's channel closes during the new owner's wait, the job waiting
    here is dropped (the broker returns it) and no call starts, also after the wait."""
    settings = make_settings(request_timeout_seconds=0.1)
    rig = Rig(settings, Client(settings))
    rig.broker.publish(rig.owner_log, Message(owned_record("crashed")))
    await rig.worker.start()
    rig.job(1)
    await until(lambda: len(rig.worker.lanes) == 1)

    await rig.broker.channels[0].close()
    await asyncio.sleep(0.3)  # well past the 0.1 s wait

    assert rig.client.calls == []
    assert len(rig.worker.lanes) == 0
    assert rig.history.signals == []
    await rig.worker.stop(1)


async def test_a_failed_take_over_gives_the_type_back(settings: Settings,
                                                      monkeypatch: pytest.MonkeyPatch):
    """A side channel that fails during the take-over does not leave the type stalled: the
    worker closes its channel (the broker returns the jobs) and consumes again; the job is
    then applied (issue #16, defect 2)."""
    rig = Rig(settings, Client(settings))
    failures = [RuntimeError("channel closed by the broker")]
    real = rig.worker.owner_log.take_over

    async def take_over(keep: Any) -> Any:
        if failures:
            raise failures.pop()
        return await real(keep)

    monkeypatch.setattr(rig.worker.owner_log, "take_over", take_over)
    monkeypatch.setattr("jasper_consumer.worker.GIVE_BACK_WAIT_S", 0.01)
    rig.job(1)
    await rig.worker.start()

    await until(lambda: rig.finals() == ["e1"])

    assert len(rig.client.calls) == 1
    await rig.worker.stop(1)


async def test_an_unreachable_calls_queue_holds_up_no_job(settings: Settings,
                                                         monkeypatch: pytest.MonkeyPatch):
    """A calls queue that cannot be consumed (its cluster nodes are down) delays no job of
    the type; it is consumed once it can be."""
    rig = Rig(settings, Client(settings))
    calls_queue = f"{settings.queue_prefix}.calls.t"
    rig.broker.unreachable.add(calls_queue)
    monkeypatch.setattr(calls, "CONSUME_RETRY_MIN_S", 0.01)
    await rig.worker.start()
    rig.job(1)

    await until(lambda: rig.finals() == ["e1"])
    assert calls_queue not in rig.broker.consumers
    rig.broker.unreachable.clear()
    await until(lambda: calls_queue in rig.broker.consumers)

    await rig.worker.stop(1)


async def test_a_first_owner_waits_while_a_tool_calls_the_account_itself(settings: Settings):
    """An operator tool that started while no service ran holds <prefix>.direct.<slug> and
    calls the account itself: a new owner then waits as after a crash (its last request
    may be open), though the ownership log is empty."""
    settings = make_settings(request_timeout_seconds=0.3)
    rig = Rig(settings, Client(settings))
    direct = Names.from_settings(settings).direct_queue(settings.communicator_types[0])
    rig.broker.queues[direct] = []  # the tool's exclusive queue exists
    await rig.worker.start()
    started = asyncio.get_running_loop().time()
    rig.job(1)

    await until(lambda: bool(rig.client.calls))

    assert rig.client.called_at[0] - started >= 0.3
    await rig.worker.stop(1)


async def test_a_pause_before_the_sources_open_leaves_the_parked_queue_alone(
        settings: Settings, monkeypatch: pytest.MonkeyPatch):
    """The first call may come before the take-over has opened the parked queue (here: the
    previous owner still holds the hold). If it pauses the type, opening the sources
    afterwards must not drain the jobs just parked: they wait for the resume."""
    monkeypatch.setattr("jasper_consumer.hold.HOLD_POLL_S", 0.01)
    client = Client(settings, CommunicatorMisconfigured("10000001", "Invalid credentials", 401))
    rig = Rig(settings, client)
    hold = Names.from_settings(settings).hold_queue(settings.communicator_types[0])
    previous = await rig.broker.open_channel()
    await previous.queue_declare(hold, exclusive=True)  # the previous owner's
    for n in range(1, 4):
        rig.job(n, iccid=f"8961018500234567890{n}")
    await rig.worker.start()
    await until(lambda: len(rig.broker.queues.get(rig.parked, [])) == 3)

    await previous.close()  # the hold is let go: the sources open, the type still paused
    await until(lambda: rig.worker.feed.pulling)

    assert rig.worker.pause.error is not None
    assert not rig.worker.parking.rules.draining
    assert len(rig.broker.queues[rig.parked]) == 3, "parked jobs taken while paused"
    assert len([k for _, k, _ in rig.history.signals if k is Kind.DELAYED]) == 3
    assert rig.finals() == []
    await rig.worker.stop(1)


async def test_a_new_owner_takes_no_bulk_job_while_the_previous_one_holds_some(
        settings: Settings, monkeypatch: pytest.MonkeyPatch):
    """The previous owner still holds the hold queue (its channels not closed yet: a stuck
    broker, a frozen process): the new owner applies interactive jobs under guards but
    takes nothing from the bulk queue until the hold is let go."""
    monkeypatch.setattr("jasper_consumer.hold.HOLD_POLL_S", 0.01)
    rig = Rig(settings, Client(settings))
    hold = Names.from_settings(settings).hold_queue(settings.communicator_types[0])
    previous = await rig.broker.open_channel()
    await previous.queue_declare(hold, exclusive=True)  # the previous owner's
    rig.job(1, "deactivate", iccid=OTHER, lane="bulk")
    rig.job(2, "activate", iccid=ICCID)
    await rig.worker.start()

    await until(lambda: rig.finals() == ["e2"])
    await asyncio.sleep(0.05)
    assert rig.broker.queues[rig.bulk], "no bulk job taken while the hold is held"
    await previous.close()  # the previous owner lets go (or its connection dies)
    await until(lambda: "e1" in rig.finals())

    await rig.worker.stop(1)


async def test_after_a_clean_hand_over_the_account_spacing_holds_across_owners(
        settings: Settings):
    """The previous owner's last call started just now: the release says when the next may
    start (one interval after it), and the new owner's first call keeps to it."""
    settings = make_settings(request_timeout_seconds=30)
    rig = Rig(settings, Client(settings))
    rig.broker.publish(rig.owner_log, Message(owned_record("old")))
    rig.broker.publish(rig.owner_log, Message(released_record("old", time.time() + 0.3)))
    await rig.worker.start()
    started = asyncio.get_running_loop().time()
    rig.job(1)

    await until(lambda: bool(rig.client.calls), timeout=2)

    assert 0.25 <= rig.client.called_at[0] - started < 1.0
    await rig.worker.stop(1)


class Resuming(Client):
    """Control Center whose Echo fails until ``fixed`` is set: the type resumes then."""

    def __init__(self, settings: Settings, *answers: JasperError | None) -> None:
        super().__init__(settings, *answers)
        self.fixed = asyncio.Event()

    async def probe(self) -> None:
        if not self.fixed.is_set():
            raise CommunicatorMisconfigured("10000001", "Invalid credentials", 401)


def sim(n: int) -> str:
    return f"8961018500{n:010d}"


async def test_while_paused_the_bulk_queue_is_pushed_and_pulled_again_after_the_resume(
        settings: Settings):
    """Paused, every bulk job is taken by push (a few hundred in flight, not one round trip
    each) and parked with one delayed signal; once the type runs again the push consumer is
    gone and the parked jobs are applied."""
    client = Resuming(settings, CommunicatorMisconfigured("10000001", "Invalid", 401))
    rig = Rig(settings, client)
    for n in range(1, 41):
        rig.job(n, "deactivate", iccid=sim(n), lane="bulk")
    await rig.worker.start()
    assert not rig.broker.consumers.get(rig.bulk)  # running: pulled, not pushed

    await until(lambda: len(rig.broker.queues.get(rig.parked, [])) == 40)
    assert rig.broker.consumers.get(rig.bulk), "paused: the bulk queue is consumed by push"
    assert rig.worker.feed.bulk.consuming
    delayed = [e for e, k, _ in rig.history.signals if k is Kind.DELAYED]
    assert sorted(delayed) == sorted(f"e{n}" for n in range(1, 41))

    client.fixed.set()
    await until(lambda: not rig.broker.consumers.get(rig.bulk) and len(rig.finals()) == 40)
    assert not rig.worker.feed.bulk.consuming
    await rig.worker.stop(1)


async def test_the_anchor_is_replaced_once_jobs_are_parked_behind_it(settings: Settings):
    """Parking, the anchor held at the head of the work queue's deliveries would make every
    ack behind it a single ack: after ANCHOR_BEHIND jobs a fresh token is published, and
    only once it is confirmed is the anchor acked (a token is always in the queue or in
    hand, to wake a standby)."""
    client = Client(settings, CommunicatorMisconfigured("10000001", "Invalid", 401))
    rig = Rig(settings, client)
    await rig.worker.start()
    await until(lambda: rig.worker.owner and rig.worker.anchor.held is not None)
    anchor = rig.worker.anchor.held
    assert isinstance(anchor, Message)
    refused = asyncio.Event()

    def fail(queue: str, headers: dict[str, Any]) -> bool:
        if TOKEN_HEADER in headers:
            refused.set()
            return True
        return False

    rig.history.fail = fail
    jobs = ANCHOR_BEHIND + 8
    for n in range(1, jobs + 1):
        rig.job(n, iccid=sim(n))

    await until(lambda: len(rig.broker.queues.get(rig.parked, [])) == jobs)
    await until(refused.is_set)
    assert not anchor.acked, "acked before a fresh token was confirmed"
    assert rig.worker.anchor.held is anchor

    rig.history.fail = lambda queue, headers: False
    await until(lambda: anchor.acked, timeout=5)  # the next try, after a 1 s back-off
    assert rig.worker.anchor.renewals == 1
    await until(lambda: rig.worker.anchor.held is not None)  # the fresh token, now the anchor
    assert rig.worker.anchor.held is not anchor
    await rig.worker.stop(1)


async def test_a_running_type_only_pulls_its_bulk_queue(settings: Settings):
    """Not paused, bulk jobs are pulled a few at a time: no push consumer is ever made on
    the bulk queue (it would hold hundreds past the consumer timeout at 1 call/s)."""
    client = Client(settings)
    rig = Rig(settings, client)
    for n in range(1, 41):
        rig.job(n, "deactivate", iccid=sim(n), lane="bulk")
    await rig.worker.start()

    await until(lambda: len(rig.finals()) == 40)
    assert not rig.broker.consumers.get(rig.bulk)
    assert all(channel.prefetch != PUSHED_PREFETCH for channel in rig.broker.channels)
    await rig.worker.stop(1)
