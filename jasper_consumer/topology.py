"""Exchanges, queues and bindings (SPEC §3, §4, §6), all named from ``queue_prefix``.

::

    patriot.events (topic) ──event.<code>──▶ <p>.events (quorum, single active consumer,
                                               DLX <p>.dlx, delivery limit)
    (default exchange)     ──────────────▶ <p>.work.<slug> (quorum, single active consumer,
                                               DLX <p>.dlx, work delivery limit)
    patriot.history (topic) ──jasper.#──▶ <p>.history (quorum)
    <p>.dlx (fanout) ────────────────────▶ <p>.dead (quorum)
    patriot.history ──<p>.parked.<slug> (BCC only)──▶ <p>.parked.<slug> (quorum): jobs that
                                               wait for a paused type, with their delayed signal
    (default exchange)     ──────────────▶ <p>.router-epoch (quorum): the router's epoch
    (default exchange)     ──────────────▶ <p>.calls.<slug> (quorum, message TTL 60 s):
                                               operator tools' Control Center calls, made
                                               by the process that owns the type (calls.py)

Declaring is idempotent; the same arguments are used every time so a redeclare on
an existing broker never fails with PRECONDITION_FAILED.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue
from pamqp.common import FieldTable

from .config import CommunicatorType, Settings
from .errors import ConfigError

DEAD_REASON_HEADER = "x-jasper-error"
# A token on a work queue, not a job: "anchor" (held by the owner while jobs are parked) or
# "wake" (an operator tool's, so that an idle owner learns it is the owner).
TOKEN_HEADER = "x-jasper-token"
# Set by `dead-letters replay` (value: the dead letter's reason); the router marks the
# job replayed, so the worker applies it even though it has seen the event before.
REPLAYED_HEADER = "x-jasper-replayed-from"
CALLS_TTL_MS = 60_000  # a tool's request waiting longer than this in <p>.calls.<slug> expires


@dataclass(frozen=True)
class Names:
    """Every name the service uses on the broker."""

    prefix: str
    events_exchange: str
    history_exchange: str

    @property
    def events_queue(self) -> str:
        return f"{self.prefix}.events"

    @property
    def history_queue(self) -> str:
        return f"{self.prefix}.history"

    @property
    def dead_queue(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def dead_exchange(self) -> str:
        return f"{self.prefix}.dlx"

    def work_queue(self, ct: CommunicatorType) -> str:
        return f"{self.prefix}.work.{ct.slug}"

    def parked_queue(self, ct: CommunicatorType) -> str:
        """Jobs of a paused type (also the BCC routing key that reaches it)."""
        return f"{self.prefix}.parked.{ct.slug}"

    def reply_queue(self) -> str:
        """An operator tool's own reply queue (exclusive; a new name each time)."""
        return f"{self.prefix}.reply.{uuid.uuid4().hex}"

    def direct_queue(self, ct: CommunicatorType) -> str:
        """Held (exclusive, empty) by the one operator tool that calls the type's account
        itself while no service runs (tools/calls.py)."""
        return f"{self.prefix}.direct.{ct.slug}"

    @property
    def epoch_queue(self) -> str:
        return f"{self.prefix}.router-epoch"
    def calls_queue(self, ct: CommunicatorType) -> str:
        return f"{self.prefix}.calls.{ct.slug}"

    @classmethod
    def from_settings(cls, settings: Settings) -> Names:
        return cls(settings.queue_prefix, settings.events_exchange, settings.history_exchange)


@dataclass
class Topology:
    """The declared broker objects a channel can use."""

    names: Names
    events_exchange: AbstractExchange
    history_exchange: AbstractExchange
    dead_exchange: AbstractExchange
    events_queue: AbstractQueue
    work_queues: dict[str, AbstractQueue]  # by communicator type name
    calls_queues: dict[str, AbstractQueue] = field(default_factory=dict)  # by type name


def _quorum(settings: Settings, delivery_limit: int, **extra: bool) -> FieldTable:
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": f"{settings.queue_prefix}.dlx",
        "x-delivery-limit": delivery_limit,
        **extra,
    }


