"""Park moves on the real broker: published without waiting for each socket write
(``pipelined``, history.py), every one still confirmed before it returns, and a move the
broker does not take fails on its own."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection
from prometheus_client import CollectorRegistry

from jasper_consumer.config import parse_settings
from jasper_consumer.errors import PublishFailed
from jasper_consumer.history import History, message_id
from jasper_consumer.metrics import Metrics
from jasper_consumer.topology import Names


def history(channel: aio_pika.abc.AbstractChannel, tag: str) -> History:
    settings = parse_settings({"queue_prefix": tag, "communicator_types": [{
        "name": "T", "server_address": "https://j.example/rws/api/v1", "username": "u",
        "api_key": "k"}]}, {})
    return History(channel, Names.from_settings(settings), Metrics(CollectorRegistry()))


async def depth(channel: aio_pika.abc.AbstractChannel, name: str) -> int:
    underlay = await channel.get_underlay_channel()
    return int((await underlay.queue_declare(name, passive=True)).message_count or 0)


async def test_pipelined_park_moves_are_each_confirmed(connection: AbstractRobustConnection):
    """2,000 moves at once: each returns only once confirmed, so all are in the queue."""
    tag = f"jct-{uuid.uuid4().hex[:8]}"
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    queue = await channel.declare_queue(f"{tag}.parked.t", durable=True)
    try:
        h = history(channel, tag)
        await asyncio.gather(*(h.to_queue(queue.name, b"{}", message_id(), pipelined=True)
                               for _ in range(2000)))
        assert await depth(channel, queue.name) == 2000
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await channel.close()


async def test_a_pipelined_park_move_not_taken_fails_alone(
        connection: AbstractRobustConnection):
    """Among moves in flight together, one the broker cannot route (mandatory: returned)
    raises PublishFailed; the others are confirmed."""
    tag = f"jct-{uuid.uuid4().hex[:8]}"
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    queue = await channel.declare_queue(f"{tag}.parked.t", durable=True)
    try:
        h = history(channel, tag)
        targets = [queue.name] * 50 + [f"{tag}.parked.none"] + [queue.name] * 50
        results = await asyncio.gather(
            *(h.to_queue(t, b"{}", message_id(), pipelined=True) for t in targets),
            return_exceptions=True)
        failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
        assert failed == [50]
        with pytest.raises(PublishFailed):
            raise results[50]  # type: ignore[misc]
        assert await depth(channel, queue.name) == 100
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        if not channel.is_closed:
            await channel.close()


async def test_batched_and_single_publishes_share_a_channel(
        connection: AbstractRobustConnection):
    """Batched moves and ordinary publishes (signals, tokens) on one channel at once: the
    numbering the confirms refer to stays one sequence, every publish is confirmed."""
    tag = f"jct-{uuid.uuid4().hex[:8]}"
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    queue = await channel.declare_queue(f"{tag}.parked.t", durable=True)
    try:
        h = history(channel, tag)
        await asyncio.gather(*(h.to_queue(queue.name, b"{}", message_id(),
                                          pipelined=n % 3 != 0) for n in range(900)))
        assert await depth(channel, queue.name) == 900
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await channel.close()


async def test_a_lost_channel_fails_the_batched_publishes_not_confirmed(
        connection: AbstractRobustConnection):
    """The channel closes with moves in flight: each one either returned (and is in the
    queue) or raised PublishFailed — none hangs, none looks like a cancellation (how many
    the broker confirmed before the close is a race)."""
    tag = f"jct-{uuid.uuid4().hex[:8]}"
    other = await connection.channel()
    queue = await other.declare_queue(f"{tag}.parked.t", durable=True)
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    try:
        h = history(channel, tag)
        moves = [asyncio.ensure_future(h.to_queue(queue.name, b"{}", message_id(),
                                                  pipelined=True)) for _ in range(500)]
        await asyncio.sleep(0)  # the first batch is on its way
        await channel.close()
        async with asyncio.timeout(10):
            results = await asyncio.gather(*moves, return_exceptions=True)
        assert all(r is None or isinstance(r, PublishFailed) for r in results), {
            type(r).__name__ for r in results}
        with pytest.raises(PublishFailed):  # and one asked for once it is closed
            await h.to_queue(queue.name, b"{}", message_id(), pipelined=True)
        assert await depth(other, queue.name) >= sum(1 for r in results if r is None)
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await other.close()
