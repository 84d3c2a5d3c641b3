"""The Control Center client through a real forward proxy (tinyproxy, HTTP CONNECT) to the
simulator over HTTPS: the proxy from the config or the environment, proxy credentials,
and each refusal in words that never show the credentials."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from jasper_consumer.config import CommunicatorType, Settings, parse_settings
from jasper_consumer.errors import PROXY_REFUSED, JasperError, JasperUnreachable, ProxyRefused
from jasper_consumer.jasper import JasperClient
from jasper_consumer.metrics import Metrics
from jasper_consumer.simulator import Simulator, server_context

from .pki import Pki, pki  # noqa: F401  (the fixture)
from .proxy import StartProxy, forward_proxy  # noqa: F401  (the fixture)
from .reliability.conftest import free_port

USER, PASSWORD = "centre-user", "Pr0xy-Secret-pw"


@pytest.fixture
async def https_sim(pki: Pki) -> AsyncIterator[Simulator]:  # noqa: F811
    sim = Simulator()
    sim.add_account("nz", "nz-key")
    await sim.start(tls_context=server_context(pki.server_cert, pki.server_key))
    yield sim
    await sim.stop()


def settings(sim: Simulator, pki: Pki, env: dict[str, str] | None = None,  # noqa: F811
             **extra: Any) -> Settings:
    return parse_settings({"communicator_types": [{
        "name": "M2MOne NZ", "server_address": sim.base_url, "username": "nz",
        "api_key": "nz-key", "ca_file": str(pki.ca), "request_timeout_seconds": 5, **extra}]},
        env or {})


async def echo(ct: CommunicatorType, metrics: Metrics | None = None) -> JasperError | None:
    async with JasperClient(ct, metrics or Metrics(CollectorRegistry())) as client:
        try:
            await client.echo()
        except JasperError as err:
            return err
    return None


async def test_echo_goes_through_the_configured_proxy(
        https_sim: Simulator, pki: Pki, forward_proxy: StartProxy):  # noqa: F811
    """With ``proxy`` set, the call is tunnelled through it (CONNECT) and passes."""
    proxy = forward_proxy()

    err = await echo(settings(https_sim, pki, proxy=proxy.url).communicator_types[0])

    assert err is None
    assert proxy.tunnels(https_sim.port) == 1
    assert len(https_sim.requests) == 1


async def test_echo_goes_through_https_proxy_from_the_environment(
        https_sim: Simulator, pki: Pki, forward_proxy: StartProxy):  # noqa: F811
    """Without ``proxy``, HTTPS_PROXY from the environment carries the call."""
    proxy = forward_proxy()
    ct = settings(https_sim, pki, {"HTTPS_PROXY": proxy.url}).communicator_types[0]

    assert await echo(ct) is None
    assert proxy.tunnels(https_sim.port) == 1


async def test_no_proxy_sends_the_call_direct(
        https_sim: Simulator, pki: Pki, forward_proxy: StartProxy):  # noqa: F811
    """A host listed in NO_PROXY is called directly, not through HTTPS_PROXY."""
    proxy = forward_proxy()
    ct = settings(https_sim, pki, {"HTTPS_PROXY": proxy.url,
                                   "NO_PROXY": "localhost,127.0.0.1"}).communicator_types[0]

    assert await echo(ct) is None
    assert proxy.tunnels(https_sim.port) == 0
    assert len(https_sim.requests) == 1


async def test_proxy_credentials_are_sent(
        https_sim: Simulator, pki: Pki, forward_proxy: StartProxy):  # noqa: F811
    """Credentials in the proxy URL are sent to the proxy, and the call passes."""
    proxy = forward_proxy(credentials=(USER, PASSWORD))
    url = proxy.url.replace("http://", f"http://{USER}:{PASSWORD}@")

    assert await echo(settings(https_sim, pki, proxy=url).communicator_types[0]) is None
    assert proxy.tunnels(https_sim.port) == 1


@pytest.mark.parametrize("given", [None, "wrong"], ids=["no credentials", "wrong password"])
async def test_a_proxy_asking_for_credentials_pauses_in_words(
        https_sim: Simulator, pki: Pki, forward_proxy: StartProxy,  # noqa: F811
        caplog: pytest.LogCaptureFixture, given: str | None):
    """A 407 (tinyproxy answers wrong credentials with 401) is PROXY_REFUSED, a pause
    reason saying what is missing; the credentials appear in no message, log or metric."""
    proxy = forward_proxy(credentials=(USER, PASSWORD))
    sent = f"{USER}:{PASSWORD}-{given}@" if given else ""
    metrics = Metrics(CollectorRegistry())
    caplog.set_level(logging.DEBUG)

    err = await echo(settings(https_sim, pki, proxy=proxy.url.replace(
        "http://", f"http://{sent}")).communicator_types[0], metrics)

    print(f"{given}: {err}")
    assert isinstance(err, ProxyRefused)
    status, phrase = (401, "Unauthorized") if given else (407, "Proxy Authentication Required")
    assert (err.code, err.http_status, err.pauses_type) == (PROXY_REFUSED, status, True)
    asks = "refused the proxy credentials" if given else "asks for credentials, and none are set"
    assert err.message == (
        f"proxy refused: {proxy.url} {asks} (HTTP {status} {phrase}); set them in proxy as "
        "http://user:password@host:port")
    assert https_sim.requests == []
    exposed = [str(err), caplog.text, generate_latest(metrics.registry).decode()]
    assert not [text for text in exposed if PASSWORD in text]


async def test_a_proxy_forbidding_the_port_pauses_in_words(
        https_sim: Simulator, pki: Pki, forward_proxy: StartProxy):  # noqa: F811
    """A proxy whose rules refuse the CONNECT (403) is PROXY_REFUSED, naming the host."""
    proxy = forward_proxy(connect_ports=[443])

    err = await echo(settings(https_sim, pki, proxy=proxy.url).communicator_types[0])

    assert isinstance(err, ProxyRefused)
    assert err.message == (f"proxy refused: {proxy.url} does not allow connections to "
                           "127.0.0.1 (HTTP 403 Forbidden); ask for the host and port to be "
                           "allowed")


async def test_a_proxy_that_cannot_reach_control_center_is_an_outage(
        pki: Pki, forward_proxy: StartProxy):  # noqa: F811
    """The proxy answering that it could not connect is a retryable outage, in words."""
    proxy = forward_proxy()
    closed = free_port()
    ct = CommunicatorType.model_validate({
        "name": "M2MOne NZ", "server_address": f"https://127.0.0.1:{closed}/rws/api/v1",
        "username": "nz", "api_key": "k", "proxy": proxy.url, "ca_file": str(pki.ca)})

    err = await echo(ct)

    assert isinstance(err, JasperUnreachable)
    assert err.message == (f"the proxy {proxy.url} could not reach 127.0.0.1 (it answered "
                           "HTTP 500)")


async def test_a_proxy_that_is_down_is_an_outage_naming_it(https_sim: Simulator,
                                                           pki: Pki):  # noqa: F811
    """No proxy listening: a retryable outage that names the proxy, not Control Center."""
    down = f"http://{USER}:{PASSWORD}@127.0.0.1:{free_port()}"

    err = await echo(settings(https_sim, pki, proxy=down).communicator_types[0])

    assert isinstance(err, JasperUnreachable)
    assert err.message.startswith("cannot connect to the proxy http://127.0.0.1:")
    assert err.message.endswith(": connection refused")
    assert PASSWORD not in err.message
