"""The bare pipelines the service is compared with, each in its own process.

``python -m bench.baseline route SRC DST`` — consume ``SRC`` → publish the same body to
queue ``DST`` (persistent, publisher confirm, mandatory) → ack: stage 1 without the service.

``python -m bench.baseline e2e SRC DST BASE_URL USER KEY`` — consume ``SRC`` → read the
ICCID from the JSON body → one ``PUT {BASE_URL}/devices/{iccid}`` → publish a small result
to queue ``DST`` (persistent, confirm) → ack: a single-stage service doing the same job.

Both use one connection and one channel with ``prefetch`` 64, as the service's stages do,
and run until SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import aio_pika
import aiohttp
from aio_pika.abc import AbstractIncomingMessage

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
PREFETCH = 64


async def main(argv: list[str]) -> None:
    mode, src, dst = argv[:3]
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    await channel.set_qos(prefetch_count=PREFETCH)
    exchange = channel.default_exchange
    queue = await channel.get_queue(src, ensure=False)
    session: aiohttp.ClientSession | None = None

    async def route(msg: AbstractIncomingMessage) -> None:
        await exchange.publish(
            aio_pika.Message(msg.body, content_type="application/json",
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                             message_id=msg.message_id), dst)
        await msg.ack()

    async def e2e(msg: AbstractIncomingMessage) -> None:
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
                             correlation_id=data["event_id"]), dst)
        await msg.ack()

    if mode == "e2e":
        base_url, user, key = argv[3:6]
        session = aiohttp.ClientSession(
            auth=aiohttp.BasicAuth(user, key), headers={"Accept": "application/json"},
            connector=aiohttp.TCPConnector(limit=PREFETCH),
            timeout=aiohttp.ClientTimeout(total=10))
        await queue.consume(e2e)
    else:
        await queue.consume(route)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await channel.close()
    await connection.close()
    if session is not None:
        await session.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
