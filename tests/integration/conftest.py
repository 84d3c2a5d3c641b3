"""Integration fixtures: the real RabbitMQ, the simulator over real sockets, the real service.

Each test gets its own queue prefix and exchanges (``jct-<random>``) and deletes
them afterwards, so tests never see each other's messages.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from prometheus_client import CollectorRegistry

from jasper_consumer.app import Service
from jasper_consumer.broker import event_message
from jasper_consumer.calls import OwnerCalls
from jasper_consumer.config import Settings, parse_settings
from jasper_consumer.edge import Acks
from jasper_consumer.jasper import JasperClient
from jasper_consumer.metrics import Metrics
from jasper_consumer.simulator import Simulator
from jasper_consumer.topology import DEAD_REASON_HEADER, Names, declare, remove_topology

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
WAIT_S = 20.0


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    simulator = Simulator()
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def connection() -> AsyncIterator[AbstractRobustConnection]:
    conn = await aio_pika.connect_robust(AMQP_URL)
    yield conn
    await conn.close()


class Broker:
    """The test's view of the broker: publish events, read signals and dead letters."""

    def __init__(self, channel: AbstractChannel, settings: Settings) -> None:
        self.channel = channel
        self.settings = settings
        self.names = Names.from_settings(settings)
        self.signals: list[dict[str, Any]] = []
        self.dead: list[aio_pika.abc.AbstractIncomingMessage] = []
        self._changed = asyncio.Condition()

    async def publish(self, body: dict[str, Any] | bytes, *, code: int | None = None,
                      message_id: str | None = None) -> None:
        if isinstance(body, dict):
            code = code or body.get("event_code")
            message_id = message_id or body.get("event_id")
            raw = json.dumps(body).encode()
        else:
            raw = body
        exchange = await self.channel.get_exchange(self.settings.events_exchange)
        await exchange.publish(
            event_message(raw, message_id=message_id),
            routing_key=f"event.{code or 65516}",
        )

    async def start_reading(self) -> None:
        if self.settings.history_queue:
            history = await self.channel.get_queue(self.names.history_queue)
            await history.consume(self._on_signal, no_ack=True)
        dead = await self.channel.get_queue(self.names.dead_queue)
        await dead.consume(self._on_dead, no_ack=True)

    async def _on_signal(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with self._changed:
            signal = json.loads(message.body)
            signal["_routing_key"] = message.routing_key
            signal["_correlation_id"] = message.correlation_id
            self.signals.append(signal)
            self._changed.notify_all()

    async def _on_dead(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with self._changed:
            self.dead.append(message)
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool], what: str,
                       timeout: float = WAIT_S) -> None:
        """Wait (bounded) until ``predicate`` holds; fail naming ``what`` otherwise."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(predicate)
        except TimeoutError:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what}; signals so far: "
                f"{[(s['event_id'], s['outcome']) for s in self.signals][-20:]}"
            ) from None

    async def wait_for_async(self, predicate: Callable[[], Awaitable[bool]], what: str,
                             timeout: float = WAIT_S) -> None:
        """Poll ``predicate`` (bounded) until it holds; for facts no signal announces."""
        try:
            async with asyncio.timeout(timeout):
                while not await predicate():  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None

    def final(self, event_id: str) -> list[dict[str, Any]]:
        return [s for s in self.signals
                if s["event_id"] == event_id and s["outcome"] in ("succeeded", "failed")]

    async def final_signals(self, event_ids: list[str],
                            timeout: float = WAIT_S) -> dict[str, dict[str, Any]]:
        """The final signal of each event, waiting until all are there."""
        await self.wait_for(lambda: all(self.final(e) for e in event_ids),
                            f"final signals of {len(event_ids)} events", timeout)
        return {e: self.final(e)[0] for e in event_ids}

    async def signal_for(self, event_id: str, timeout: float = WAIT_S) -> dict[str, Any]:
        return (await self.final_signals([event_id], timeout))[event_id]

    def dead_reasons(self) -> list[str]:
        return [str((m.headers or {}).get(DEAD_REASON_HEADER)) for m in self.dead]


def make_event(iccid: str, *, code: int = 65516, communicator_type: str = "M2MOne NZ",
               client_id: str = "100234", **extra: Any) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "event_code": code,
        "client_id": client_id,
        "occurred_at": "2026-11-25T10:15:00Z",
        "device": {"ref_no": iccid, "communicator_type": communicator_type},
        **extra,
    }


def iccid(n: int) -> str:
    return f"8961018500{n:010d}"


RunService = Callable[..., Awaitable[tuple[Service, Broker]]]


def raw_config(tag: str, types: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    """A test's config: its own prefix and exchanges, quick retries, a random HTTP port."""
    return {
        "amqp_url": AMQP_URL,
        "events_exchange": f"{tag}.events",
        "history_exchange": f"{tag}.history",
        "queue_prefix": tag,
        "http_port": 0,
        "retry": {"max_attempts": 3, "initial_delay_seconds": 0.01,
                  "max_delay_seconds": 0.05, "max_elapsed_seconds": 5},
        "communicator_types": types,
        "shutdown_grace_seconds": 5,
        **overrides,
    }


