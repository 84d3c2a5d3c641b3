"""The service and its tools against a RabbitMQ node that speaks only TLS.

The node comes from ``../shared/rabbitmq-tls/up`` (searched for beside the checkout and
above it): AMQPS on 127.0.0.1:5691 with a fresh test PKI, a user with a random password.
The session starts it where it can (root, RabbitMQ installed) and runs ``down`` at the
end if it started it; elsewhere these tests are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import aiohttp
import pytest
import yaml
from aio_pika.abc import AbstractRobustConnection
from prometheus_client import CollectorRegistry

from jasper_consumer.app import Service
from jasper_consumer.cli import run_tool
from jasper_consumer.config import Settings, parse_settings
from jasper_consumer.errors import BrokerUntrusted
from jasper_consumer.metrics import Metrics
from jasper_consumer.simulator import Simulator, server_context
from jasper_consumer.topology import remove_topology

from ..netfaults import Relay
from ..pki import Pki, pki  # noqa: F401  (the fixture)
from ..reliability.conftest import wait_until
from .conftest import Broker, iccid, make_event, raw_config

REPO = Path(__file__).resolve().parents[2]
NODE = "jtls@localhost"


def _script(name: str) -> Path | None:
    for parent in REPO.parents:
        candidate = parent / "shared" / "rabbitmq-tls" / name
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class TlsNode:
    url: str  # amqps://jasper:PASSWORD@localhost:5691/ (no cafile)
    ca: str
    client_cert: str
    client_key: str
    password: str

    def with_tls(self, *, client_cert: bool = False, cafile: str | None = None) -> str:
        query = f"?cafile={quote(cafile or self.ca)}"
        if client_cert:
            query += f"&certfile={quote(self.client_cert)}&keyfile={quote(self.client_key)}"
        return self.url + query


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def tls_node() -> Iterator[TlsNode]:
    up, down = _script("up"), _script("down")
    if up is None or down is None:
        pytest.skip("../shared/rabbitmq-tls/up is not beside the checkout: no TLS-only node")
    if os.geteuid() != 0:
        pytest.skip("../shared/rabbitmq-tls/up needs root (the node runs as rabbitmq)")
    if shutil.which("rabbitmq-server") is None:
        pytest.skip("rabbitmq-server is not installed: no TLS-only node")
    was_running = _listening(5691)
    done = subprocess.run([str(up)], capture_output=True, text=True, timeout=180, check=False)
    if done.returncode != 0:
        pytest.skip(f"the TLS-only node did not start: {done.stderr.strip()[-300:]}")
    values = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    try:
        yield TlsNode(values["AMQPS_URL"], values["CA_FILE"], values["CLIENT_CERT"],
                      values["CLIENT_KEY"], values["PASSWORD"])
    finally:
        if not was_running:
            subprocess.run([str(down)], capture_output=True, timeout=120, check=False)


def connections_on_node() -> list[str]:
    """``ssl``, ``peer_cert_subject`` and ``client_properties`` of each connection on the
    TLS node, one tab-separated line each."""
    done = subprocess.run(
        ["su", "rabbitmq", "-s", "/bin/bash", "-c",
         f"rabbitmqctl -q -n {NODE} list_connections ssl peer_cert_subject client_properties "
         "--no-table-headers"], capture_output=True, text=True, timeout=60, check=False)
    return [line for line in done.stdout.splitlines() if line.strip()]


Start = Callable[..., Awaitable[tuple[Service, Broker]]]


@pytest.fixture
async def tls_connection(tls_node: TlsNode) -> AsyncIterator[AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(tls_node.with_tls())
    yield connection
    await connection.close()


@pytest.fixture
async def start(tls_node: TlsNode, sim: Simulator, tls_connection: AbstractRobustConnection,
                tmp_path: Path) -> AsyncIterator[Start]:
    """Start the service on the TLS node with ``amqp_url``; the test reads its signals over
    a TLS connection of its own."""
    tag = f"jct-{uuid.uuid4().hex[:10]}"
    sim.add_account("nz", "nz-key", max_in_flight=4, requests_per_second=100)
    channel = await tls_connection.channel()
    running: list[Service] = []
    made: list[Settings] = []

    async def run(amqp_url: str) -> tuple[Service, Broker]:
        types = [{"name": "M2MOne NZ", "server_address": sim.base_url, "username": "nz",
                  "api_key": "nz-key", "max_concurrency": 4, "requests_per_second": 100,
                  "request_timeout_seconds": 1}]
        raw = raw_config(tag, types, amqp_url=amqp_url)
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
        settings = parse_settings(raw, {})
        assert settings.file_problems() == []
        service = Service(settings, Metrics(CollectorRegistry()), http_host="127.0.0.1")
        running.append(service)
        made.append(settings)
        await service.start()
        broker = Broker(channel, settings)
        await broker.start_reading()
        return service, broker

    yield run
    for service in running:
        await service.stop()
    if made:
        await remove_topology(tls_connection, made[0])
    await channel.close()


async def _service_round_trip(start: Start, url: str, n: int) -> Service:
    service, broker = await start(url)
    event = make_event(iccid(n))
    await broker.publish(event)
    signal = await broker.signal_for(event["event_id"])
    assert (signal["outcome"], signal["sim_status"]) == ("succeeded", "ACTIVATED")
    return service


def _service_connection(service: Service) -> list[str]:
    """``[ssl, peer_cert_subject]`` of the service's connection (by its connection name)."""
    name = f"jasper-consumer {service.settings.queue_prefix}"
    rows = [line.split("\t")[:2] for line in connections_on_node() if name in line]
    assert len(rows) == 1, connections_on_node()
    return rows[0]


