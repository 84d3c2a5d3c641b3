"""The bulk queue of a communicator type, ``<prefix>.bulk.<slug>``, pulled by its owner.

Bulk jobs (reconcile's and replay's, decommissions, a producer's priority 1-4)
wait here instead of in the work queue, so that an operator's commission never waits
behind them (operator guide, section 13, Interactive first). Only the process that owns the type
— the active consumer of its work queue — takes from this queue, and it *pulls*
(``basic.get``) one job at a time, when a call is about to be free for one. Pulling gives
two things a pushing consumer cannot: the owner holds only the few bulk jobs it is about
to apply (never thousands past the consumer timeout), and an empty answer is proof that
no older bulk job for any SIM is still waiting (:mod:`.lanes`, *cleared*).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from .edge import ACKS


class BulkQueue:
    """One type's bulk queue on a channel of its own (closing it returns every job taken
    and not acked to the head of the queue, in order)."""

    def __init__(self, queue_name: str,
                 open_channel: Callable[[], Awaitable[AbstractChannel]]) -> None:
        self.queue_name = queue_name
        self._open_channel = open_channel
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None

    @property
    def open(self) -> bool:
        return self._channel is not None and not self._channel.is_closed

    async def pull(self) -> AbstractIncomingMessage | None:
        """The queue's next job (unacked), or None when it is empty."""
        if self._queue is None or not self.open:
            channel = await self._open_channel()
            try:
                self._queue = await channel.get_queue(self.queue_name, ensure=False)
            except BaseException:
                with contextlib.suppress(Exception):
                    await channel.close()
                raise
            self._channel = channel
        message = await self._queue.get(no_ack=False, fail=False)
        if message is not None:
            ACKS.delivered(message)
        return message

    async def close(self) -> None:
        channel, self._channel, self._queue = self._channel, None, None
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()