@pytest.fixture
async def run_service(
    sim: Simulator, connection: AbstractRobustConnection
) -> AsyncIterator[RunService]:
    """Start the real service against the simulator with a unique topology; clean up after."""
    started: list[tuple[Service, Settings]] = []
    tag = f"jct-{uuid.uuid4().hex[:10]}"
    channel = await connection.channel()

    async def start(types: list[dict[str, Any]] | None = None, **overrides: Any
                    ) -> tuple[Service, Broker]:
        if types is None:
            types = [{"name": "M2MOne NZ", "username": "nz", "api_key": "nz-key",
                      "max_concurrency": 4, "requests_per_second": 200}]
        for t in types:
            t.setdefault("server_address", sim.base_url)
            t.setdefault("username", t["name"])
            if t["username"] not in sim.accounts:
                sim.add_account(t["username"], t.get("api_key", "k"),
                                max_in_flight=t.get("max_concurrency", 1),
                                requests_per_second=t.get("requests_per_second", 1.0))
            t.setdefault("api_key", "k")
            # A new owner waits 1/rps + the request timeout before its first call (operator
            # guide, section 13).
            t.setdefault("request_timeout_seconds", 1)
        settings = parse_settings(raw_config(tag, types, **overrides), {})
        service = Service(settings, Metrics(CollectorRegistry()), http_host="127.0.0.1")
        await service.start()
        started.append((service, settings))
        broker = Broker(channel, settings)
        await broker.start_reading()
        return service, broker

    yield start

    for service, _ in started:
        await service.stop()
    for _, settings in started[:1]:
        await remove_topology(connection, settings)
    await channel.close()


class Owner:
    """The owning process's side of operator tools' calls, as a service process runs it
    (:class:`OwnerCalls` on the type's calls queue, a consumer of its work queue that takes
    the tools' wake tokens), with a client that records every call it makes for a tool."""

    def __init__(self, connection: AbstractRobustConnection, settings: Settings) -> None:
        self.connection = connection
        self.settings = settings
        self.served: list[dict[str, Any]] = []  # {"op": ..., and its argument}
        self.tokens: list[aio_pika.abc.AbstractIncomingMessage] = []
        self._owners: list[OwnerCalls] = []
        self._clients: list[JasperClient] = []
        self._channel: AbstractChannel | None = None

    async def start(self) -> None:
        self._channel = await self.connection.channel()
        topology = await declare(self._channel, self.settings)
        names = Names.from_settings(self.settings)
        served = self.served

        class Recording(JasperClient):
            async def search_devices(self, page_number: int, **kwargs: Any) -> dict[str, Any]:
                served.append({"op": "search_devices", "page_number": page_number})
                return await super().search_devices(page_number, **kwargs)

            async def get_device(self, iccid: str) -> dict[str, Any]:
                served.append({"op": "get_device", "iccid": iccid})
                return await super().get_device(iccid)

            async def echo(self, word: str = "jasper-consumer") -> None:
                served.append({"op": "echo"})
                await super().echo(word)

        async def open_channel() -> Any:
            return await self.connection.channel(publisher_confirms=True,
                                                 on_return_raises=True)

        async def on_work(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            self.tokens.append(message)
            await message.ack()

        for ct in self.settings.communicator_types:
            client = Recording(ct, Metrics(CollectorRegistry()))
            self._clients.append(client)
            owner = OwnerCalls(client, names.calls_queue(ct), open_channel, Acks())
            self._owners.append(owner)
            await topology.work_queues[ct.name].consume(on_work)
            await owner.start()

    async def stop(self) -> None:
        for owner in self._owners:
            await owner.stop()
        if self._channel is not None:
            await self._channel.close()
        for client in self._clients:
            await client.close()