async def test_service_consumes_and_publishes_over_amqps_with_the_ca(
        start: Start, tls_node: TlsNode, caplog: pytest.LogCaptureFixture):
    """Over amqps:// with cafile, the service routes an event and publishes its signal;
    its connection is TLS, with no client certificate; the password is never logged."""
    caplog.set_level(logging.DEBUG)
    service = await _service_round_trip(start, tls_node.with_tls(), 1)

    row = _service_connection(service)
    print(f"service connection on the node: {row}")
    assert row == ["true", ""]
    assert tls_node.password not in caplog.text


async def test_service_sends_its_client_certificate(start: Start, tls_node: TlsNode):
    """With certfile and keyfile, the node sees the client certificate (CN=jasper-consumer)."""
    service = await _service_round_trip(start, tls_node.with_tls(client_cert=True), 2)

    row = _service_connection(service)
    print(f"service connection on the node: {row}")
    assert row[0] == "true"
    assert "CN=jasper-consumer" in row[1]


def _config_file(tmp_path: Path, amqp_url: str) -> Path:
    config = tmp_path / "tls-config.yaml"
    config.write_text(yaml.safe_dump({
        "amqp_url": amqp_url, "http_port": 0, "queue_prefix": f"jct-{uuid.uuid4().hex[:8]}",
        "communicator_types": [{"name": "M2MOne NZ", "username": "nz", "api_key": "nz-key",
                                "server_address": "http://127.0.0.1:9/rws/api/v1"}]}))
    return config


async def _cli(*args: str) -> tuple[int, str]:
    done = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jasper_consumer", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    async with asyncio.timeout(90):
        output, _ = await done.communicate()
    return int(done.returncode or 0), output.decode()


async def test_a_broker_certificate_from_an_unknown_ca_stops_start_up(
        tls_node: TlsNode, tmp_path: Path, pki: Pki):  # noqa: F811
    """With a cafile that did not sign the node's certificate, ``run`` exits 2 at once with
    an error naming the host and the unknown CA; the password appears nowhere."""
    config = _config_file(tmp_path, tls_node.with_tls(cafile=str(pki.other_ca)))

    code, output = await _cli("run", "--config", str(config))

    print(f"run exited {code}:\n{output}")
    assert code == 2
    error = output.strip().splitlines()[-1]
    assert error == (
        "jasper-consumer run: RabbitMQ at localhost:5691: TLS certificate not trusted: signed "
        "by an unknown CA (self-signed certificate in certificate chain); set cafile in "
        "amqp_url to the CA that signed the broker's certificate")
    assert tls_node.password not in output


async def test_start_up_raises_broker_untrusted_in_process(tls_node: TlsNode, pki: Pki,  # noqa: F811
                                                           sim: Simulator):
    """Service.start with an untrusted certificate raises BrokerUntrusted (not a retry loop)."""
    raw = raw_config("jct-untrusted", [{"name": "A", "server_address": sim.base_url,
                                        "username": "a", "api_key": "k"}],
                     amqp_url=tls_node.with_tls(cafile=str(pki.other_ca)))
    service = Service(parse_settings(raw, {}), Metrics(CollectorRegistry()),
                      http_host="127.0.0.1")

    async with asyncio.timeout(20):
        with pytest.raises(BrokerUntrusted, match="localhost:5691: TLS certificate not trusted"):
            await service.start()


async def test_a_host_name_the_certificate_is_not_for_is_named(tls_node: TlsNode,
                                                               tmp_path: Path):
    """Reached by a name its certificate does not carry (127.0.0.2), check-config --ping
    names the host and the mismatch."""
    async with Relay(("127.0.0.1", 5691), host="127.0.0.2") as relay:
        url = tls_node.with_tls().replace("@localhost:5691/", f"@127.0.0.2:{relay.port}/")
        out = io.StringIO()
        code = await run_tool(["check-config", "--ping", "--config",
                               str(_config_file(tmp_path, url))], out)

    print(out.getvalue())
    assert code == 1
    assert (f"  RabbitMQ at 127.0.0.2:{relay.port}: TLS certificate not trusted: issued for "
            "another host name, not '127.0.0.2'; use a host name the certificate is for in "
            "amqp_url") in out.getvalue()
    assert tls_node.password not in out.getvalue()


