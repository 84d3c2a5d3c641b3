"""Publishing signals (history.py) with a fake channel that records what is published."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from pamqp import commands as spec
from prometheus_client import CollectorRegistry

from jasper_consumer.config import Command, parse_settings
from jasper_consumer.events import Job
from jasper_consumer.history import History, PublishFailed
from jasper_consumer.metrics import Metrics
from jasper_consumer.outcomes import ErrorInfo, Outcome
from jasper_consumer.signals import Kind
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


JOB = Job(event_id="e1", event_code=65516, client_id="c", command=Command.ACTIVATE,
          iccid="89610185002345678901", communicator_type="T")
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


async def test_router_failures_count_in_commands_total_under_their_type(names: Names):
    """A local failure is counted with its configured type, or "unknown" (README, Metrics)."""
    metrics = Metrics(CollectorRegistry())
    history = History(Channel(), names, metrics)  # type: ignore[arg-type]
    error = ErrorInfo("UNKNOWN_COMMUNICATOR_TYPE", None, "not configured", False)

    await history.report(JOB, Kind.FAILED, type_label="unknown", attempts=0,
                         started=time.perf_counter(), error=error)

    assert metrics.registry.get_sample_value("jasper_commands_total", {
        "communicator_type": "unknown", "command": "activate", "outcome": "failed"}) == 1


def test_message_ids_are_unique_without_a_syscall_each():
    """Signal message ids are a per-process prefix and a counter."""
    from jasper_consumer.history import message_id

    ids = {message_id() for _ in range(1000)}
    assert len(ids) == 1000
    prefixes = {i.rsplit("-", 1)[0] for i in ids}
    assert len(prefixes) == 1
    assert re.fullmatch(r"[0-9a-f]{12}", prefixes.pop())
