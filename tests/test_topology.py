"""Every queue the service declares keeps the rules that let it run on RabbitMQ 3.10 to 4.3.

:func:`declare` runs against a channel that records each declaration, so the rules are
checked on whatever it declares (queues added later included), not on a list kept here.
tests/integration/test_topology.py declares the same on the real broker and reads the
queues back with ``rabbitmqctl``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aiormq
import pytest
import yaml

from jasper_consumer.config import Settings, parse_settings
from jasper_consumer.topology import UNBOUNDED_DELIVERIES, all_queues, declare

from .external import REPO

#: Arguments RabbitMQ 4.3 refuses or that belong to classic queues only.
DEPRECATED = {"x-queue-mode", "x-queue-version", "x-queue-master-locator",
              "x-max-in-memory-length", "x-max-in-memory-bytes"}


@dataclass
class Declared:
    kind: str  # "queue" or "exchange"
    name: str
    durable: bool
    exclusive: bool = False
    auto_delete: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)


class _Handle:
    """A declared queue or exchange: binds are recorded on the channel."""

    def __init__(self, channel: RecordingChannel, name: str) -> None:
        self.channel = channel
        self.name = name

    async def bind(self, exchange: _Handle, routing_key: str = "", **_: Any) -> None:
        self.channel.bindings.append((exchange.name, self.name, routing_key))


class RecordingChannel:
    """Stands in for an aio-pika channel: records what :func:`declare` declares and binds.
    ``refuse`` names queues that exist with other arguments (the broker's
    PRECONDITION_FAILED, which also closes the channel)."""

    def __init__(self, refuse: frozenset[str] = frozenset()) -> None:
        self.declared: list[Declared] = []
        self.bindings: list[tuple[str, str, str]] = []
        self.refuse = refuse
        self.closed = False
        self.reopened = 0

    async def declare_exchange(self, name: str, type: Any = None, *, durable: bool = False,
                               **_: Any) -> _Handle:
        assert not self.closed
        self.declared.append(Declared("exchange", name, durable))
        return _Handle(self, name)

    async def declare_queue(self, name: str, *, durable: bool = False, exclusive: bool = False,
                            auto_delete: bool = False, arguments: dict[str, Any] | None = None,
                            **_: Any) -> _Handle:
        assert not self.closed
        if name in self.refuse and "x-delivery-limit" in (arguments or {}):
            self.closed = True
            raise aiormq.exceptions.ChannelPreconditionFailed(
                f"PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue '{name}'")
        self.declared.append(Declared("queue", name, durable, exclusive, auto_delete,
                                      dict(arguments or {})))
        return _Handle(self, name)

    async def reopen(self) -> None:
        self.closed = False
        self.reopened += 1


def _settings(**overrides: Any) -> Settings:
    raw = yaml.safe_load((REPO / "deploy" / "k8s" / "base" / "config.yaml").read_text())
    return parse_settings({**raw, **overrides}, {"AMQP_URL": "amqp://u:p@rabbitmq/"})


async def declarations(settings: Settings) -> RecordingChannel:
    channel = RecordingChannel()
    await declare(channel, settings)  # type: ignore[arg-type]
    return channel


def rule_breaches(queue: Declared, exchanges: set[str]) -> list[str]:
    """What is wrong with one queue declaration for RabbitMQ 3.10 to 4.3."""
    args = queue.arguments
    problems = []
    if not queue.durable or queue.exclusive or queue.auto_delete:
        problems.append("not a plain durable queue (4.3 refuses transient non-exclusive ones)")
    if args.get("x-queue-type") != "quorum":
        problems.append(f"x-queue-type is {args.get('x-queue-type')!r}, not quorum")
    limit = args.get("x-delivery-limit")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        problems.append(f"no explicit x-delivery-limit >= 1 (got {limit!r}; RabbitMQ 4's "
                        "default is 20, and -1 drops a message at its first return on 3.x)")
    dlx = args.get("x-dead-letter-exchange")
    if dlx is None and isinstance(limit, int) and limit < UNBOUNDED_DELIVERIES:
        problems.append(f"a limit of {limit} with no dead-letter exchange drops messages")
    if dlx is not None and dlx not in exchanges:
        problems.append(f"dead-letters to {dlx!r}, which declare() does not declare")
    problems += [f"deprecated argument {a}" for a in sorted(DEPRECATED & set(args))]
    return problems


@pytest.mark.parametrize("history_queue", [True, False])
async def test_every_declared_queue_keeps_the_rabbitmq_4_rules(history_queue):
    """Each queue declare() declares is a durable quorum queue with an explicit delivery
    limit, a declared dead-letter exchange or an unbounded limit, and no deprecated
    argument."""
    channel = await declarations(_settings(history_queue=history_queue))
    exchanges = {d.name for d in channel.declared if d.kind == "exchange"}
    queues = [d for d in channel.declared if d.kind == "queue"]

    assert queues
    assert {q.name: rule_breaches(q, exchanges) for q in queues} == \
        {q.name: [] for q in queues}


async def test_all_queues_lists_what_declare_declares():
    """topology.all_queues (what teardown and the harnesses delete) is every queue
    declare() declares."""
    settings = _settings()
    channel = await declarations(settings)

    assert sorted(d.name for d in channel.declared if d.kind == "queue") == \
        sorted(all_queues(settings))


async def test_dead_letter_queue_outlasts_any_number_of_listings():
    """<prefix>.dead has no dead-letter exchange and a limit no listing pattern reaches."""
    settings = _settings()
    channel = await declarations(settings)
    (dead,) = [d for d in channel.declared if d.name == f"{settings.queue_prefix}.dead"]

    assert "x-dead-letter-exchange" not in dead.arguments
    assert dead.arguments["x-delivery-limit"] == UNBOUNDED_DELIVERIES


def test_rule_check_flags_what_rabbitmq_4_breaks():
    """The check itself catches a missing limit, -1, a deprecated argument, a classic queue."""
    exchanges = {"p.dlx"}

    assert rule_breaches(Declared("queue", "q", True, arguments={"x-queue-type": "quorum"}),
                         exchanges)
    assert rule_breaches(Declared("queue", "q", True, arguments={
        "x-queue-type": "quorum", "x-delivery-limit": -1}), exchanges)
    assert rule_breaches(Declared("queue", "q", True, arguments={
        "x-queue-type": "quorum", "x-delivery-limit": 20}), exchanges)
    assert rule_breaches(Declared("queue", "q", True, arguments={
        "x-queue-type": "classic", "x-queue-mode": "lazy"}), exchanges)
    assert not rule_breaches(Declared("queue", "q", True, arguments={
        "x-queue-type": "quorum", "x-delivery-limit": 20,
        "x-dead-letter-exchange": "p.dlx"}), exchanges)


async def test_a_queue_an_older_version_declared_is_taken_as_it_is(caplog):
    """A queue left by a version without the explicit limit is redeclared with its old
    arguments on a reopened channel, and a warning names it; the rest is declared as new."""
    settings = _settings()
    dead = f"{settings.queue_prefix}.dead"
    channel = RecordingChannel(refuse=frozenset({dead}))

    await declare(channel, settings)  # type: ignore[arg-type]

    (declared,) = [d for d in channel.declared if d.name == dead]
    assert declared.arguments == {"x-queue-type": "quorum"}
    assert channel.reopened == 1
    assert any(dead in r.getMessage() and "delivery-limit policy" in r.getMessage()
               for r in caplog.records)
    others = [d for d in channel.declared if d.kind == "queue" and d.name != dead]
    assert all("x-delivery-limit" in d.arguments for d in others)
