"""The AMQP edge: the one place where a consumed message is acked or handed back.

Handlers (router, worker) only return or raise. Returning means "what this
message became is confirmed by the broker": ack. Raising means it is not: the
message is nacked with requeue so it is delivered again (the queue's delivery
limit dead-letters one that keeps failing). An ack or nack on a channel that was
lost meanwhile is impossible; the broker redelivers the message by itself.

Acks are batched (:class:`Acks`): a settled message is acked within
:data:`ACK_DELAY_S`, with one ``multiple`` ack for every delivery up to a tag once all of
them are settled, and one ack each for settled deliveries behind one that is not (a slow
job never holds the others' acks back). Acks leave in delivery-tag order, so for any
SIM an ack never overtakes the ack of an earlier job. A message is still acked only
after its own publish is confirmed: only :func:`ack` marks it settled.
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


def _open_channel(message: AbstractIncomingMessage) -> object | None:
    """The channel ``message`` came on, or None once it is closed (aio-pika raises
    :class:`ChannelInvalidStateError` on reading a closed one)."""
    try:
        return message.channel
    except ChannelInvalidStateError:
        return None


ACKS = Acks()


async def settle(
    message: AbstractIncomingMessage, handler: Handler, metrics: Metrics, stage: str
) -> bool:
    """Run ``handler`` on ``message``, then ack it, or nack it for redelivery if it raised.

    Returns whether the message was acked.
    """
    started = time.perf_counter()
    try:
        await handler(message)
    except asyncio.CancelledError:
        raise  # shutting down: the broker redelivers the unacked message
    except HandBack:  # deliberate, in order (the caller logs why): no failure, so basic.nack,
        await _answer(message, ack=False)  # which RabbitMQ 4.3 counts against no limit
        return False
    except Exception as exc:
        log.warning(
            "%s could not finish a message; handing it back for redelivery", stage,
            extra={"fields": {"stage": stage, "message_id": message.message_id,
                              "error": f"{type(exc).__name__}: {exc}"}},
        )
        await asyncio.sleep(REDELIVERY_PAUSE_S)
        await _answer(message, ack=False, failed=True)  # counts against the delivery limit
        return False
    if not await _answer(message, ack=True):
        return False
    metrics.child(metrics.event_processing, stage).observe(time.perf_counter() - started)
    return True


async def _answer(message: AbstractIncomingMessage, *, ack: bool, failed: bool = False) -> bool:
    """Ack (batched when the delivery was registered with :data:`ACKS`), or hand back for
    redelivery: ``basic.reject`` when handling it ``failed`` (every RabbitMQ version counts
    a reject against the queue's delivery limit; 4.3 no longer counts a nack), else
    ``basic.nack``. False when the channel is gone (the broker returns the message by
    itself)."""
    if ack and ACKS.settled(message):
        return True
    if not ack:
        ACKS.forget(message)
    try:
        await (message.ack() if ack else
               message.reject(requeue=True) if failed else message.nack(requeue=True))
    except Exception as exc:  # stale channel after a reconnect, closed connection
        log.warning(
            "could not %s message on a lost channel; the broker will redeliver it",
            "ack" if ack else "reject" if failed else "nack",
            extra={"fields": {"message_id": message.message_id, "error": repr(exc)}},
        )
        return False
    return True


async def ack(message: AbstractIncomingMessage) -> bool:
    """Ack ``message`` (see :func:`_answer`)."""
    return await _answer(message, ack=True)
