"""Batched acks (edge.Acks) against a fake channel that records the ack frames."""

from __future__ import annotations

import asyncio
from typing import Any

from aio_pika.exceptions import ChannelInvalidStateError

from jasper_consumer.edge import Acks


class Channel:
    def __init__(self) -> None:
        self.acks: list[tuple[int, bool]] = []
        self.is_closed = False

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        await asyncio.sleep(0)
        self.acks.append((tag, multiple))


class Message:
    """As aio-pika's IncomingMessage: reading ``channel`` once it is closed raises."""

    def __init__(self, channel: Channel, tag: int) -> None:
        self._channel = channel
        self.delivery_tag = tag

    @property
    def channel(self) -> Channel:
        if self._channel.is_closed:
            raise ChannelInvalidStateError
        return self._channel


async def flushed(acks: Acks) -> None:
    await asyncio.sleep(0.02)


async def test_a_settled_prefix_is_one_multiple_ack():
    """Deliveries 1..5 settled in any order: one ack of 5 with multiple."""
    channel, acks = Channel(), Acks(delay_s=0.001)
    messages = [Message(channel, n) for n in range(1, 6)]
    for m in messages:
        acks.delivered(m)  # type: ignore[arg-type]
    for m in reversed(messages):
        assert acks.settled(m)  # type: ignore[arg-type]
    await flushed(acks)

    assert channel.acks == [(5, True)]


async def test_a_slow_delivery_does_not_hold_the_others_back():
    """2 is not settled: 1 goes with multiple, 3 and 4 one by one, 2 later on its own."""
    channel, acks = Channel(), Acks(delay_s=0.001)
    messages = {n: Message(channel, n) for n in range(1, 5)}
    for m in messages.values():
        acks.delivered(m)  # type: ignore[arg-type]
    for n in (1, 3, 4):
        acks.settled(messages[n])  # type: ignore[arg-type]
    await flushed(acks)
    acks.settled(messages[2])  # type: ignore[arg-type]
    await flushed(acks)

    assert channel.acks == [(1, True), (3, False), (4, False), (2, True)]


async def test_acks_never_cover_a_tag_twice_across_flushes():
    """Flushes one after another never ack a tag an earlier flush acks on its own."""
    channel, acks = Channel(), Acks(delay_s=0)
    messages = {n: Message(channel, n) for n in range(1, 8)}
    for m in messages.values():
        acks.delivered(m)  # type: ignore[arg-type]
    for order in ((3, 5), (1, 2), (4, 6, 7)):
        for n in order:
            acks.settled(messages[n])  # type: ignore[arg-type]
        await asyncio.sleep(0)
    await flushed(acks)

    covered: list[int] = []
    for tag, multiple in channel.acks:
        new = [t for t in range(1, tag + 1) if t not in covered] if multiple else [tag]
        assert tag not in covered, channel.acks
        assert new, channel.acks
        covered += new
    assert sorted(covered) == list(range(1, 8))


async def test_an_unregistered_or_closed_delivery_is_not_batched():
    """A delivery never registered, or on a closed channel, is left to the caller; settling
    or forgetting one on a closed channel does not raise."""
    channel, acks = Channel(), Acks(delay_s=0.001)
    message: Any = Message(channel, 1)
    other: Any = Message(channel, 2)
    assert not acks.settled(message)
    acks.delivered(message)
    acks.delivered(other)
    channel.is_closed = True

    assert not acks.settled(message)
    acks.forget(other)
    await flushed(acks)
    assert channel.acks == []


async def test_a_closed_channels_deliveries_are_forgotten_on_the_next_channel():
    """Deliveries never settled on a channel that closed (a reconnect) are not kept forever:
    the first delivery on a new channel drops them."""
    old, new, acks = Channel(), Channel(), Acks(delay_s=0.001)
    for tag in (1, 2, 3):
        acks.delivered(Message(old, tag))  # type: ignore[arg-type]
    old.is_closed = True

    acks.delivered(Message(new, 1))  # type: ignore[arg-type]

    assert list(acks._channels) == [new]
