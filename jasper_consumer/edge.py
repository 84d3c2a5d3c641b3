"""The AMQP edge: the one place where a consumed message is acked or handed back.

Handlers (router, worker) only return or raise. Returning means "what this
message became is confirmed by the broker": ack. Raising means it is not: the
message is nacked with requeue so it is delivered again (the queue's delivery
limit dead-letters one that keeps failing). An ack or nack on a channel that was
lost meanwhile is impossible; the broker redelivers the message by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aio_pika.abc import AbstractIncomingMessage

from .errors import HandBack
from .metrics import Metrics

log = logging.getLogger(__name__)

Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]

# Before handing back a message that failed, wait a moment: a broker that refuses or
# returns publishes (e.g. a history exchange without a binding) must not turn into a
# hot redelivery loop.
REDELIVERY_PAUSE_S = 1.0


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
    except HandBack:
        await _answer(message, ack=False)  # deliberate, in order: the caller logs why
        return False
    except Exception as exc:
        log.warning(
            "%s could not finish a message; handing it back for redelivery", stage,
            extra={"fields": {"stage": stage, "message_id": message.message_id,
                              "error": f"{type(exc).__name__}: {exc}"}},
        )
        await asyncio.sleep(REDELIVERY_PAUSE_S)
        await _answer(message, ack=False)
        return False
    if not await _answer(message, ack=True):
        return False
    metrics.event_processing.labels(stage).observe(time.perf_counter() - started)
    return True


async def _answer(message: AbstractIncomingMessage, *, ack: bool) -> bool:
    try:
        if ack:
            await message.ack()
        else:
            await message.nack(requeue=True)
    except Exception as exc:  # stale channel after a reconnect, closed connection
        log.warning(
            "could not %s message on a lost channel; the broker will redeliver it",
            "ack" if ack else "nack",
            extra={"fields": {"message_id": message.message_id, "error": repr(exc)}},
        )
        return False
    return True


async def ack(message: AbstractIncomingMessage) -> bool:
    """Ack; False when the channel is gone (the broker returns the message by itself)."""
    return await _answer(message, ack=True)
