"""The bulk queue of a communicator type, ``<prefix>.bulk.<slug>``, pulled by its owner.

Bulk jobs (reconcile's and replay's, decommissions, a producer's priority 1-4)
wait here instead of in the work queue, so that an operator's commission never waits
behind them (operator guide, section 13, Interactive first). Only the process that owns the type
— the active consumer of its work queue — takes from this queue, and it *pulls*
(``basic.get``) one job at a time, when a call is about to be free for one. Pulling gives
two things a pushing consumer cannot: the owner holds only the few bulk jobs it is about
to apply (never thousands past the consumer timeout), and an empty answer is proof that
no older bulk job for any SIM is still waiting (:mod:`.lanes`, *cleared*).

While the type is paused the owner takes *every* bulk job, only to park it with its delayed
signal (:mod:`.parking`), and then one round trip per job would cap the pause at a few
hundred jobs a second (10,000 decommissions took 19 s to be told): so while paused, and only
then, the queue is consumed by push on the same channel, at most :data:`PUSHED_PREFETCH` in
flight (:meth:`BulkQueue.consume`); the feed cancels that consumer once the type runs again,
and the few still in hand are parked too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from .edge import Acks

PUSHED_PREFETCH = 256  # bulk jobs in flight while paused: each is parked within milliseconds


class BulkQueue:
    """One type's bulk queue on a channel of its own (closing it returns every job taken
    and not acked to the head of the queue, in order)."""

    def __init__(self, queue_name: str,
                 open_channel: Callable[[], Awaitable[AbstractChannel]], acks: Acks) -> None:
        self.queue_name = queue_name
        self._acks = acks
        self._open_channel = open_channel
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None  # consuming by push (paused)

    @property
    def open(self) -> bool:
        return self._channel is not None and not self._channel.is_closed

    @property
    def consuming(self) -> bool:
        return self._tag is not None and self.open

    async def _opened(self) -> AbstractQueue:
        if self._queue is None or not self.open:
            self._tag = None  # a consumer goes with its channel
            channel = await self._open_channel()
            try:
                self._queue = await channel.get_queue(self.queue_name, ensure=False)
            except BaseException:
                with contextlib.suppress(Exception):
                    await channel.close()
                raise
            self._channel = channel
        return self._queue

    async def pull(self) -> AbstractIncomingMessage | None:
        """The queue's next job (unacked), or None when it is empty."""
        message = await (await self._opened()).get(no_ack=False, fail=False)
        if message is not None:
            self._acks.delivered(message)
        return message

    async def consume(self, on_job: Callable[[AbstractIncomingMessage], Awaitable[None]]
                      ) -> None:
        """Have the broker push the queue's jobs to ``on_job`` (each unacked, in order), at
        most :data:`PUSHED_PREFETCH` at a time, until :meth:`stop_consuming`."""
        if self.consuming:
            return
        queue = await self._opened()
        assert self._channel is not None

        async def pushed(message: AbstractIncomingMessage) -> None:
            self._acks.delivered(message)  # aiormq starts the callbacks in delivery order
            await on_job(message)

        await self._channel.set_qos(prefetch_count=PUSHED_PREFETCH)  # for this consumer
        self._tag = await queue.consume(pushed)

    async def stop_consuming(self) -> None:
        """Back to pulling: no more pushes (those in hand stay held, to be settled)."""
        tag, self._tag = self._tag, None
        if tag is not None and self._queue is not None and self.open:
            await self._queue.cancel(tag)

    async def close(self) -> None:
        self._tag = None
        channel, self._channel, self._queue = self._channel, None, None
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()
