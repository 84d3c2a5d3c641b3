"""Stage 1: read an event, then forward it to its work queue, fail it, or dead-letter it.

* unreadable (too big, not UTF-8/JSON/an object, no ``client_id``) → ``<prefix>.dead``;
* an event that cannot succeed (§4 local codes) → a ``jasper.failed`` signal, no API call;
* otherwise → the communicator type's work queue, as a :class:`~.events.Job`.

Events for the same ICCID are forwarded one after another in delivery order (the
next is published only after the previous one is confirmed), so the work queue
holds them in publish order; events for different ICCIDs go through concurrently.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aio_pika.abc import AbstractIncomingMessage

from . import log as jlog
from .config import Settings
from .edge import settle
from .errors import HandBack, UnreadableMessage
from .events import Job, Rejected, parse_event
from .history import Publisher
from .metrics import Metrics
from .signals import SignalError, failed
from .topology import REPLAYED_HEADER, Names

log = logging.getLogger(__name__)


class Router:
    """Consumes ``<prefix>.events``; see the module docstring."""

    def __init__(self, settings: Settings, publisher: Publisher, metrics: Metrics) -> None:
        self._settings = settings
        self._publisher = publisher
        self._metrics = metrics
        self._names = Names.from_settings(settings)
        self._work_queues = {ct.name: self._names.work_queue(ct)
                             for ct in settings.communicator_types}
        self._tails: dict[str, asyncio.Future[bool]] = {}
        self._last_ns = 0

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        # Until the first await this runs in delivery order: parse and join the ICCID's
        # chain here. The next event for the ICCID is forwarded only after this one is
        # acked, so a crash can never leave a later event acked and an earlier one not.
        # If this one is handed back (it goes to the back of the queue), the ones behind
        # it in the chain are handed back too, so they stay behind it.
        started = time.perf_counter()
        try:
            job = parse_event(message.body, self._settings)
        except UnreadableMessage as exc:
            reason = exc.reason
            await settle(message, lambda m: self._dead_letter(m, reason), self._metrics, "route")
            return
        except Rejected as exc:
            rejected = exc
            self._metrics.events_received.labels(self._code_label(exc.partial.event_code)).inc()
            await settle(message, lambda m: self._reject(m, rejected, started),
                         self._metrics, "route")
            return
        self._metrics.events_received.labels(self._code_label(job.event_code)).inc()
        key = f"{job.communicator_type}\x00{job.iccid}"
        previous = self._tails.get(key)
        mine: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._tails[key] = mine
        acked = False
        try:
            in_order = previous is None or await previous
            replayed = REPLAYED_HEADER in (message.headers or {})
            acked = await settle(
                message,
                lambda m: self._forward(job, replayed=replayed) if in_order else _behind(),
                self._metrics, "route")
        finally:
            mine.set_result(acked)
            if self._tails.get(key) is mine:
                del self._tails[key]

    def _code_label(self, code: int | None) -> str:
        """Event codes of the commands map are labels; any other code is "other"."""
        return str(code) if code in self._settings.commands else "other"

    async def _forward(self, job: Job, *, replayed: bool) -> None:
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        stamped = job.model_copy(update={"routed_ns": self._last_ns, "replayed": replayed})
        await self._publisher.work(
            self._work_queues[job.communicator_type],
            stamped.model_dump_json().encode(),
            message_id=job.event_id,
        )

    async def _reject(
        self, message: AbstractIncomingMessage, exc: Rejected, started: float
    ) -> None:
        partial = exc.partial
        if partial.event_id is None and message.message_id:
            partial = partial.model_copy(update={"event_id": message.message_id})
        signal = failed(
            partial,
            SignalError(code=exc.code, http_status=None, message=exc.message, retryable=False),
            attempts=0,
            duration_ms=(time.perf_counter() - started) * 1000,
        )
        await self._publisher.signal(signal)
        self._metrics.local_failures.labels(exc.code).inc()
        jlog.outcome(
            event_id=signal.event_id, client_id=signal.client_id,
            communicator_type=signal.communicator_type, command=signal.command,
            outcome=signal.outcome, error_code=exc.code, attempts=0,
            duration_ms=signal.duration_ms, reason=exc.message,
        )

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        headers = dict(message.headers or {})
        headers["x-jasper-routing-key"] = message.routing_key or ""
        await self._publisher.dead_letter(
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
