"""The bare pipelines the service is compared with, each in its own process.

``python -m bench.baseline route SRC DST`` — consume ``SRC`` → publish the same body to
queue ``DST`` (persistent, publisher confirm, mandatory) → ack: stage 1 without the service.

``python -m bench.baseline e2e SRC DST BASE_URL USER KEY`` — consume ``SRC`` → read the
ICCID from the JSON body → one ``PUT {BASE_URL}/devices/{iccid}`` → publish a small result
to queue ``DST`` (persistent, confirm) → ack: a single-stage service doing the same job.

``python -m bench.baseline two-stage SRC DST BASE_URL USER KEY WORK`` — the service's
shape without the service: ``route`` from ``SRC`` to the work queue ``WORK``, and ``e2e``
from ``WORK`` to ``DST``, both in this process, each stage on its own channel.

Each stage uses one channel with ``prefetch`` 64, as the service's stages do, on one
connection, and runs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Awaitable, Callable

import aio_pika
import aiohttp
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
PREFETCH = 64


async def _stage(connection: AbstractRobustConnection, src: str,
                 ) -> tuple[AbstractQueue, AbstractExchange]:
    """A channel of its own (confirms, prefetch): the queue to consume, where to publish."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    await channel.set_qos(prefetch_count=PREFETCH)
    return await channel.get_queue(src, ensure=False), channel.default_exchange


async def main(argv: list[str]) -> None:
    mode, src, dst = argv[:3]
    connection = await aio_pika.connect_robust(AMQP_URL)
    session: aiohttp.ClientSession | None = None

    def route(exchange: AbstractExchange, to: str) -> Callable[[AbstractIncomingMessage],
                                                              Awaitable[None]]:
        async def on_message(msg: AbstractIncomingMessage) -> None:
            await exchange.publish(
                aio_pika.Message(msg.body, content_type="application/json",
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                 message_id=msg.message_id), to)
            await msg.ack()
        return on_message

    def e2e(exchange: AbstractExchange, to: str) -> Callable[[AbstractIncomingMessage],
                                                            Awaitable[None]]:
        async def on_message(msg: AbstractIncomingMessage) -> None:
            assert session is not None
            data = json.loads(msg.body)
            iccid = data["device"]["ref_no"]
            async with session.put(f"{base_url}/devices/{iccid}",
                                   json={"status": "ACTIVATED"}) as resp:
                answer = await resp.json()
            result = {"event_id": data["event_id"], "client_id": data["client_id"],
                      "iccid": answer["iccid"], "outcome": "succeeded" if resp.status == 200
                      else "failed"}
            await exchange.publish(
                aio_pika.Message(json.dumps(result).encode(), content_type="application/json",
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                 correlation_id=data["event_id"]), to)
            await msg.ack()
        return on_message

    if mode in ("e2e", "two-stage"):
        base_url, user, key = argv[3:6]
        session = aiohttp.ClientSession(
            auth=aiohttp.BasicAuth(user, key), headers={"Accept": "application/json"},
            connector=aiohttp.TCPConnector(limit=PREFETCH),
            timeout=aiohttp.ClientTimeout(total=10))
    if mode == "two-stage":
        work = argv[6]
        queue, exchange = await _stage(connection, work)
        await queue.consume(e2e(exchange, dst))
        queue, exchange = await _stage(connection, src)
        await queue.consume(route(exchange, work))
    elif mode == "e2e":
        queue, exchange = await _stage(connection, src)
        await queue.consume(e2e(exchange, dst))
    else:
        queue, exchange = await _stage(connection, src)
        await queue.consume(route(exchange, dst))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await connection.close()
    if session is not None:
        await session.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
