"""Exchanges, queues and bindings (docs/asyncapi.yaml; operator guide, section 13), all named
from ``queue_prefix``.

::

    patriot.events (topic) ──event.<code>──▶ <p>.events (quorum, single active consumer,
                                               DLX <p>.dlx, delivery limit)
    (default exchange)     ──────────────▶ <p>.work.<slug> (quorum, single active consumer,
                                               DLX <p>.dlx, work delivery limit)
    patriot.history (topic) ──jasper.#──▶ <p>.history (quorum)
    <p>.dlx (fanout) ────────────────────▶ <p>.dead (quorum)
    (default exchange)     ──────────────▶ <p>.bulk.<slug> (quorum): bulk jobs (reconcile's,
                                               replays, decommissions), pulled by the type's
                                               owner after interactive ones (bulk.py)
    patriot.history ──<p>.parked.<slug> (BCC only)──▶ <p>.parked.<slug> (quorum): jobs that
                                               wait for a paused type, with their delayed signal
    (default exchange)     ──────────────▶ <p>.owner.<slug> (quorum): the type's ownership
                                               log: clean hand-overs and guards (ownerlog.py)
    (default exchange)     ──────────────▶ <p>.router-epoch (quorum): the router's epoch
    (default exchange)     ──────────────▶ <p>.calls.<slug> (quorum, message TTL 60 s):
                                               operator tools' Control Center calls, made
                                               by the process that owns the type (calls.py)
    <p>.status (fanout) ─────────────────▶ <p>.status.<hex> (one per process, exclusive,
                                               auto-delete): every process's status report,
                                               for the status page (statusboard.py)

Declaring is idempotent; the same arguments are used every time so a redeclare on
an existing broker never fails with PRECONDITION_FAILED.

What every queue gets, for RabbitMQ 3.10 to 4.3 alike (operator guide, section 12,
RabbitMQ 4): it is a durable quorum queue with an explicit ``x-delivery-limit`` —
RabbitMQ 4 gives quorum queues a default of 20 and, where no dead-letter exchange is set,
drops a message past it. Queues whose returns are failures (events, work, parked) have the
configured limits and dead-letter to ``<p>.dlx``; the others (history, dead, router-epoch,
calls), whose messages come back for reasons that are not failures (a reader that stops, a
``dead-letters list``), get :data:`UNBOUNDED_DELIVERIES`. No deprecated argument
(``x-queue-mode``, ``x-queue-version``) is used. A queue an older version created with
fewer arguments keeps them (:func:`_queue`), since RabbitMQ cannot change them.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue
from pamqp.common import FieldTable

from .config import CommunicatorType, Settings
from .errors import ConfigError

# -- the message contract's headers (docs/asyncapi.yaml): every x-jasper-* name, here --------

# A dead letter's reason (every message in <prefix>.dead).
DEAD_REASON_HEADER = "x-jasper-error"
# A dead letter whose retries ran out: the last error's words.
LAST_ERROR_HEADER = "x-jasper-last-error"
# An unreadable event's routing key, kept on its dead letter.
ROUTING_KEY_HEADER = "x-jasper-routing-key"
# A token on a work queue, not a job: "anchor" (always held by the type's owner) or "wake"
# (a process's or an operator tool's, so that an idle owner learns it is the owner).
TOKEN_HEADER = "x-jasper-token"
# Set by `dead-letters replay` (value: the dead letter's reason); the router marks the
# job replayed, so the worker applies it even though it has seen the event before.
REPLAYED_HEADER = "x-jasper-replayed-from"
# A parked job (a delayed signal that is also the job's place in <prefix>.parked.<slug>):
# what it needs beyond the signal's fields to become the same job again (events.py).
STAMP_HEADER = "x-jasper-stamp"
OCCURRED_HEADER = "x-jasper-occurred-at"
JOB_REPLAYED_HEADER = "x-jasper-job-replayed"
ORIGIN_HEADER = "x-jasper-origin"
LANE_HEADER = "x-jasper-lane"
RECEIVED_HEADER = "x-jasper-received-at"
ATTEMPTS_HEADER = "x-jasper-attempts"  # calls made for the job before it was parked
CALLS_TTL_MS = 60_000  # a tool's request waiting longer than this in <p>.calls.<slug> expires
#: The delivery limit of queues whose returns are not failures. Not -1: RabbitMQ 4 reads -1
#: as "no limit", but 3.x drops the message at its first return. A billion returns is more
#: than any reader or ``dead-letters list`` makes in the life of a deployment.
UNBOUNDED_DELIVERIES = 1_000_000_000

log = logging.getLogger(__name__)


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

    def bulk_queue(self, ct: CommunicatorType) -> str:
        """Bulk jobs, pulled by the type's owner after interactive ones."""
        return f"{self.prefix}.bulk.{ct.slug}"

    def owner_queue(self, ct: CommunicatorType) -> str:
        """The type's ownership log (ownerlog.py)."""
        return f"{self.prefix}.owner.{ct.slug}"

    def parked_queue(self, ct: CommunicatorType) -> str:
        """Jobs of a paused type (also the BCC routing key that reaches it)."""
        return f"{self.prefix}.parked.{ct.slug}"

    def reply_queue(self) -> str:
        """An operator tool's own reply queue (exclusive; a new name each time)."""
        return f"{self.prefix}.reply.{uuid.uuid4().hex}"

    def hold_queue(self, ct: CommunicatorType) -> str:
        """Held (exclusive, empty) by the owner of the type while it takes from the type's
        bulk and parked queues: a new owner takes from them only once the previous one let
        go of this (operator guide, section 4, Order and crashes)."""
        return f"{self.prefix}.hold.{ct.slug}"

    def direct_queue(self, ct: CommunicatorType) -> str:
        """Held (exclusive, empty) by the one operator tool that calls the type's account
        itself while no service runs (tools/calls.py)."""
        return f"{self.prefix}.direct.{ct.slug}"

    @property
    def epoch_queue(self) -> str:
        return f"{self.prefix}.router-epoch"

    @property
    def status_exchange(self) -> str:
        """Fanout of every process's status report (the status page)."""
        return f"{self.prefix}.status"

    def status_queue(self) -> str:
        """A process's own queue of status reports (exclusive; a new name each time)."""
        return f"{self.prefix}.status.{uuid.uuid4().hex}"

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


