"""The owner's anchor: one token from its work queue, held unacked while it owns the type.

A standby learns that it owns the type from a delivery (operator guide, section 13): while
the work queue is empty, nothing would be delivered to it when the owner goes. So the owner
always holds one token (a ``{}`` body with the ``x-jasper-token`` header) from the work
queue; when its channel closes, the broker returns the token to the queue and delivers it
to the consumer that is active now. The anchor is renewed before the broker's consumer
timeout (``hold_refresh_seconds``): a fresh token is published and, once it arrives, the old
one acked. While a pause parks jobs by the thousand, the anchor, unsettled at the head of
the channel's deliveries, would make every ack behind it a single ack
(:class:`~.edge.Acks` acks ``multiple`` only up to the first delivery not settled): after
:data:`ANCHOR_BEHIND` jobs acked behind it, a fresh token is published (confirmed) and only
then the anchor acked, so that a token is always in the queue or in hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from .history import History, message_id, until_confirmed
from .topology import TOKEN_HEADER

ANCHOR_BEHIND = 32  # jobs parked and acked behind the anchor before it is replaced


class Anchor:
    """The anchor token of one type's owner (see the module docstring)."""

    def __init__(self, work_queue: str, type_name: str, history: History,
                 ack: Callable[[AbstractIncomingMessage], Awaitable[bool]],
                 spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self._work_queue, self._type_name = work_queue, type_name
        self._history, self._ack, self._spawn = history, ack, spawn
        self.held: AbstractIncomingMessage | None = None
        self._wanted = False  # a new token was published and is on its way
        self._behind = 0  # jobs parked and acked behind the anchor since it came
        self._replacing = False  # a fresh token for the anchor's place is being published
        self.renewals = 0  # anchors renewed or replaced (tests, logs)

    def clear(self) -> None:
        """Ownership lost: the broker returns the token with the channel."""
        self.held, self._wanted, self._behind, self._replacing = None, False, 0, False

    async def ask(self) -> None:
        """At a take-over: publish a token to hold, unless one is held. One try: if it
        fails, the caller gives the type back."""
        if self.held is None:
            self._wanted = True
            await self._history.to_queue(self._work_queue, b"{}", message_id(),
                                         {TOKEN_HEADER: "anchor"})

    async def token(self, message: AbstractIncomingMessage) -> None:
        """A token on the work queue: kept as the anchor when one is wanted, else acked."""
        if self.held is None or self._wanted:
            old, self.held, self._wanted = self.held, message, False
            self._behind = 0
            if old is not None:
                await self._ack(old)
                self.renewals += 1
            return
        await self._ack(message)

    def acked_behind(self) -> None:
        """A job from the work queue was parked and acked behind the anchor."""
        if self.held is None:
            return
        self._behind += 1
        if self._behind >= ANCHOR_BEHIND and not self._replacing:
            self._replacing = True
            self._spawn(self._replace())

    async def keep(self, refresh_s: float) -> None:
        """Renew the anchor before the broker's consumer timeout would close the channel."""
        while True:
            await asyncio.sleep(refresh_s)
            self._wanted = True  # the one held goes once the new one arrives
            await self._publish()

    async def _replace(self) -> None:
        old = self.held
        try:
            await self._publish()
            if old is not None and self.held is old:
                self.held = None
                await self._ack(old)
                self.renewals += 1
        finally:
            self._replacing = False

    async def _publish(self) -> None:
        await until_confirmed(lambda: self._history.to_queue(
            self._work_queue, b"{}", message_id(), {TOKEN_HEADER: "anchor"}),
            f"an anchor of {self._type_name}")