async def test_check_config_ping_checks_the_broker_tls(tls_node: TlsNode, tmp_path: Path):
    """check-config --ping connects over TLS and says whether a client certificate went."""
    for client_cert, how in ((False, "TLS, certificate verified"),
                             (True, "TLS, certificate verified, client certificate sent")):
        out = io.StringIO()
        await run_tool(["check-config", "--ping", "--config", str(_config_file(
            tmp_path, tls_node.with_tls(client_cert=client_cert)))], out)
        print(out.getvalue())
        assert f"  RabbitMQ at localhost:5691: OK ({how})" in out.getvalue()


async def test_a_client_certificate_the_node_does_not_trust_is_named(
        tls_node: TlsNode, tmp_path: Path, pki: Pki):  # noqa: F811
    """A client certificate from a CA the node does not trust: check-config --ping names
    the node and the client certificate (the node's alert, or its reset right after the
    handshake, depending on timing)."""
    url = tls_node.with_tls().replace(
        "?", f"?certfile={quote(str(pki.other_server_cert))}&"
             f"keyfile={quote(str(pki.other_server_key))}&")
    out = io.StringIO()
    code = await run_tool(["check-config", "--ping", "--config",
                           str(_config_file(tmp_path, url))], out)

    line = next(x for x in out.getvalue().splitlines()
                if x.startswith("  RabbitMQ at localhost:5691"))
    print(line)
    assert code == 1
    assert line in (
        "  RabbitMQ at localhost:5691 failed the TLS handshake: the broker does not trust the "
        "CA of our client certificate (TLS alert: unknown CA)",
        "  RabbitMQ at localhost:5691 reset the connection (right after the TLS handshake: the "
        "broker may have refused the client certificate; check certfile and keyfile, and that "
        "the broker trusts their CA)")
    assert tls_node.password not in out.getvalue()


async def test_tools_work_over_amqps(start: Start, tls_node: TlsNode, tmp_path: Path):
    """``publish --wait`` and ``dead-letters list`` work over the same amqps:// URL."""
    url = tls_node.with_tls(client_cert=True)
    await start(url)
    config = str(tmp_path / "config.yaml")  # written by ``start``

    code, output = await _cli("publish", "--config", config, "--event", "65516", "--client-id",
                              "100234", "--iccid", iccid(7), "--communicator-type",
                              "M2MOne NZ", "--wait", "20")
    print(output)
    assert code == 0, output
    signal = json.loads(output[output.index("{"):])
    assert (signal["outcome"], signal["iccid"]) == ("succeeded", iccid(7))

    out = io.StringIO()
    code = await run_tool(["dead-letters", "list", "--config", config], out)
    print(out.getvalue())
    assert code == 0, out.getvalue()
    assert tls_node.password not in output + out.getvalue()


class _UntrustedServer:
    """A TLS server whose certificate (for localhost) another CA signed."""

    def __init__(self, pki: Pki) -> None:  # noqa: F811
        self._context = server_context(pki.other_server_cert, pki.other_server_key)
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> _UntrustedServer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0,
                                                  ssl=self._context)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def _accept(self, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def __aexit__(self, *_: Any) -> None:
        assert self._server is not None
        self._server.close()


async def _readyz(service: Service) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{service.probes.port}/readyz") as resp:
        return resp.status, await resp.text()


async def test_a_reconnection_that_meets_an_untrusted_certificate_keeps_retrying(
        start: Start, tls_node: TlsNode, pki: Pki,  # noqa: F811
        caplog: pytest.LogCaptureFixture):
    """Once running, a reconnection that meets a certificate it does not trust keeps
    retrying, and says so in words in the log and in /readyz; once the right node is back,
    the service reconnects."""
    caplog.set_level(logging.INFO)
    async with Relay(("127.0.0.1", 5691)) as relay, _UntrustedServer(pki) as impostor:
        url = tls_node.with_tls().replace("@localhost:5691/", f"@localhost:{relay.port}/")
        service, _ = await start(url)
        assert (await _readyz(service))[0] == 200

        relay.target = ("127.0.0.1", impostor.port)
        relay.cut()
        words = (f"RabbitMQ at localhost:{relay.port}: TLS certificate not trusted: signed by "
                 "an unknown CA")

        async def says_untrusted() -> bool:
            status, text = await _readyz(service)
            return status == 503 and words in text

        await wait_until(says_untrusted, "/readyz to say the certificate is not trusted", 30)
        status, text = await _readyz(service)
        print(f"/readyz {status}: {text}")
        log_lines = [r.getMessage() for r in caplog.records
                     if r.name == "jasper_consumer.broker"
                     and r.getMessage().startswith("reconnection failed: ")]
        print(f"log: {log_lines[-1]}")
        assert f"reconnection failed: {words}" in log_lines[-1]
        assert tls_node.password not in caplog.text + text

        relay.target = ("127.0.0.1", 5691)

        async def ready() -> bool:
            return (await _readyz(service))[0] == 200

        await wait_until(ready, "/readyz to be ready again", 45)

