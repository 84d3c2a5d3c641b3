"""Publishing with publisher confirms and ``mandatory``: signals, parked jobs, work items,
dead letters — and :meth:`History.report`, the one place a signal is built, published,
counted and logged.

A publish returns only once the broker has confirmed the message; a nack, a return
(unroutable message) or a lost channel raises :class:`PublishFailed`, and the caller
leaves its input message unacknowledged.

A delayed signal of a job that waits for a paused type is also the job's place in the
type's parked queue: it is published once, to the history exchange, with a ``BCC``
routing key that only the parked queue is bound to (RabbitMQ's sender-selected
distribution; the header is removed before delivery). One confirmed publish records
both "this job had its delayed signal" and "this job waits here" (operator guide, section 5).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from aio_pika.abc import AbstractChannel, HeadersType
from pamqp import commands as spec

from . import log as jlog
from . import signals
from .batch import Batch
from .errors import PublishFailed
from .events import Job, Partial
from .metrics import Metrics
from .outcomes import ErrorInfo, Outcome, Result
from .signals import Kind, Signal, SignalError
from .topology import DEAD_REASON_HEADER, LAST_ERROR_HEADER, Names

log = logging.getLogger(__name__)

_CONFIRM_TIMEOUT_S = 30.0
_PERSISTENT = 2  # delivery_mode
_PREFIX = os.urandom(6).hex()  # message ids: unique per process, and no syscall per message
_COUNTER = itertools.count()


def message_id() -> str:
    return f"{_PREFIX}-{next(_COUNTER)}"


REPUBLISH_MAX_S = 30.0


async def until_confirmed(publish: Callable[[], Awaitable[object]], what: str) -> None:
    """Publish until the broker confirms, backing off (1 s doubling to 30 s): a message
    that waits for its signal keeps its place (nothing is nacked to the back)."""
    wait = 1.0
    while True:
        try:
            await publish()
            return
        except PublishFailed as exc:
            log.warning("%s; publishing again in %.0f s", exc, wait,
                        extra={"fields": {"what": what}})
        await asyncio.sleep(wait)
        wait = min(wait * 2, REPUBLISH_MAX_S)


class History:
    """Publishes on one channel opened with ``publisher_confirms`` and ``on_return_raises``."""

    def __init__(self, channel: AbstractChannel, names: Names, metrics: Metrics, *,
                 on_final: Callable[[Job, Signal], None] | None = None) -> None:
        self._names = names
        self._metrics = metrics
        self._channel = channel
        self._batch = Batch(channel)
        self._on_final = on_final  # told of every confirmed final signal (the status page)

    async def _send(self, exchange: str, routing_key: str, body: bytes,
                    properties: spec.Basic.Properties, *, pipelined: bool = False) -> None:
        """One publish on the channel's aiormq channel, ``mandatory``, awaiting the confirm.
        (Straight to aiormq: aio-pika's ``Message`` and ``Exchange.publish`` wrappers cost
        about 5 % of the service's CPU per event, measured with py-spy in bench.hotpath.)

        ``pipelined``: written together with the others asked for within 3 ms
        (:class:`~.batch.Batch`: one socket write for dozens), still confirmed one by one —
        for a pause's moves, thousands at once. Others are written on their own."""
        try:
            confirmation: object
            if pipelined:
                confirmation = await self._batch.publish(
                    body, exchange=exchange, routing_key=routing_key, properties=properties,
                    timeout_s=_CONFIRM_TIMEOUT_S)
            else:
                channel = await self._channel.get_underlay_channel()
                confirmation = await channel.basic_publish(
                    body, exchange=exchange, routing_key=routing_key, properties=properties,
                    mandatory=True, timeout=_CONFIRM_TIMEOUT_S)
        except Exception as exc:  # return, closed channel, timeout: all mean "not safe"
            raise PublishFailed(
                f"broker did not confirm publish to {exchange or '(default)'!r} "
                f"with routing key {routing_key!r}: {type(exc).__name__}: {exc}"
            ) from None
        if not isinstance(confirmation, spec.Basic.Ack):
            raise PublishFailed(
                f"broker refused publish to {exchange or '(default)'!r} with routing key "
                f"{routing_key!r}: {type(confirmation).__name__}")

    # -- signals ---------------------------------------------------------------------------

    async def report(
        self,
        subject: Job | Partial,
        kind: Kind,
        *,
        type_label: str,
        attempts: int,
        started: float,
        sim_status: str | None = None,
        error: ErrorInfo | None = None,
        backlog: bool = False,
        park_key: str | None = None,
        park_headers: HeadersType | None = None,
        reason: str | None = None,
    ) -> Signal:
        """Build the signal, publish it (confirmed), count it and log its line.

        ``park_key``: a delayed signal that is also the job's place in the parked queue
        bound with that key (see the module docstring). ``type_label`` is the metric label:
        a configured type's name, or ``unknown``.
        """
        duration_ms = (time.perf_counter() - started) * 1000
        serr = SignalError.model_construct(**error.as_dict()) if error is not None else None
        if kind is Kind.DELAYED:
            assert isinstance(subject, Job)
            assert serr is not None
            signal = signals.delayed(subject, serr, attempts, duration_ms, backlog=backlog)
        elif kind is Kind.SUCCEEDED:
            assert isinstance(subject, Job)
            signal = signals.succeeded(subject, sim_status, attempts, duration_ms)
        else:
            assert serr is not None
            signal = signals.failed(subject, serr, attempts, duration_ms, sim_status)
        headers: dict[str, Any] = dict(park_headers or {})
        if park_key is not None:
            headers["BCC"] = [park_key]
        await self.publish_signal(signal, headers or None, pipelined=park_key is not None)
        self._count(signal, type_label)
        jlog.outcome(
            event_id=signal.event_id, client_id=signal.client_id,
            communicator_type=signal.communicator_type, command=signal.command,
            outcome=signal.outcome, error_code=serr.code if serr else None,
            attempts=attempts, duration_ms=signal.duration_ms,
            **({"reason": reason} if reason else {}),
        )
        return signal

    async def final(self, job: Job, outcome: Outcome, *, started: float, type_label: str,
                    attempts: int) -> Signal:
        """The final signal of a job from its outcome; when retries ran out, a copy of the
        event goes to the dead-letter queue first (a confirmed signal must not outlive a
        lost copy), so that it can be replayed (operator guide, section 5)."""
        error = outcome.error
        if error is not None and outcome.exhausted:
            await self.dead_letter(
                json.dumps(job.to_event()).encode(), error.code, message_id=job.event_id,
                headers={LAST_ERROR_HEADER: error.cause or ""},
                content_type="application/json")
            self._metrics.child(self._metrics.dead_lettered, "retries_exhausted").inc()
        kind = Kind.SUCCEEDED if outcome.result is Result.SUCCEEDED else Kind.FAILED
        signal = await self.report(job, kind, type_label=type_label, attempts=attempts,
                                   started=started, sim_status=outcome.sim_status,
                                   error=outcome.error)
        if self._on_final is not None:
            self._on_final(job, signal)
        return signal

    def _count(self, signal: Signal, type_label: str) -> None:
        m = self._metrics
        if signal.outcome is Kind.DELAYED:
            m.child(m.delayed, type_label).inc()
            return
        command = signal.command.value if signal.command else "unknown"
        m.child(m.commands, type_label, command, signal.outcome.value).inc()
        if signal.outcome is Kind.SUCCEEDED:
            m.child(m.last_success, type_label).set(time.time())

    async def publish_signal(self, signal: Signal, headers: HeadersType | None = None, *,
                             pipelined: bool = False) -> None:
        """Publish a result signal to the history exchange (``pipelined``: see
        :meth:`_send`)."""
        properties = spec.Basic.Properties(
            content_type="application/json", delivery_mode=_PERSISTENT,
            correlation_id=signal.event_id, message_id=message_id(),
            message_type=signal.outcome.routing_key, headers=headers)
        try:
            await self._send(self._names.history_exchange, signal.outcome.routing_key,
                             signal.__pydantic_serializer__.to_json(signal), properties,
                             pipelined=pipelined)
        except PublishFailed:
            self._metrics.history_publish_failures.inc()
            raise

    # -- other publishes -------------------------------------------------------------------

    async def to_queue(self, queue_name: str, body: bytes, message_id: str | None,
                       headers: HeadersType | None = None, *, pipelined: bool = False) -> None:
        """Put a message on a queue of ours (default exchange): a job, a parked job, a token."""
        await self._send("", queue_name, body, spec.Basic.Properties(
            content_type="application/json", delivery_mode=_PERSISTENT, message_id=message_id,
            headers=headers or {}), pipelined=pipelined)

    async def bad_job(self, body: bytes, message_id: str | None, reason: str) -> None:
        """A work-queue message that is not a job: dead-lettered, counted, logged."""
        await self.dead_letter(body, reason, message_id=message_id)
        self._metrics.child(self._metrics.dead_lettered, "invalid_job").inc()
        log.error(reason, extra={"fields": {"message_id": message_id}})

    async def dead_letter(
        self, body: bytes, reason: str, *, message_id: str | None = None,
        headers: Mapping[str, Any] | None = None, content_type: str | None = None,
    ) -> None:
        """Send a copy of a message to ``<prefix>.dead`` with the reason in a header."""
        all_headers: dict[str, Any] = dict(headers or {})
        all_headers[DEAD_REASON_HEADER] = reason
        await self._send(self._names.dead_exchange, "", body, spec.Basic.Properties(
            content_type=content_type, delivery_mode=_PERSISTENT, message_id=message_id,
            headers=all_headers, timestamp=datetime.now(UTC)))
