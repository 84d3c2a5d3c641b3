"""Publishes gathered into one write, each still confirmed: the moves of a pause.

When a type pauses, thousands of jobs are moved to its parked queue at once, each by one
publish the broker must confirm before the job is acked (:mod:`.parking`). aiormq's
``basic_publish`` writes every message on its own — a socket send per message, for the
broker a read per message — and, waiting for that write under the channel's lock, holds
every other publish of the channel back a turn of the event loop per message. On two cores
shared with the broker that capped a pause near 1,000 jobs a second (BENCHMARKS.md, "The
pause at 10,000").

:class:`Batch` takes the publishes asked for within :data:`GATHER_S`, numbers
them under the channel's lock exactly as ``basic_publish`` does (so they mix with its
publishes on the same channel), marshals them into one frame buffer, and hands it to the
connection's writer at once: one send for dozens. Every caller then waits for *its own*
confirm: an ack returns, a nack, a return (``mandatory``, unroutable) or a lost channel
raises for the publishes it concerns only, and nothing is safe before its confirm.

It uses aiormq's channel internals (``lock``, ``delivery_tag``, ``confirmations``,
``message_id_delivery_tag``, ``write_queue``) the way ``basic_publish`` does (aiormq 7.2);
tests/integration/test_parked_publishes.py checks it against the real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import aiormq
from aio_pika.abc import AbstractChannel
from aiormq.abc import ChannelFrame, ConfirmationFrameType
from pamqp import commands as spec
from pamqp.header import ContentHeader

MAX_BATCH = 256  # publishes per write at most
# How long the first publish of a batch waits for others: 0 (one turn of the loop) wrote
# batches of a few; 3 ms took the service from 0.36 to 0.30 CPU ms per parked job (bench
# pause, 10,000 commissions), at 3 ms more per move against a pause's 5 s.
GATHER_S = 0.003


@dataclass(slots=True)
class _Publish:
    body: bytes
    exchange: str
    routing_key: str
    properties: spec.Basic.Properties
    sent: asyncio.Future[asyncio.Future[ConfirmationFrameType]]  # its confirm, once written


class Batch:
    """Batched, confirmed, ``mandatory`` publishes on one channel opened with publisher
    confirms (and ``on_return_raises``, so that a return fails its publish)."""

    def __init__(self, channel: AbstractChannel) -> None:
        self._channel = channel
        self._waiting: list[_Publish] = []
        self._writing: asyncio.Task[None] | None = None

    async def publish(self, body: bytes, *, exchange: str, routing_key: str,
                      properties: spec.Basic.Properties,
                      timeout_s: float) -> ConfirmationFrameType:
        """Publish with the others asked for meanwhile; returns the broker's confirm (an
        ack or a nack), raises when the message was returned or its channel lost."""
        if not properties.message_id:
            raise ValueError("a batched publish needs a message id (returns are matched by it)")
        loop = asyncio.get_running_loop()
        publish = _Publish(body, exchange, routing_key, properties, loop.create_future())
        self._waiting.append(publish)
        if self._writing is None or self._writing.done():
            self._writing = asyncio.ensure_future(self._write())
        async with asyncio.timeout(timeout_s):
            confirmation = await publish.sent
            try:
                return await confirmation
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if confirmation.cancelled() and task is not None and not task.cancelling():
                    # the confirmation was dropped (its channel closed), not this caller
                    # cancelled: a failed publish
                    raise aiormq.exceptions.ChannelInvalidStateError(
                        "channel closed before the confirm") from None
                raise

    async def _write(self) -> None:
        """Write what waits, batch after batch, until nothing does."""
        await asyncio.sleep(GATHER_S)  # the publishes asked for meanwhile join
        while self._waiting:
            batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
            try:
                await self._send(batch)
            except BaseException as exc:  # each caller raises, as a failed publish
                failed = exc if isinstance(exc, Exception) else RuntimeError(
                    "the batched publisher stopped")
                stopped = not isinstance(exc, Exception)
                for publish in batch + (self._waiting if stopped else []):
                    if not publish.sent.done():
                        publish.sent.set_exception(failed)
                if stopped:
                    self._waiting = []
                    raise

    async def _send(self, batch: list[_Publish]) -> None:
        channel = cast(aiormq.Channel, await self._channel.get_underlay_channel())
        if not channel.publisher_confirms:
            raise RuntimeError("batched publishes need a channel with publisher confirms")
        frames: list[object] = []
        confirmations: list[tuple[int, str, asyncio.Future[ConfirmationFrameType]]] = []
        async with channel.lock:  # the numbering of basic_publish, for every message
            for publish in batch:
                channel.delivery_tag += 1
                message_id = cast(str, publish.properties.message_id)
                confirmation = channel.create_future()
                channel.confirmations[channel.delivery_tag] = confirmation
                channel.message_id_delivery_tag[message_id] = channel.delivery_tag
                confirmations.append((channel.delivery_tag, message_id, confirmation))
                frames += [spec.Basic.Publish(exchange=publish.exchange,
                                              routing_key=publish.routing_key,
                                              mandatory=True),
                           ContentHeader(properties=publish.properties,
                                         body_size=len(publish.body)),
                           *channel._split_body(publish.body)]
            try:
                await channel.write_queue.put(ChannelFrame.marshall(
                    frames=frames, channel_number=channel.number))  # type: ignore[arg-type]
            except BaseException:  # not written: the broker never saw these numbers
                channel.delivery_tag -= len(batch)
                for tag, message_id, confirmation in confirmations:
                    channel.confirmations.pop(tag, None)
                    if channel.message_id_delivery_tag.get(message_id) == tag:
                        del channel.message_id_delivery_tag[message_id]
                    confirmation.cancel()
                raise
        for (tag, message_id, confirmation), publish in zip(confirmations, batch, strict=True):
            confirmation.add_done_callback(_forget(channel, message_id, tag))
            publish.sent.set_result(confirmation)


def _forget(channel: aiormq.Channel, message_id: str, tag: int
            ) -> Callable[[asyncio.Future[ConfirmationFrameType]], None]:
    """Once confirmed, the message id no longer maps to its number (as basic_publish)."""

    def forget(_: asyncio.Future[ConfirmationFrameType]) -> None:
        with contextlib.suppress(KeyError):
            if channel.message_id_delivery_tag[message_id] == tag:
                del channel.message_id_delivery_tag[message_id]

    return forget
