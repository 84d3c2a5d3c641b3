"""The service's design built with FastStream: the same-design peer of the end-to-end bench.

``python -m bench.faststream_peer SRC DST BASE_URL USER KEY WORK`` runs two FastStream
subscribers in one process, as the service runs its router and its worker:

* route: consume the events queue ``SRC`` → publish the event to the type's work queue
  ``WORK`` (persistent, ``mandatory``, publisher confirm) → ack;
* apply: consume ``WORK`` → one ``PUT {BASE_URL}/devices/{iccid}`` with aiohttp → publish a
  small result to ``DST`` (persistent, confirm) → ack.

Written the way FastStream is meant to be used (typed handlers, JSON decoded and encoded by
the framework, long-lived publishers, ack after the handler returns), with none of the
service's validation, ordering, limits, pause, metrics or logs (FastStream's own per-message
log lines are off: ``logger=None``). Each subscriber has its own channel with ``prefetch``
64, as each of the service's stages has; the queues are the bench's quorum queues
(``declare=False``: they exist already). Runs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import aiohttp
from faststream import AckPolicy
from faststream.rabbit import Channel, QueueType, RabbitBroker, RabbitQueue

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
PREFETCH = 64


def _queue(name: str) -> RabbitQueue:
    return RabbitQueue(name, queue_type=QueueType.QUORUM, durable=True, declare=False)


def build(src: str, dst: str, work: str, base_url: str,
          session: aiohttp.ClientSession) -> RabbitBroker:
    broker = RabbitBroker(AMQP_URL, logger=None, graceful_timeout=5.0)
    to_work = broker.publisher(work, persist=True)
    to_results = broker.publisher(dst, persist=True)

    @broker.subscriber(_queue(src), channel=Channel(prefetch_count=PREFETCH),
                       ack_policy=AckPolicy.REJECT_ON_ERROR)
    async def route(event: dict[str, Any]) -> None:
        # One type here; the service picks the work queue by event["device"]["communicator_type"].
        # The message id is the event id (docs/asyncapi.yaml), taken from the body: a handler
        # parameter for the message itself (RabbitMessage, Context) is a FastDepends custom
        # field, which FastDepends resolves in a worker thread, one hop per message.
        await to_work.publish(event, message_id=event["event_id"],
                              correlation_id=event["event_id"])

    @broker.subscriber(_queue(work), channel=Channel(prefetch_count=PREFETCH),
                       ack_policy=AckPolicy.REJECT_ON_ERROR)
    async def apply(job: dict[str, Any]) -> None:
        iccid = job["device"]["ref_no"]
        async with session.put(f"{base_url}/devices/{iccid}",
                               json={"status": "ACTIVATED"}) as resp:
            answer = await resp.json()
        result = {"event_id": job["event_id"], "client_id": job["client_id"],
                  "iccid": answer["iccid"],
                  "outcome": "succeeded" if resp.status == 200 else "failed"}
        await to_results.publish(result, correlation_id=job["event_id"])

    return broker


async def main(argv: list[str]) -> None:
    src, dst, base_url, user, key, work = argv[:6]
    session = aiohttp.ClientSession(
        auth=aiohttp.BasicAuth(user, key), headers={"Accept": "application/json"},
        connector=aiohttp.TCPConnector(limit=PREFETCH), timeout=aiohttp.ClientTimeout(total=10))
    broker = build(src, dst, work, base_url, session)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await broker.stop()
        await session.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
