"""The service end to end on the path production takes to Control Center: HTTPS with a
private CA (``ca_file``), directly or through a real forward proxy (tinyproxy); the real
broker, the simulator over HTTPS."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aio_pika.abc import AbstractRobustConnection
from prometheus_client import CollectorRegistry, generate_latest

from jasper_consumer.app import Service
from jasper_consumer.config import Settings, parse_settings
from jasper_consumer.metrics import Metrics
from jasper_consumer.simulator import Simulator, server_context
from jasper_consumer.topology import remove_topology

from ..pki import Pki, pki  # noqa: F401  (the fixture)
from ..proxy import StartProxy, forward_proxy  # noqa: F401  (the fixture)
from .conftest import Broker, iccid, make_event, raw_config

PROXY_USER, PROXY_PASSWORD = "centre", "Pr0xy-pw-in-test"
Start = Callable[..., Awaitable[tuple[Service, Broker]]]


@pytest.fixture
async def https_sim(pki: Pki) -> AsyncIterator[Simulator]:  # noqa: F811
    sim = Simulator()
    sim.add_account("nz", "nz-key", max_in_flight=4, requests_per_second=100)
    await sim.start(tls_context=server_context(pki.server_cert, pki.server_key))
    yield sim
    await sim.stop()


@pytest.fixture
async def start(https_sim: Simulator, connection: AbstractRobustConnection
                ) -> AsyncIterator[Start]:
    """Start the service (again, for a restart) on one topology; ``env`` is the environment
    the config is read with (``HTTPS_PROXY`` ...)."""
    tag = f"jct-{uuid.uuid4().hex[:10]}"
    channel = await connection.channel()
    running: list[Service] = []
    made: list[Settings] = []
    brokers: list[Broker] = []  # one reader of the topology's signals, across restarts

    async def run(env: dict[str, str] | None = None, **ct: Any) -> tuple[Service, Broker]:
        types = [{"name": "M2MOne NZ", "server_address": https_sim.base_url, "username": "nz",
                  "api_key": "nz-key", "max_concurrency": 4, "requests_per_second": 100,
                  "request_timeout_seconds": 2, **ct}]
        settings = parse_settings(raw_config(tag, types), env or {})
        service = Service(settings, Metrics(CollectorRegistry()), http_host="127.0.0.1")
        await service.start()
        running.append(service)
        made.append(settings)
        if not brokers:
            brokers.append(Broker(channel, settings))
            await brokers[0].start_reading()
        return service, brokers[0]

    yield run
    for service in running:
        await service.stop()
    if made:
        await remove_topology(connection, made[0])
    await channel.close()


async def test_events_succeed_over_https_with_ca_file(start: Start, https_sim: Simulator,
                                                      pki: Pki):  # noqa: F811
    """With ca_file naming the private CA, events succeed over HTTPS."""
    _, broker = await start(ca_file=str(pki.ca))
    event = make_event(iccid(1))
    await broker.publish(event)

    signal = await broker.signal_for(event["event_id"])

    assert (signal["outcome"], signal["sim_status"]) == ("succeeded", "ACTIVATED")
    assert https_sim.status(iccid(1)) == "ACTIVATED"


def _delayed(broker: Broker, event_id: str) -> dict[str, Any] | None:
    return next((s for s in broker.signals
                 if s["event_id"] == event_id and s["outcome"] == "delayed"), None)


async def test_an_untrusted_certificate_pauses_until_ca_file_is_set(
        start: Start, https_sim: Simulator, pki: Pki):  # noqa: F811
    """Without ca_file the type pauses with "certificate not trusted" in words; restarted
    with ca_file, the waiting event is applied."""
    service, broker = await start()
    event = make_event(iccid(2))
    await broker.publish(event)

    await broker.wait_for(lambda: _delayed(broker, event["event_id"]) is not None,
                          "the delayed signal")
    delayed = _delayed(broker, event["event_id"])
    assert delayed is not None
    print(f"delayed signal: {delayed['text']}")
    assert (delayed["error"]["code"], delayed["error"]["http_status"]) == \
        ("CERTIFICATE_NOT_TRUSTED", None)
    assert delayed["error"]["message"].startswith(
        "certificate not trusted: the TLS certificate 127.0.0.1 presented is signed by an "
        "unknown CA")
    assert "certificate not trusted" in delayed["text"]
    assert service.metrics.communicator_up.labels("M2MOne NZ")._value.get() == 0
    assert https_sim.requests == []
    await service.stop()

    _, broker = await start(ca_file=str(pki.ca))
    signal = await broker.signal_for(event["event_id"])

    assert (signal["outcome"], signal["sim_status"]) == ("succeeded", "ACTIVATED")


async def test_events_succeed_through_the_configured_proxy(
        start: Start, https_sim: Simulator, pki: Pki, forward_proxy: StartProxy):  # noqa: F811
    """With ``proxy`` set (credentials included), events go through it and succeed."""
    proxy = forward_proxy(credentials=(PROXY_USER, PROXY_PASSWORD))
    url = proxy.url.replace("http://", f"http://{PROXY_USER}:{PROXY_PASSWORD}@")
    _, broker = await start(ca_file=str(pki.ca), proxy=url)
    event = make_event(iccid(3))
    await broker.publish(event)

    signal = await broker.signal_for(event["event_id"])

    assert signal["outcome"] == "succeeded"
    assert proxy.tunnels(https_sim.port) >= 1


async def test_events_succeed_through_https_proxy_from_the_environment(
        start: Start, https_sim: Simulator, pki: Pki, forward_proxy: StartProxy):  # noqa: F811
    """Without ``proxy``, HTTPS_PROXY from the environment carries the calls."""
    proxy = forward_proxy()
    _, broker = await start({"HTTPS_PROXY": proxy.url}, ca_file=str(pki.ca))
    event = make_event(iccid(4))
    await broker.publish(event)

    signal = await broker.signal_for(event["event_id"])

    assert signal["outcome"] == "succeeded"
    assert proxy.tunnels(https_sim.port) >= 1


async def test_a_proxy_asking_for_credentials_pauses_the_type(
        start: Start, https_sim: Simulator, pki: Pki, forward_proxy: StartProxy,  # noqa: F811
        caplog: pytest.LogCaptureFixture):
    """A proxy answering 407 pauses the type with PROXY_REFUSED in words; the credentials
    it was given appear in no signal, log line or metric."""
    caplog.set_level(logging.DEBUG)
    proxy = forward_proxy(credentials=(PROXY_USER, "the-right-one"))
    url = proxy.url.replace("http://", f"http://{PROXY_USER}:{PROXY_PASSWORD}@")
    service, broker = await start(ca_file=str(pki.ca), proxy=url)
    event = make_event(iccid(5))
    await broker.publish(event)

    await broker.wait_for(lambda: _delayed(broker, event["event_id"]) is not None,
                          "the delayed signal")
    delayed = _delayed(broker, event["event_id"])
    assert delayed is not None
    print(f"delayed signal: {delayed['text']}")
    assert delayed["error"]["code"] == "PROXY_REFUSED"
    assert delayed["error"]["message"].startswith(
        f"proxy refused: {proxy.url} refused the proxy credentials")
    exposed = [str(broker.signals), caplog.text,
               generate_latest(service.metrics.registry).decode()]
    assert not [text for text in exposed if PROXY_PASSWORD in text]


async def test_check_config_ping_names_the_proxy_and_its_refusal(
        tmp_path: Path, https_sim: Simulator, pki: Pki,  # noqa: F811
        forward_proxy: StartProxy):  # noqa: F811
    """check-config --ping goes through HTTPS_PROXY, says so, and says in words when the
    proxy refuses; the proxy password is never printed."""
    proxy = forward_proxy(credentials=(PROXY_USER, PROXY_PASSWORD))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "amqp_url": "amqp://guest:guest@127.0.0.1:5672/",
        "communicator_types": [{"name": "M2MOne NZ", "server_address": https_sim.base_url,
                                "username": "nz", "api_key": "nz-key",
                                "ca_file": str(pki.ca)}]}))

    async def ping(password: str) -> tuple[int, str]:
        env = {**os.environ, "HTTPS_PROXY": proxy.url.replace(
            "http://", f"http://{PROXY_USER}:{password}@"), "NO_PROXY": ""}
        done = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jasper_consumer", "check-config", "--ping", "--config",
            str(config), env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        async with asyncio.timeout(60):
            output, _ = await done.communicate()
        return int(done.returncode or 0), output.decode()

    code, good = await ping(PROXY_PASSWORD)
    print(good)
    assert code == 0, good
    assert re.search(rf"  M2MOne NZ: OK \(Echo answered in \d+ ms, via proxy "
                     rf"{re.escape(proxy.url)} \(from HTTPS_PROXY\)\)", good), good
    assert "  RabbitMQ at 127.0.0.1:5672: OK (plain AMQP, no TLS)" in good

    code, refused = await ping(PROXY_PASSWORD + "-old")
    print(refused)
    assert code == 1, refused
    assert (f"  M2MOne NZ: forward proxy: proxy refused: {proxy.url} (from HTTPS_PROXY) "
            "refused the proxy credentials (HTTP 401 Unauthorized); set them in HTTPS_PROXY "
            "as http://user:password@host:port (PROXY_REFUSED)") in refused
    assert PROXY_PASSWORD not in good + refused
