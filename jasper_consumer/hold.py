"""What a new owner of a type must find clear: the hold, and an operator tool's own calls.

* ``<prefix>.hold.<slug>``: an empty queue exclusive to the owner's connection. A new
  owner takes from the bulk and parked queues only once it holds it: the previous owner
  lets go of it after closing its bulk and parked channels (so that what it held is back
  at the head of each queue), and the broker deletes it with that owner's connection at
  the latest (operator guide, section 4, "The windows", and section 13).
* ``<prefix>.direct.<slug>``: held by an operator tool that calls the account itself
  (no service ran when it started); its last request may still be open, so a new owner
  waits as after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import aiormq
from aio_pika.abc import AbstractChannel

log = logging.getLogger(__name__)

HOLD_POLL_S = 0.5  # how often a new owner looks whether the previous one let go


class Hold:
    """The hold of one type, seen from a process that owns it or is taking it over."""

    def __init__(self, name: str, type_name: str,
                 open_channel: Callable[[], Awaitable[AbstractChannel]]) -> None:
        self.name, self._type_name, self._open_channel = name, type_name, open_channel
        self._channel: AbstractChannel | None = None  # the one the hold was declared on

    async def take(self, still_owner: Callable[[], bool]) -> bool:
        """Declare the hold exclusive to this connection, waiting while another connection
        holds it (the previous owner: a stuck broker, a frozen process), as long as
        ``still_owner()``. Returns whether it is held."""
        said = False
        while still_owner():
            lock = await self._open_channel()
            try:
                underlay = await lock.get_underlay_channel()  # not restored on reconnect
                await underlay.queue_declare(self.name, exclusive=True, auto_delete=True)
            except aiormq.exceptions.ChannelLockedResource:
                if not said:
                    log.warning("%s: waiting for the previous owner to let go of its bulk and "
                                "parked jobs", self._type_name,
                                extra={"fields": {"communicator_type": self._type_name}})
                    said = True
                await asyncio.sleep(HOLD_POLL_S)
                continue
            self._channel = lock
            return True
        return False

    async def let_go(self) -> None:
        """Delete the hold (after the bulk and parked channels are closed) and close its
        channel; nothing to do when it is not held."""
        lock, self._channel = self._channel, None
        if lock is not None and not lock.is_closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await lock.queue_delete(self.name)
            with contextlib.suppress(Exception):
                await lock.close()


async def tool_calls_directly(open_channel: Callable[[], Awaitable[AbstractChannel]],
                              direct_queue: str) -> bool:
    """Whether an operator tool holds ``direct_queue`` (``<prefix>.direct.<slug>``)."""
    channel = await open_channel()
    try:
        await channel.declare_queue(direct_queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    except aiormq.exceptions.ChannelLockedResource:
        return True  # exclusive to the tool's connection: it exists
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
    return True