def _kept(**extra: int) -> FieldTable:
    """A quorum queue whose messages come back for reasons that are not failures: no
    dead-letter exchange, and a delivery limit no such return reaches."""
    return {"x-queue-type": "quorum", "x-delivery-limit": UNBOUNDED_DELIVERIES, **extra}


async def _queue(channel: AbstractChannel, name: str, arguments: FieldTable,
                 legacy: FieldTable | None = None) -> AbstractQueue:
    """Declare a durable queue. One that an older version declared with the ``legacy``
    arguments (before the explicit delivery limit) is taken as it is, with a warning:
    RabbitMQ refuses to change a queue's arguments, and deleting it would lose its messages
    (the guide's RabbitMQ 4 section says how to give it the limit with a policy)."""
    try:
        return await channel.declare_queue(name, durable=True, arguments=arguments)
    except aiormq.exceptions.ChannelPreconditionFailed:
        if legacy is None:
            raise
    await channel.reopen()  # the refusal closed the channel
    queue = await channel.declare_queue(name, durable=True, arguments=legacy)
    log.warning(
        "queue %s was declared by an older version without an explicit delivery limit and "
        "keeps its arguments; on RabbitMQ 4 it gets the broker's default limit (20) and "
        "drops messages past it: give it a delivery-limit policy (operator guide, section "
        "12, RabbitMQ 4)", name, extra={"fields": {"queue": name}})
    return queue


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

    # Every `dead-letters list` hands each dead letter back: on RabbitMQ before 4.3 each
    # time counts as a delivery (4.3 counts only basic.reject; the tools return with
    # basic.nack), hence an unbounded limit rather than RabbitMQ 4's default of 20.
    legacy: FieldTable = {"x-queue-type": "quorum"}
    dead_q = await _queue(channel, names.dead_queue, _kept(), legacy)
    await dead_q.bind(dead_x, routing_key="")

    if settings.history_queue:
        history_q = await _queue(channel, names.history_queue, _kept(), legacy)
        await history_q.bind(history_x, routing_key=settings.history_binding)

    events_q = await channel.declare_queue(
        names.events_queue, durable=True,
        # One router at a time across replicas: its per-ICCID chain is what keeps events
        # for a SIM in publish order on their way to the work queue.
        arguments=_quorum(settings, settings.delivery_limit,
                          **{"x-single-active-consumer": True}))
    for code in sorted(settings.commands):
        await events_q.bind(events_x, routing_key=f"event.{code}")

    await _queue(channel, names.epoch_queue, _kept(), legacy)

    work: dict[str, AbstractQueue] = {}
    for ct in settings.communicator_types:
        work[ct.name] = await channel.declare_queue(
            names.work_queue(ct), durable=True,
            # Returns after crashes and failovers count as deliveries, and so do the
            # owner's anchor tokens during a pause: this limit must outlast long pauses.
            arguments=_quorum(settings, settings.work_delivery_limit,
                              **{"x-single-active-consumer": True}))
        # Pulled with basic.get by the type's owner only (no single active consumer: that
        # rules consumers); a job returned by a crash counts as a delivery, as on work.
        await channel.declare_queue(
            names.bulk_queue(ct), durable=True,
            arguments=_quorum(settings, settings.work_delivery_limit))
        parked = await channel.declare_queue(
            names.parked_queue(ct), durable=True,
            arguments=_quorum(settings, settings.work_delivery_limit))
        await parked.bind(history_x, routing_key=names.parked_queue(ct))
        # Read whole by each new owner (basic.get, then acked): a crash in a take-over
        # returns what it read, which must not count against a limit.
        await _queue(channel, names.owner_queue(ct), _kept())
    await channel.declare_exchange(
        names.status_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
    calls: dict[str, AbstractQueue] = {}
    for ct in settings.communicator_types:
        # Requests from operator tools (reconcile) that the type's owner makes through its
        # own limiter; one nobody takes within a minute is dropped (the tool gave up).
        # Quorum, like every other queue: a classic queue lives on one node, and with
        # that node down the service could not even start on a cluster.
        calls[ct.name] = await _queue(
            channel, names.calls_queue(ct), _kept(**{"x-message-ttl": CALLS_TTL_MS}),
            {"x-queue-type": "quorum", "x-message-ttl": CALLS_TTL_MS})
    return Topology(names, events_x, history_x, dead_x, events_q, work, calls)


def all_queues(settings: Settings) -> list[str]:
    """Every queue :func:`declare` declares for ``settings``."""
    names = Names.from_settings(settings)
    queues = [names.events_queue, names.history_queue, names.dead_queue, names.epoch_queue]
    for ct in settings.communicator_types:
        queues += [names.work_queue(ct), names.bulk_queue(ct), names.parked_queue(ct),
                   names.owner_queue(ct), names.calls_queue(ct)]
    return queues


async def delete_all(channel: AbstractChannel, settings: Settings) -> None:
    """Remove every queue and the dead-letter exchange (tests and teardown only)."""
    for q in all_queues(settings):
        await channel.queue_delete(q)
    await channel.exchange_delete(Names.from_settings(settings).dead_exchange)
    await channel.exchange_delete(Names.from_settings(settings).status_exchange)


async def remove_topology(connection: AbstractConnection, settings: Settings) -> None:
    """Remove every queue and exchange of ``settings`` (tests, demos, teardown only)."""
    channel = await connection.channel()
    await delete_all(channel, settings)
    await channel.exchange_delete(settings.events_exchange)
    await channel.exchange_delete(settings.history_exchange)
    await channel.close()
