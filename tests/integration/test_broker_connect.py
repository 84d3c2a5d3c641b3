"""Start-up against a cluster whose first node drops packets: the next node is used
within the bound of one attempt (the real broker is the second node)."""

from __future__ import annotations

import asyncio
import time

from jasper_consumer import broker

from ..netfaults import Silent, dropping_syns
from .conftest import AMQP_URL


async def test_start_up_passes_over_a_node_that_drops_packets():
    """A first node that drops SYNs costs one bounded attempt, not minutes of SYN retries."""
    with dropping_syns() as (port, _):
        started = time.monotonic()
        async with asyncio.timeout(15):
            connection = await broker.connect(
                [f"amqp://guest:guest@127.0.0.1:{port}/", AMQP_URL], "test drops SYNs")
        took = time.monotonic() - started
    try:
        print(f"connected to the second node after {took:.2f} s")
        assert getattr(connection, "node", "") == "amqp://guest:***@127.0.0.1:5672/"
        assert took < 8
    finally:
        await connection.close()


async def test_start_up_passes_over_a_node_that_never_answers():
    """A first node that accepts and never answers costs one bounded attempt."""
    async with Silent() as silent:
        started = time.monotonic()
        async with asyncio.timeout(15):
            connection = await broker.connect(
                [f"amqp://guest:guest@127.0.0.1:{silent.port}/", AMQP_URL], "test silent")
        took = time.monotonic() - started
    try:
        print(f"connected to the second node after {took:.2f} s")
        assert took < 8
    finally:
        await connection.close()
