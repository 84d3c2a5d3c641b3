"""Publishing signals (history.py) with a fake channel that records what is published."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from pamqp import commands as spec
from prometheus_client import CollectorRegistry

from jasper_consumer.config import Command, parse_settings
from jasper_consumer.edge import Acks
from jasper_consumer.errors import PublishFailed
from jasper_consumer.events import Job
from jasper_consumer.history import History
from jasper_consumer.metrics import Metrics
from jasper_consumer.outcomes import ErrorInfo, Outcome
from jasper_consumer.router import Router
from jasper_consumer.topology import Names


class Underlay:
    """The aiormq channel: records publishes; a Nack for the exchanges in ``fail``."""

    def __init__(self, log: list[tuple[str, str]], fail: set[str]) -> None:
        self.log = log
        self.fail = fail

    async def basic_publish(self, body: bytes, *, exchange: str, routing_key: str,
                            **_: Any) -> Any:
        if exchange in self.fail:
            return spec.Basic.Nack()
        self.log.append((exchange, routing_key))
        return spec.Basic.Ack()


class Channel:
    def __init__(self, fail: set[str] | None = None) -> None:
        self.log: list[tuple[str, str]] = []
        self.underlay = Underlay(self.log, fail or set())

    async def get_underlay_channel(self) -> Underlay:
        return self.underlay


@pytest.fixture
def names() -> Names:
    return Names.from_settings(parse_settings({"communicator_types": [{
        "name": "T", "server_address": "https://j.example/rws/api/v1", "username": "u",
        "api_key": "k"}]}, {}))


class Delivery:
    """An event as the router receives it (no delivery tag: acked one by one)."""

    def __init__(self, event: dict[str, Any]) -> None:
        self.body = json.dumps(event).encode()
        self.message_id = event["event_id"]
        self.channel, self.delivery_tag = "channel", None
        self.headers: dict[str, Any] = {}
        self.answers: list[str] = []

    async def ack(self) -> None:
        self.answers.append("ack")


JOB = Job(event_id="e1", event_code=65516, client_id="c", command=Command.ACTIVATE,
          iccid="89610185002345678901", communicator_type="T")
EVENT: dict[str, Any] = {"event_id": "e2", "event_code": 65516, "client_id": "c"}
EXHAUSTED = Outcome.failed(ErrorInfo("RETRIES_EXHAUSTED", 503, "gave up", True,
                                     cause="30000001"), 5)


async def test_the_dead_letter_copy_is_confirmed_before_the_signal(names: Names):
    """Retries ran out: the copy for replay goes first, then the signal (hole 10)."""
    channel = Channel()
    history = History(channel, names, Metrics(CollectorRegistry()))  # type: ignore[arg-type]

    await history.final(JOB, EXHAUSTED, started=time.perf_counter(), type_label="T",
                        attempts=5)

    assert channel.log == [(names.dead_exchange, ""), (names.history_exchange,
                                                       "jasper.failed")]


async def test_a_lost_copy_sends_no_signal(names: Names):
    """When the broker does not confirm the copy, no signal is published: the job is not
    settled, and its next try publishes both."""
    channel = Channel(fail={names.dead_exchange})
    history = History(channel, names, Metrics(CollectorRegistry()))  # type: ignore[arg-type]

    with pytest.raises(PublishFailed):
        await history.final(JOB, EXHAUSTED, started=time.perf_counter(), type_label="T",
                            attempts=5)

    assert channel.log == []


async def test_router_failures_count_in_commands_total_under_their_type():
    """A local failure is counted with its configured type, or "unknown" (README, Metrics):
    the router picks the label, the history counts it."""
    settings = parse_settings({"communicator_types": [{
        "name": "T", "server_address": "https://j.example/rws/api/v1", "username": "u",
        "api_key": "k"}]}, {})
    metrics = Metrics(CollectorRegistry())
    channel = Channel()
    history = History(channel, Names.from_settings(settings), metrics)  # type: ignore[arg-type]
    router = Router(settings, history, metrics, channel, Acks())  # type: ignore[arg-type]
    bad_iccid = Delivery({**EVENT, "device": {"ref_no": "12", "communicator_type": "T"}})
    other_type = Delivery({**EVENT, "device": {"ref_no": JOB.iccid,
                                               "communicator_type": "Vodafone NZ"}})

    for message in (bad_iccid, other_type):
        await router.on_message(message)  # type: ignore[arg-type]

    def failed(label: str) -> float | None:
        return metrics.registry.get_sample_value("jasper_commands_total", {
            "communicator_type": label, "command": "activate", "outcome": "failed"})

    assert (failed("T"), failed("unknown"), failed("Vodafone NZ")) == (1, 1, None)
    assert channel.log == [(settings.history_exchange, "jasper.failed")] * 2
    assert [m.answers for m in (bad_iccid, other_type)] == [["ack"], ["ack"]]


def test_message_ids_are_unique_without_a_syscall_each():
    """Signal message ids are a per-process prefix and a counter."""
    from jasper_consumer.history import message_id

    ids = {message_id() for _ in range(1000)}
    assert len(ids) == 1000
    prefixes = {i.rsplit("-", 1)[0] for i in ids}
    assert len(prefixes) == 1
    assert re.fullmatch(r"[0-9a-f]{12}", prefixes.pop())
