"""The router's decisions, with the broker and publisher replaced by fakes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from jasper_consumer import edge
from jasper_consumer.config import Settings, parse_settings
from jasper_consumer.history import PublishFailed
from jasper_consumer.metrics import Metrics
from jasper_consumer.router import Router

ICCID_A = "89610185002345678901"
ICCID_B = "89610185002345678902"


class FakeMessage:
    def __init__(self, body: dict[str, Any]) -> None:
        self.body = json.dumps(body).encode()
        self.message_id = body["event_id"]
        self.headers: dict[str, Any] = {}
        self.routing_key = "event.65516"
        self.content_type = "application/json"
        self.answers: list[str] = []

    async def ack(self) -> None:
        self.answers.append("ack")

    async def nack(self, requeue: bool = True) -> None:
        self.answers.append("nack")


class FakePublisher:
    def __init__(self, fail_first: int) -> None:
        self.fail_first = fail_first
        self.work_items: list[dict[str, Any]] = []

    async def work(self, queue: str, body: bytes, message_id: str, headers: Any = None) -> None:
        await asyncio.sleep(0)
        if self.fail_first:
            self.fail_first -= 1
            raise PublishFailed("not confirmed")
        self.work_items.append(json.loads(body))


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
    """When forwarding fails, later events for that SIM are handed back too, others go on."""
    monkeypatch.setattr(edge, "REDELIVERY_PAUSE_S", 0)
    publisher = FakePublisher(fail_first=1)
    router = Router(settings, publisher, Metrics(CollectorRegistry()))  # type: ignore[arg-type]
    messages = [FakeMessage(event(1, ICCID_A)), FakeMessage(event(2, ICCID_A, 65517)),
                FakeMessage(event(3, ICCID_B))]

    await asyncio.gather(*(router.on_message(m) for m in messages))  # type: ignore[arg-type]

    assert [m.answers for m in messages] == [["nack"], ["nack"], ["ack"]]
    assert [w["event_id"] for w in publisher.work_items] == ["e3"]


async def test_jobs_are_stamped_in_forwarding_order(settings: Settings):
    """Each forwarded job carries a strictly increasing router stamp."""
    publisher = FakePublisher(fail_first=0)
    router = Router(settings, publisher, Metrics(CollectorRegistry()))  # type: ignore[arg-type]
    messages = [FakeMessage(event(n, ICCID_A, 65516 + n % 2)) for n in range(5)]

    await asyncio.gather(*(router.on_message(m) for m in messages))  # type: ignore[arg-type]

    stamps = [w["routed_ns"] for w in publisher.work_items]
    assert [w["event_id"] for w in publisher.work_items] == [f"e{n}" for n in range(5)]
    assert stamps == sorted(set(stamps))
