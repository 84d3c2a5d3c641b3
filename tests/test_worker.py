"""The worker (stage 2) with the broker, history and Control Center replaced by fakes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiormq
import pytest
from prometheus_client import CollectorRegistry

from jasper_consumer import calls
from jasper_consumer.config import Command, Settings, parse_settings
from jasper_consumer.errors import CommunicatorMisconfigured, JasperError
from jasper_consumer.jasper.limiter import Limiter
from jasper_consumer.metrics import Metrics
from jasper_consumer.signals import Kind
from jasper_consumer.topology import Names
from jasper_consumer.worker import Worker

ICCID = "89610185002345678901"


class Channel:
    def __init__(self) -> None:
        self.close_callbacks: set[Callable[..., None]] = set()
        self.parked = 0

    async def declare_queue(self, name: str, passive: bool = False) -> Any:
        return type("Declared", (), {"declaration_result": type(
            "Ok", (), {"message_count": self.parked, "consumer_count": 1})()})()

    async def close(self) -> None:
        pass

    async def set_qos(self, prefetch_count: int) -> None:
        pass

    async def get_queue(self, name: str, ensure: bool = True) -> Any:
        channel = self

        class Q:
            async def consume(self, callback: Any) -> str:
                return "tag"
        del channel
        return Q()


class Message:
    def __init__(self, body: dict[str, Any], channel: object, headers: dict[str, Any] | None
                 = None) -> None:
        self.body = json.dumps(body).encode()
        self.channel = channel
        self.delivery_tag = None
        self.headers = headers or {}
        self.message_id = body.get("event_id")
        self.acked = False

    async def ack(self) -> None:
        self.acked = True


class Queue:
    def __init__(self) -> None:
        self.channel = Channel()
        self.callback: Any = None

    async def consume(self, callback: Any) -> str:
        self.callback = callback
        return "ctag"


class History:
    """Records every publish; ``hold`` keeps publishes waiting (an unconfirmed publish)."""

    def __init__(self) -> None:
        self.signals: list[tuple[str, Kind, dict[str, Any]]] = []
        self.queued: list[tuple[str, dict[str, Any]]] = []
        self.hold = asyncio.Event()
        self.hold.set()

    async def report(self, subject: Any, kind: Kind, **fields: Any) -> None:
        await self.hold.wait()
        self.signals.append((subject.event_id, kind, fields))

    async def final(self, job: Any, outcome: Any, **fields: Any) -> None:
        await self.hold.wait()
        self.signals.append((job.event_id, Kind(outcome.result.value), fields))

    async def to_queue(self, queue: str, body: bytes, message_id: Any,
                       headers: Any = None) -> None:
        self.queued.append((queue, dict(headers or {})))

    async def dead_letter(self, body: bytes, reason: str, **_: Any) -> None:
        self.queued.append(("dead", {"reason": reason}))


class Client:
    """Control Center: answers each PUT from a script (default: success)."""

    def __init__(self, settings: Settings, *answers: JasperError | None) -> None:
        self.ct = settings.communicator_types[0]
        self.limiter = Limiter(1, 1000)
        self.answers = list(answers)
        self.calls: list[tuple[str, Command]] = []
        self.called_at: list[float] = []  # loop time of each call, at the call

    async def put_status(self, iccid: str, command: Command, *, admit: Any = None) -> str:
        async with self.limiter:
            if admit is not None:
                admit()
            self.calls.append((iccid, command))
            self.called_at.append(asyncio.get_running_loop().time())
            answer = self.answers.pop(0) if self.answers else None
            if answer is not None:
                raise answer
            return command.target_status

    async def probe(self) -> None:
        await asyncio.sleep(3600)


@pytest.fixture
def settings() -> Settings:
    return parse_settings({"communicator_types": [{
        "name": "T", "server_address": "https://j.example/rws/api/v1", "username": "u",
        "api_key": "k", "request_timeout_seconds": 0.01, "requests_per_second": 1000}]}, {})


def make(settings: Settings, client: Client) -> tuple[Worker, Queue, History]:
    queue, history = Queue(), History()

    async def open_channel() -> Any:
        return queue.channel

    worker = Worker(settings.communicator_types[0], settings, client,  # type: ignore[arg-type]
                    history, Metrics(CollectorRegistry()), queue=queue,  # type: ignore[arg-type]
                    names=Names.from_settings(settings), open_channel=open_channel,
                    parked_prefetch=4)
    return worker, queue, history


def job(n: int, command: str = "activate") -> dict[str, Any]:
    return {"event_id": f"e{n}", "event_code": 65516, "client_id": "c", "command": command,
            "iccid": ICCID, "communicator_type": "T", "stamp": n}


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def test_a_job_is_acked_only_after_its_signal_is_confirmed(settings: Settings):
    """The message stays unacked while its signal is not confirmed; then it is acked."""
    client = Client(settings)
    worker, queue, history = make(settings, client)
    await worker.start()
    history.hold.clear()
    message = Message(job(1), "channel-1")

    await queue.callback(message)
    await until(lambda: bool(client.calls))
    await asyncio.sleep(0.02)
    assert not message.acked
    history.hold.set()
    await until(lambda: message.acked)

    assert history.signals[0][:2] == ("e1", Kind.SUCCEEDED)
    await worker.stop(1)


async def test_jobs_of_a_paused_type_are_parked_with_their_delayed_signal(settings: Settings):
    """A wrong key pauses the type: the job that hit it and those behind it each get one
    delayed signal that also parks them (BCC key), and are acked; one anchor goes to the
    work queue; no further call is made."""
    client = Client(settings, CommunicatorMisconfigured("10000001", "Invalid credentials", 401))
    worker, queue, history = make(settings, client)
    await worker.start()
    messages = [Message(job(n, "activate" if n % 2 else "deactivate"), "channel-1")
                for n in range(1, 6)]

    for message in messages:
        await queue.callback(message)
    await until(lambda: all(m.acked for m in messages))

    delayed = [(e, f["park_key"], f["attempts"]) for e, k, f in history.signals
               if k is Kind.DELAYED]
    parked = f"{settings.queue_prefix}.parked.t"
    assert delayed == [("e1", parked, 1)] + [(f"e{n}", parked, 0) for n in range(2, 6)]
    assert [q for q, headers in history.queued if headers.get("x-jasper-token")] == \
        [f"{settings.queue_prefix}.work.t"]
    assert client.calls == [(ICCID, Command.ACTIVATE)]
    assert worker.parking.count == 5
    await worker.stop(1)


def slower(settings: Settings, timeout_s: float) -> Settings:
    """The same settings with another request timeout (the new owner's wait)."""
    ct = settings.communicator_types[0].model_copy(update={"request_timeout_seconds": timeout_s})
    return settings.model_copy(update={"communicator_types": [ct]})


async def test_a_new_owner_waits_before_its_first_call(settings: Settings):
    """The first delivery on a new channel holds calls back one interval plus the request
    timeout (the previous owner's last request may still be open)."""
    settings = slower(settings, 0.2)
    client = Client(settings)
    worker, queue, _ = make(settings, client)
    await worker.start()
    started = asyncio.get_running_loop().time()

    await queue.callback(Message(job(1), "channel-1"))
    await until(lambda: bool(client.calls))

    assert client.called_at[0] - started >= 0.2
    await worker.stop(1)


async def test_losing_the_channel_stops_every_call(settings: Settings):
    """When the work queue's channel closes during the new owner's wait, the job waiting
    here is dropped (the broker returns it) and no call starts, also after the wait."""
    settings = slower(settings, 0.1)
    client = Client(settings)
    worker, queue, history = make(settings, client)
    await worker.start()
    await queue.callback(Message(job(1), "channel-1"))
    await asyncio.sleep(0.01)

    for callback in queue.channel.close_callbacks:
        callback(None)
    await asyncio.sleep(0.3)  # well past the 0.1 s wait

    assert client.calls == []
    assert len(worker.lanes) == 0
    assert history.signals == []
    await worker.stop(1)


async def test_an_unreachable_calls_queue_holds_up_no_job(settings: Settings,
                                                         monkeypatch: pytest.MonkeyPatch):
    """A calls queue that cannot be consumed (its cluster nodes are down)
    delays no job of the type; it is consumed once it can be."""
    client = Client(settings)
    worker, queue, _ = make(settings, client)
    calls_queue = f"{settings.queue_prefix}.calls.t"
    consumed: list[str] = []
    reachable = asyncio.Event()

    async def get_queue(name: str, ensure: bool = True) -> Any:
        class Q:
            async def consume(self, callback: Any) -> str:
                if name == calls_queue and not reachable.is_set():
                    raise aiormq.exceptions.ChannelNotFoundEntity(
                        f"NOT_FOUND - home node of durable queue '{name}' is down")
                consumed.append(name)
                return "tag"
        return Q()

    monkeypatch.setattr(queue.channel, "get_queue", get_queue)
    monkeypatch.setattr(calls, "CONSUME_RETRY_MIN_S", 0.01)
    await worker.start()
    message = Message(job(1), "channel-1")

    await queue.callback(message)
    await until(lambda: message.acked)
    assert calls_queue not in consumed
    reachable.set()
    await until(lambda: calls_queue in consumed)

    assert client.calls == [(ICCID, Command.ACTIVATE)]
    await worker.stop(1)
