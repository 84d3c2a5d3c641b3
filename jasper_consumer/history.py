"""Publishing with publisher confirms and ``mandatory``: signals, work items, dead letters.

A publish returns only once the broker has confirmed the message; a nack, a
return (unroutable message) or a lost channel raises :class:`PublishFailed`, and
the caller leaves its input message unacknowledged so it is redelivered.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, HeadersType

from .errors import JasperConsumerError
from .metrics import Metrics
from .signals import Signal
from .topology import DEAD_REASON_HEADER, Names

_CONFIRM_TIMEOUT_S = 30.0


class PublishFailed(JasperConsumerError):
    """The broker did not confirm a publish; the input message must not be acked."""


class Publisher:
    """Publishes on one channel opened with ``publisher_confirms`` and ``on_return_raises``."""

    def __init__(self, channel: AbstractChannel, names: Names, metrics: Metrics) -> None:
        self._names = names
        self._metrics = metrics
        self._history: AbstractExchange | None = None
        self._dead: AbstractExchange | None = None
        self._channel = channel

    async def _exchange(self, name: str) -> AbstractExchange:
        return await self._channel.get_exchange(name, ensure=False)

    async def _publish(
        self, exchange: AbstractExchange, message: aio_pika.Message, routing_key: str
    ) -> None:
        try:
            await exchange.publish(
                message, routing_key, mandatory=True, timeout=_CONFIRM_TIMEOUT_S)
        except Exception as exc:  # nack, return, closed channel, timeout: all mean "not safe"
            raise PublishFailed(
                f"broker did not confirm publish to {exchange.name or '(default)'!r} "
                f"with routing key {routing_key!r}: {type(exc).__name__}: {exc}"
            ) from exc

    async def signal(self, signal: Signal) -> None:
        """Publish a result signal to the history exchange."""
        if self._history is None:
            self._history = await self._exchange(self._names.history_exchange)
        message = aio_pika.Message(
            signal.model_dump_json().encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=signal.event_id,
            message_id=str(uuid.uuid4()),
            type=signal.outcome.routing_key,
        )
        try:
            await self._publish(self._history, message, signal.outcome.routing_key)
        except PublishFailed:
            self._metrics.history_publish_failures.inc()
            raise

    async def work(self, queue_name: str, body: bytes, message_id: str,
                   headers: HeadersType | None = None) -> None:
        """Put a job on a communicator type's work queue (default exchange)."""
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            headers=headers or {},
        )
        await self._publish(self._channel.default_exchange, message, queue_name)

    async def dead_letter(
        self, body: bytes, reason: str, *, message_id: str | None = None,
        headers: Mapping[str, Any] | None = None, content_type: str | None = None,
    ) -> None:
        """Send a copy of a message to ``<prefix>.dead`` with the reason in a header."""
        if self._dead is None:
            self._dead = await self._exchange(self._names.dead_exchange)
        all_headers: dict[str, Any] = dict(headers or {})
        all_headers[DEAD_REASON_HEADER] = reason
        message = aio_pika.Message(
            body,
            content_type=content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            headers=all_headers,
            timestamp=datetime.now(UTC),
        )
        await self._publish(self._dead, message, "")
