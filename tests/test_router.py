"""The router's decisions, with the broker and publisher replaced by fakes."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from jasper_consumer import edge
from jasper_consumer.config import Settings, parse_settings
from jasper_consumer.errors import PublishFailed
from jasper_consumer.metrics import Metrics
from jasper_consumer.router import EPOCH_SCALE, Router

ICCID_A = "89610185002345678901"
ICCID_B = "89610185002345678902"

ACKS = edge.Acks()  # the tests' one ack path, as the service hands out its own


class Deliveries:
    """A consumer channel: hands out delivery tags in order, as the broker does, and keeps
    every ack and nack frame sent on it (the router's acks are batched by :data:`ACKS`)."""

    def __init__(self) -> None:
        self.is_closed = False
        self.frames: list[tuple[str, int, bool]] = []  # (ack or nack, tag, multiple)
        self._tags = itertools.count(1)
        self._delivered: list[int] = []

    def deliver(self) -> int:
        tag = next(self._tags)
        self._delivered.append(tag)
        return tag

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        self.frames.append(("ack", tag, multiple))

    def answers(self, tag: int) -> list[str]:
        """What the broker makes of the frames, in order, for one delivery: a multiple ack
        answers every delivery up to its tag that is not answered yet."""
        answered: dict[int, list[str]] = {t: [] for t in self._delivered}
        for kind, upto, multiple in self.frames:
            for t in [t for t in self._delivered if t <= upto and not answered[t]] \
                    if multiple else [upto]:
                answered[t].append(kind)
        return answered[tag]


class FakeMessage:
    def __init__(self, body: dict[str, Any] | bytes, channel: Deliveries | None = None) -> None:
        self.channel = channel or Deliveries()
        self.delivery_tag = self.channel.deliver()
        self.body = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.message_id = None if isinstance(body, bytes) else body["event_id"]
        self.headers: dict[str, Any] = {}
        self.routing_key = "event.65516"
        self.priority: int | None = None
        self.content_type = "application/json"

    @property
    def answers(self) -> list[str]:
        return self.channel.answers(self.delivery_tag)

    async def ack(self) -> None:
        self.channel.frames.append(("ack", self.delivery_tag, False))

    async def nack(self, requeue: bool = True) -> None:
        self.channel.frames.append(("nack", self.delivery_tag, False))

    async def reject(self, requeue: bool = True) -> None:
        self.channel.frames.append(("reject", self.delivery_tag, False))


async def routed(router: Router, *messages: FakeMessage) -> None:
    """Route the messages at once, then send the acks :data:`ACKS` holds back."""
    await asyncio.gather(*(router.on_message(m) for m in messages))  # type: ignore[arg-type]
    await ACKS.flush_all()


class FakeEpochs:
    """The router-epoch queue: basic.get hands out what was published; a nacked message
    comes back, an acked one is gone."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def get(self, *, fail: bool, no_ack: bool) -> Any:
        if not self.bodies:
            return None
        body = self.bodies.pop(0)
        message = FakeMessage(b"")
        message.body = body
        epochs = self

        async def nack(requeue: bool = True) -> None:
            epochs.bodies.append(body)

        message.nack = nack  # type: ignore[method-assign]
        return message


class FakeChannel:
    def __init__(self, epochs: FakeEpochs) -> None:
        self.epochs = epochs

    async def get_queue(self, name: str, ensure: bool = True) -> FakeEpochs:
        assert name.endswith(".router-epoch")
        return self.epochs


class FakePublisher:
    def __init__(self, fail_first: int, epochs: FakeEpochs | None = None) -> None:
        self.fail_first = fail_first
        self.epochs = epochs or FakeEpochs()
        self.work_items: list[dict[str, Any]] = []
        self.dead: list[str] = []
        self.fail_epoch = 0

    async def to_queue(self, queue: str, body: bytes, message_id: str,
                       headers: Any = None) -> None:
        await asyncio.sleep(0)
        if queue.endswith(".router-epoch"):
            if self.fail_epoch:
                self.fail_epoch -= 1
                raise PublishFailed("not confirmed")
            self.epochs.bodies.append(body)
            return
        if self.fail_first:
            self.fail_first -= 1
            raise PublishFailed("not confirmed")
        self.work_items.append(json.loads(body))

    async def dead_letter(self, body: bytes, reason: str, **_: Any) -> None:
        self.dead.append(reason)


def make_router(settings: Settings, publisher: FakePublisher) -> Router:
    return Router(settings, publisher, Metrics(CollectorRegistry()),  # type: ignore[arg-type]
                  FakeChannel(publisher.epochs), ACKS)  # type: ignore[arg-type]


@pytest.fixture
def settings() -> Settings:
    return parse_settings({"communicator_types": [{
        "name": "M2MOne NZ", "server_address": "https://j.example/rws/api/v1",
        "username": "u", "api_key": "k"}]}, {})


def event(n: int, iccid: str, code: int = 65516) -> dict[str, Any]:
    return {"event_id": f"e{n}", "event_code": code, "client_id": "c",
            "device": {"ref_no": iccid, "communicator_type": "M2MOne NZ"}}


async def test_a_handed_back_event_keeps_its_successors_behind_it(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
):
    """When forwarding fails, later events for that SIM are handed back too, others go on;
    the batched ack of one that went on, sent while they are still unanswered, answers
    only it. The failed one is rejected (it counts against the delivery limit on every
    RabbitMQ version), the one handed back to keep order nacked (no failure of its own)."""
    # 1 is handed back 10 ms after it failed: 3's ack, batched for 2 ms, leaves before.
    monkeypatch.setattr(edge, "REDELIVERY_PAUSE_S", 0.01)
    publisher = FakePublisher(fail_first=1)
    router = make_router(settings, publisher)
    channel = Deliveries()
    messages = [FakeMessage(event(1, ICCID_A), channel),
                FakeMessage(event(2, ICCID_A, 65517), channel),
                FakeMessage(event(3, ICCID_B), channel)]

    await routed(router, *messages)

    assert [m.answers for m in messages] == [["reject"], ["nack"], ["ack"]]
    assert channel.frames[0] == ("ack", 3, False)
    assert [w["event_id"] for w in publisher.work_items] == ["e3"]


async def test_jobs_are_stamped_in_forwarding_order(settings: Settings):
    """Each forwarded job carries a strictly increasing router stamp."""
    publisher = FakePublisher(fail_first=0)
    router = make_router(settings, publisher)
    channel = Deliveries()
    messages = [FakeMessage(event(n, ICCID_A, 65516 + n % 2), channel) for n in range(5)]

    await routed(router, *messages)

    assert [m.answers for m in messages] == [["ack"]] * 5
    stamps = [w["stamp"] for w in publisher.work_items]
    assert [w["event_id"] for w in publisher.work_items] == [f"e{n}" for n in range(5)]
    assert stamps == sorted(set(stamps))


async def test_a_new_router_stamps_above_the_old_one(settings: Settings):
    """A router that takes over (another process, any clock) continues above every stamp of
    the one before, through the epoch kept in the broker; so does a reconnected one."""
    epochs = FakeEpochs()
    first, second = FakePublisher(0, epochs), FakePublisher(0, epochs)
    old, new = make_router(settings, first), make_router(settings, second)

    old_channel = Deliveries()
    for n in range(3):
        await routed(old, FakeMessage(event(n, ICCID_A), old_channel))
    await routed(new, FakeMessage(event(9, ICCID_A), Deliveries()))
    await routed(old, FakeMessage(event(10, ICCID_A), Deliveries()))  # old, reconnected

    old_stamps = [w["stamp"] for w in first.work_items]
    assert max(old_stamps[:3]) < second.work_items[0]["stamp"] < old_stamps[3]
    assert epochs.bodies == [b"3"]


@pytest.mark.parametrize("body", [b"[" * 50_000, b'{"client_id": "c", "event_code": '
                                  + b"9" * 5000 + b"}", b"\xff\xfe", b'"just a string"'])
async def test_whatever_the_parser_raises_the_message_is_settled(settings: Settings,
                                                                  body: bytes):
    """Deep nesting, a 5,000-digit number, bad UTF-8, a non-object: dead-lettered and acked."""
    publisher = FakePublisher(fail_first=0)
    router = make_router(settings, publisher)
    message = FakeMessage(body)

    await routed(router, message)

    assert message.answers == ["ack"]
    assert len(publisher.dead) == 1


async def test_a_failed_epoch_write_gives_the_epoch_back(settings: Settings,
                                                          monkeypatch: pytest.MonkeyPatch):
    """When writing the new epoch is not confirmed, the epoch read is given back: the next
    try continues above it, never at 1 again."""
    monkeypatch.setattr(edge, "REDELIVERY_PAUSE_S", 0)
    epochs = FakeEpochs()
    epochs.bodies.append(b"7")
    publisher = FakePublisher(0, epochs)
    publisher.fail_epoch = 1
    router = make_router(settings, publisher)

    channel = Deliveries()
    first = FakeMessage(event(1, ICCID_A), channel)
    await routed(router, first)
    second = FakeMessage(event(2, ICCID_B), channel)
    await routed(router, second)

    assert (first.answers, second.answers) == (["reject"], ["ack"])
    assert [w["stamp"] // EPOCH_SCALE for w in publisher.work_items] == [8]
    assert epochs.bodies == [b"8"]
