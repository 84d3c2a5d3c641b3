"""The AMQP edge: the one place where a consumed message is acked or handed back.

Handlers (router, worker) only return or raise. Returning means "what this
message became is confirmed by the broker": ack. Raising means it is not: the
message is rejected with requeue so it is delivered again (the queue's delivery
limit dead-letters one that keeps failing); a deliberate hand-back is a nack. An answer
on a channel that was lost meanwhile is impossible; the broker redelivers the message by
itself.

Acks are batched (:class:`Acks`): a settled message is acked within
:data:`ACK_DELAY_S`, with one ``multiple`` ack for every delivery up to a tag once all of
them are settled, and one ack each for settled deliveries behind one that is not (a slow
job never holds the others' acks back). Acks leave in delivery-tag order, so for any
SIM an ack never overtakes the ack of an earlier job. A message is still acked only
after its own publish is confirmed: only :meth:`Acks.ack` marks it settled.

One :class:`Acks` per process, made by the service (:mod:`.app`) and handed to every
part that consumes (router, workers, bulk and parked queues, the owner's calls and
ownership log): every ack, nack and reject of the service goes through it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelInvalidStateError

from .errors import HandBack
from .metrics import Metrics

log = logging.getLogger(__name__)

Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]

# Before handing back a message that failed, wait a moment: a broker that refuses or
# returns publishes (e.g. a history exchange without a binding) must not turn into a
# hot redelivery loop.
REDELIVERY_PAUSE_S = 1.0
ACK_DELAY_S = 0.002  # how long a settled message may wait for its ack to be sent


class Acks:
    """Batched acks of the deliveries of every channel of this process (see the module
    docstring). :meth:`delivered` registers a delivery, in delivery order; :meth:`settled`
    marks it for acking."""

    def __init__(self, delay_s: float = ACK_DELAY_S) -> None:
        self._delay_s = delay_s
        self._channels: dict[object, dict[int, bool]] = {}  # channel -> tag -> settled
        self._scheduled: set[object] = set()
        self._sending: dict[object, asyncio.Lock] = {}  # one flush at a time per channel

    def delivered(self, message: AbstractIncomingMessage) -> None:
        channel = _open_channel(message)
        if message.delivery_tag is None or channel is None:
            return
        tags = self._channels.get(channel)
        if tags is None:  # a new channel (start, reconnect): forget the closed ones
            for closed in [c for c in self._channels if c.is_closed]:  # type: ignore[attr-defined]
                del self._channels[closed]
                self._sending.pop(closed, None)
            tags = self._channels[channel] = {}
        tags[message.delivery_tag] = False

    def forget(self, message: AbstractIncomingMessage) -> None:
        """The message was answered otherwise (nacked): it no longer holds acks back."""
        tags = self._channels.get(_open_channel(message))
        if tags is not None and message.delivery_tag is not None:
            tags.pop(message.delivery_tag, None)

    def settled(self, message: AbstractIncomingMessage) -> bool:
        """Ack ``message`` soon; False if its channel is already gone (its deliveries are
        dropped when the next channel appears, see :meth:`delivered`)."""
        channel = _open_channel(message)
        tags = self._channels.get(channel)
        if channel is None or tags is None or message.delivery_tag not in tags:
            return False
        tags[message.delivery_tag] = True
        if channel not in self._scheduled:
            self._scheduled.add(channel)
            asyncio.get_running_loop().call_later(self._delay_s, self._flush_soon, channel)
        return True

    async def ack(self, message: AbstractIncomingMessage, *, multiple: bool = False) -> bool:
        """Ack ``message`` (within :data:`ACK_DELAY_S`, batched, when it was registered with
        :meth:`delivered`; at once otherwise, or with ``multiple``: every unacked delivery
        of its channel up to it). False when its channel is gone (the broker returns the
        message by itself)."""
        if not multiple and self.settled(message):
            return True
        return await _send_answer(message, "ack", lambda: message.ack(multiple=True)
                                  if multiple else message.ack())

    async def hand_back(self, message: AbstractIncomingMessage, *,
                        failed: bool = False) -> bool:
        """Hand ``message`` back to its queue: ``basic.reject`` when handling it ``failed``
        (every RabbitMQ version counts a reject against the queue's delivery limit; 4.3 no
        longer counts a nack), else ``basic.nack``; both with requeue. False when its
        channel is gone (the broker returns the message by itself)."""
        self.forget(message)
        if failed:
            return await _send_answer(message, "reject", lambda: message.reject(requeue=True))
        return await _send_answer(message, "nack", lambda: message.nack(requeue=True))

    async def flush_all(self) -> None:
        """Send every ack still waiting (before the channels close at shutdown: an ack not
        sent is a duplicate later)."""
        for channel in list(self._channels):
            await self._flush(channel)

    def _flush_soon(self, channel: object) -> None:
        self._scheduled.discard(channel)
        task = asyncio.ensure_future(self._flush(channel))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _flush(self, channel: Any) -> None:
        lock = self._sending.setdefault(channel, asyncio.Lock())
        async with lock:  # a later flush must not ack past tags an earlier one still sends
            await self._send(channel)
        if channel.is_closed:
            self._sending.pop(channel, None)

    async def _send(self, channel: Any) -> None:
        tags = self._channels.get(channel)
        if not tags:
            return
        upto = None
        while tags and tags[next(iter(tags))]:
            upto = next(iter(tags))
            del tags[upto]
        behind = [tag for tag, done in tags.items() if done]
        for tag in behind:
            del tags[tag]
        try:
            if upto is not None:
                await channel.basic_ack(upto, multiple=True, wait=False)
            for tag in behind:
                await channel.basic_ack(tag, wait=False)
        except Exception as exc:  # the channel is gone: the broker returns its messages
            self._channels.pop(channel, None)
            log.warning("could not ack on a lost channel; the broker will deliver again",
                        extra={"fields": {"error": repr(exc)}})
        if channel.is_closed:
            self._channels.pop(channel, None)


async def _send_answer(message: AbstractIncomingMessage, what: str,
                       send: Callable[[], Awaitable[None]]) -> bool:
    try:
        await send()
    except Exception as exc:  # stale channel after a reconnect, closed connection
        log.warning(
            "could not %s message on a lost channel; the broker will redeliver it", what,
            extra={"fields": {"message_id": message.message_id, "error": repr(exc)}},
        )
        return False
    return True


def _open_channel(message: AbstractIncomingMessage) -> object | None:
    """The channel ``message`` came on, or None once it is closed (aio-pika raises
    :class:`ChannelInvalidStateError` on reading a closed one)."""
    try:
        return message.channel
    except ChannelInvalidStateError:
        return None


async def settle(acks: Acks, message: AbstractIncomingMessage, handler: Handler,
                 metrics: Metrics, stage: str) -> bool:
    """Run ``handler`` on ``message``, then ack it, or hand it back for redelivery if it
    raised. Returns whether the message was acked."""
    started = time.perf_counter()
    try:
        await handler(message)
    except asyncio.CancelledError:
        raise  # shutting down: the broker redelivers the unacked message
    except HandBack:  # deliberate, in order (the caller logs why): no failure, so basic.nack,
        await acks.hand_back(message)  # which RabbitMQ 4.3 counts against no limit
        return False
    except Exception as exc:
        log.warning(
            "%s could not finish a message; handing it back for redelivery", stage,
            extra={"fields": {"stage": stage, "message_id": message.message_id,
                              "error": f"{type(exc).__name__}: {exc}"}},
        )
        await asyncio.sleep(REDELIVERY_PAUSE_S)
        await acks.hand_back(message, failed=True)  # counts against the delivery limit
        return False
    if not await acks.ack(message):
        return False
    metrics.child(metrics.event_processing, stage).observe(time.perf_counter() - started)
    return True