async def declare(channel: AbstractChannel, settings: Settings) -> Topology:
    """Declare everything (idempotent) and return handles bound to ``channel``.

    Raises :class:`ConfigError` naming the queue when one exists with other arguments
    (e.g. left by an older version), since the broker then refuses the declaration.
    """
    try:
        return await _declare(channel, settings)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise ConfigError([
            f"RabbitMQ refused to declare the topology: {exc.args[0] if exc.args else exc}. "
            "A queue or exchange of this queue_prefix exists with other settings: delete it "
            "once it is drained, or use another queue_prefix"]) from None


async def _declare(channel: AbstractChannel, settings: Settings) -> Topology:
    names = Names.from_settings(settings)
    events_x = await channel.declare_exchange(
        names.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    history_x = await channel.declare_exchange(
        names.history_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    dead_x = await channel.declare_exchange(
        names.dead_exchange, aio_pika.ExchangeType.FANOUT, durable=True)

    dead_q = await channel.declare_queue(
        names.dead_queue, durable=True, arguments={"x-queue-type": "quorum"})
    await dead_q.bind(dead_x, routing_key="")

    if settings.history_queue:
        history_q = await channel.declare_queue(
            names.history_queue, durable=True, arguments={"x-queue-type": "quorum"})
        await history_q.bind(history_x, routing_key=settings.history_binding)

    events_q = await channel.declare_queue(
        names.events_queue, durable=True,
        # One router at a time across replicas: its per-ICCID chain is what keeps events
        # for a SIM in publish order on their way to the work queue.
        arguments=_quorum(settings, settings.delivery_limit,
                          **{"x-single-active-consumer": True}))
    for code in sorted(settings.commands):
        await events_q.bind(events_x, routing_key=f"event.{code}")

    await channel.declare_queue(
        names.epoch_queue, durable=True, arguments={"x-queue-type": "quorum"})

    work: dict[str, AbstractQueue] = {}
    for ct in settings.communicator_types:
        work[ct.name] = await channel.declare_queue(
            names.work_queue(ct), durable=True,
            # Returns after crashes and failovers count as deliveries, and so do the
            # owner's anchor tokens during a pause: this limit must outlast long pauses.
            arguments=_quorum(settings, settings.work_delivery_limit,
                              **{"x-single-active-consumer": True}))
        parked = await channel.declare_queue(
            names.parked_queue(ct), durable=True,
            arguments=_quorum(settings, settings.work_delivery_limit))
        await parked.bind(history_x, routing_key=names.parked_queue(ct))
    calls: dict[str, AbstractQueue] = {}
    for ct in settings.communicator_types:
        # Requests from operator tools (reconcile) that the type's owner makes through its
        # own limiter; one nobody takes within a minute is dropped (the tool gave up).
        calls[ct.name] = await channel.declare_queue(
            names.calls_queue(ct), durable=True,
            # Quorum, like every other queue: a classic queue lives on one node, and with
            # that node down the service could not even start on a cluster.
            arguments={"x-queue-type": "quorum", "x-message-ttl": CALLS_TTL_MS})
    return Topology(names, events_x, history_x, dead_x, events_q, work, calls)


def all_queues(settings: Settings) -> list[str]:
    """Every queue :func:`declare` declares for ``settings``."""
    names = Names.from_settings(settings)
    queues = [names.events_queue, names.history_queue, names.dead_queue, names.epoch_queue]
    for ct in settings.communicator_types:
        queues += [names.work_queue(ct), names.parked_queue(ct), names.calls_queue(ct)]
    return queues


async def delete_all(channel: AbstractChannel, settings: Settings) -> None:
    """Remove every queue and the dead-letter exchange (tests and teardown only)."""
    for q in all_queues(settings):
        await channel.queue_delete(q)
    await channel.exchange_delete(Names.from_settings(settings).dead_exchange)


async def remove_topology(connection: AbstractConnection, settings: Settings) -> None:
    """Remove every queue and exchange of ``settings`` (tests, demos, teardown only)."""
    channel = await connection.channel()
    await delete_all(channel, settings)
    await channel.exchange_delete(settings.events_exchange)
    await channel.exchange_delete(settings.history_exchange)
    await channel.close()
