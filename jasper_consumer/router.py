"""Stage 1: read an event, then forward it to its work queue, fail it, or dead-letter it.

* unreadable (too big, not UTF-8/JSON/an object, no ``client_id``, anything the parser
  raises) → ``<prefix>.dead``;
* an event that cannot succeed (§4 local codes) → a ``jasper.failed`` signal, no API call;
* otherwise → the communicator type's work queue, as a :class:`~.events.Job`.

Events for the same ICCID are forwarded one after another in delivery order (the
next is published only after the previous one is confirmed), so the work queue
holds them in publish order; events for different ICCIDs go through concurrently.

Each job carries a *stamp* that orders it against every other job for its SIM, also
across router failovers: ``epoch * 10**12 + n``. The epoch lives in the broker
(``<prefix>.router-epoch``): a router that becomes the events queue's active consumer
takes the highest epoch there, adds one and writes it back before its first forward.
A new router therefore stamps above every job of the old one, whatever the clocks say.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from .config import Settings
from .edge import Acks, settle
from .errors import HandBack, UnreadableMessage
from .events import Job, Lane, Rejected, lane_of, parse_event
from .history import History, message_id
from .metrics import Metrics
from .outcomes import ErrorInfo
from .signals import Kind
from .topology import REPLAYED_HEADER, ROUTING_KEY_HEADER, Names

log = logging.getLogger(__name__)

EPOCH_SCALE = 10**12


class Router:
    """Consumes ``<prefix>.events``; see the module docstring."""

    def __init__(self, settings: Settings, history: History, metrics: Metrics,
                 channel: AbstractChannel, acks: Acks) -> None:
        self._settings = settings
        self._acks = acks
        self._history = history
        self._metrics = metrics
        self._channel = channel
        self._names = Names.from_settings(settings)
        self._work_queues = {ct.name: self._names.work_queue(ct)
                             for ct in settings.communicator_types}
        self._bulk_queues = {ct.name: self._names.bulk_queue(ct)
                             for ct in settings.communicator_types}
        self._tails: dict[str, asyncio.Future[bool]] = {}
        self._received = {code: metrics.events_received.labels(str(code))
                          for code in settings.commands}
        self._received_other = metrics.events_received.labels("other")
        self._owner: object | None = None
        self._epoch: asyncio.Future[int] | None = None
        self._counter = itertools.count(1)
        self.stopping = False

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        # Until the first await this runs in delivery order: parse and join the ICCID's
        # chain here. The next event for the ICCID is forwarded only after this one is
        # acked, so a crash can never leave a later event acked and an earlier one not.
        # If this one is handed back (it goes to the back of the queue), the ones behind
        # it in the chain are handed back too, so they stay behind it.
        self._acks.delivered(message)
        if self.stopping:
            return  # not acked: returned in order when the channel closes
        if message.channel is not self._owner:  # this router just became the active one
            self._owner = message.channel
            self._epoch = None
        started = time.perf_counter()
        received = time.time()
        try:
            job = parse_event(message.body, self._settings)
        except UnreadableMessage as exc:
            reason = exc.reason
            await settle(self._acks, message, lambda m: self._dead_letter(m, reason),
                         self._metrics, "route")
            return
        except Rejected as exc:
            rejected = exc
            self._count(exc.partial.event_code)
            await settle(self._acks, message, lambda m: self._reject(m, rejected, started),
                         self._metrics, "route")
            return
        except Exception as exc:  # whatever else the parser raises, the message is settled
            reason = f"the parser failed on this body: {type(exc).__name__}"
            await settle(self._acks, message, lambda m: self._dead_letter(m, reason),
                         self._metrics, "route")
            return
        self._count(job.event_code)
        key = f"{job.communicator_type}\x00{job.iccid}"
        previous = self._tails.get(key)
        mine: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._tails[key] = mine
        acked = False
        try:
            in_order = previous is None or await previous
            replayed = REPLAYED_HEADER in (message.headers or {})
            lane = lane_of(job.model_copy(update={"origin": "replay"}) if replayed else job,
                           self._settings.lanes, message.priority)
            acked = await settle(
                self._acks, message,
                lambda m: self._forward(job, replayed=replayed, lane=lane, received=received)
                if in_order else _behind(),
                self._metrics, "route")
        finally:
            mine.set_result(acked)
            if self._tails.get(key) is mine:
                del self._tails[key]

    def _count(self, code: int | None) -> None:
        """Event codes of the commands map are labels; any other code is "other"."""
        child = self._received.get(code) if code is not None else None
        (child or self._received_other).inc()

    async def _next_epoch(self) -> int:
        """Take the highest epoch in the broker, add one, write it back (see module doc)."""
        queue = await self._channel.get_queue(self._names.epoch_queue, ensure=False)
        seen = []
        while (got := await queue.get(fail=False, no_ack=False)) is not None:
            seen.append(got)
        epochs = [int(m.body) for m in seen if m.body.isdigit()]
        epoch = max(epochs, default=0) + 1
        try:
            await self._history.to_queue(self._names.epoch_queue, str(epoch).encode(),
                                         message_id())
        except BaseException:
            # Give back what was taken, or the next try reads an empty queue and starts
            # again at epoch 1, below the previous router's stamps.
            for got in seen:
                await self._acks.hand_back(got)
            raise
        for got in seen:
            await self._acks.ack(got)
        log.info("routing with epoch %d", epoch, extra={"fields": {"epoch": epoch}})
        self._counter = itertools.count(1)
        return epoch

    async def _forward(self, job: Job, *, replayed: bool, lane: Lane, received: float) -> None:
        if self._epoch is None or (self._epoch.done() and self._epoch.exception()):
            self._epoch = asyncio.ensure_future(self._next_epoch())  # (again, if it failed)
        epoch = await asyncio.shield(self._epoch)
        body = job.work_item(stamp=epoch * EPOCH_SCALE + next(self._counter),
                             replayed=replayed, lane=lane, received_at=received)
        queues = self._work_queues if lane is Lane.INTERACTIVE else self._bulk_queues
        await self._history.to_queue(queues[job.communicator_type], body, job.event_id)

    async def _reject(
        self, message: AbstractIncomingMessage, exc: Rejected, started: float
    ) -> None:
        partial = exc.partial
        if partial.event_id is None and message.message_id:
            partial = partial.model_copy(update={"event_id": message.message_id})
        label = partial.communicator_type
        if label not in self._settings.type_names:
            label = "unknown"
        await self._history.report(
            partial, Kind.FAILED, type_label=label,
            attempts=0, started=started, error=ErrorInfo(exc.code, None, exc.message, False),
            reason=exc.message)
        self._metrics.local_failures.labels(exc.code).inc()

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        headers = dict(message.headers or {})
        headers[ROUTING_KEY_HEADER] = message.routing_key or ""
        await self._history.dead_letter(
            message.body, reason, message_id=message.message_id,
            headers=headers, content_type=message.content_type,
        )
        self._metrics.dead_lettered.labels("unreadable").inc()
        log.warning(
            "unreadable message dead-lettered: %s", reason,
            extra={"fields": {"message_id": message.message_id, "reason": reason,
                              "routing_key": message.routing_key, "bytes": len(message.body)}},
        )


async def _behind() -> None:
    raise HandBack("an earlier event for this SIM was handed back; this one stays behind it")
