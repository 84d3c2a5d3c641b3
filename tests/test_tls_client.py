"""The Control Center client over HTTPS against the simulator (real sockets, a test PKI):
``ca_file`` trusted, and each failed verification in words that pause the type."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from jasper_consumer.config import CommunicatorType
from jasper_consumer.errors import (
    CERTIFICATE_NOT_TRUSTED,
    CertificateNotTrusted,
    JasperError,
    JasperRejected,
    JasperUnreachable,
)
from jasper_consumer.jasper import JasperClient
from jasper_consumer.metrics import Metrics
from jasper_consumer.simulator import Simulator, server_context

from .pki import Pki, pki  # noqa: F401  (the fixture)
from .reliability.conftest import Proc, free_port, wait_until

HttpsSim = Callable[[Path, Path], Awaitable[Simulator]]


@pytest.fixture
async def https_sim() -> AsyncIterator[HttpsSim]:
    """Start simulators over HTTPS with a given certificate and key."""
    started: list[Simulator] = []

    async def start(cert: Path, key: Path) -> Simulator:
        sim = Simulator()
        sim.add_account("nz", "nz-key")
        await sim.start(tls_context=server_context(cert, key))
        started.append(sim)
        return sim

    yield start
    for sim in started:
        await sim.stop()


def communicator(base_url: str, **extra: object) -> CommunicatorType:
    return CommunicatorType.model_validate({
        "name": "M2MOne NZ", "server_address": base_url, "username": "nz", "api_key": "nz-key",
        "request_timeout_seconds": 5, **extra})


async def echo(ct: CommunicatorType) -> JasperError | None:
    async with JasperClient(ct, Metrics(CollectorRegistry())) as client:
        try:
            await client.echo()
        except JasperError as err:
            return err
    return None


async def test_echo_passes_with_the_ca_in_ca_file(https_sim: HttpsSim, pki: Pki):  # noqa: F811
    """With ca_file naming the CA that signed the simulator's certificate, Echo passes."""
    sim = await https_sim(pki.server_cert, pki.server_key)

    assert sim.base_url.startswith("https://127.0.0.1:")
    assert await echo(communicator(sim.base_url, ca_file=str(pki.ca))) is None
    assert [r.path for r in sim.requests] == ["/rws/api/v1/echo/jasper-consumer"]


@pytest.mark.parametrize(("cert", "ca", "words"), [
    ("server", None, "signed by an unknown CA"),
    ("server", "other_ca", "signed by an unknown CA"),
    ("wrong_name", "ca", "issued for another host name, not '127.0.0.1'"),
    ("expired", "ca", "expired"),
], ids=["system CAs", "another CA", "host name", "expired"])
async def test_a_certificate_that_does_not_verify_pauses_in_words(
        https_sim: HttpsSim, pki: Pki, cert: str, ca: str | None, words: str):  # noqa: F811
    """An unknown CA, another host name or an expired certificate is CERTIFICATE_NOT_TRUSTED,
    a pause reason that says which, with what to fix; no request reaches the simulator."""
    sim = await https_sim(getattr(pki, f"{cert}_cert"), getattr(pki, f"{cert}_key"))
    extra = {"ca_file": str(getattr(pki, ca))} if ca else {}

    err = await echo(communicator(sim.base_url, **extra))

    print(f"{cert} / {ca}: {err}")
    assert isinstance(err, CertificateNotTrusted)
    assert err.pauses_type
    assert err.code == CERTIFICATE_NOT_TRUSTED
    assert err.message.startswith(
        f"certificate not trusted: the TLS certificate 127.0.0.1 presented is {words}")
    assert sim.requests == []


async def test_a_replaced_ca_file_applies_at_the_next_probe(
        https_sim: HttpsSim, pki: Pki, tmp_path: Path):  # noqa: F811
    """The probe re-reads ca_file: once it holds the right CA, Echo passes, no restart."""
    sim = await https_sim(pki.server_cert, pki.server_key)
    ca_file = tmp_path / "centre-ca.pem"
    ca_file.write_bytes(pki.other_ca.read_bytes())
    client = JasperClient(communicator(sim.base_url, ca_file=str(ca_file)),
                          Metrics(CollectorRegistry()))
    await client.start()
    try:
        with pytest.raises(CertificateNotTrusted):
            await client.probe()
        ca_file.write_bytes(pki.ca.read_bytes())
        await client.probe()
        ca_file.write_text("gone\n")
        with pytest.raises(JasperRejected, match="holds no usable CA certificate"):
            await client.probe()
    finally:
        await client.close()


async def test_plain_http_to_an_https_port_is_an_outage_in_words(
        https_sim: HttpsSim, pki: Pki):  # noqa: F811
    """https:// to a port that speaks plain HTTP says the other end does not speak TLS."""
    plain = Simulator()
    plain.add_account("nz", "nz-key")
    base = await plain.start()
    try:
        err = await echo(communicator(base.replace("http://", "https://")))
    finally:
        await plain.stop()

    assert isinstance(err, JasperUnreachable)
    assert err.message == ("TLS handshake with 127.0.0.1 failed: the other end does not speak "
                           "TLS on that port (wrong version number)")


async def test_the_simulator_command_serves_https(tmp_path: Path, pki: Pki):  # noqa: F811
    """``jasper-consumer simulator --tls-cert --tls-key`` serves the API over HTTPS."""
    port = free_port()
    sim = Proc([sys.executable, "-m", "jasper_consumer", "simulator", "--port", str(port),
                "--account", "nz:nz-key", "--tls-cert", str(pki.server_cert),
                "--tls-key", str(pki.server_key)], tmp_path / "sim.log")
    try:
        await wait_until(lambda: "Jasper simulator at" in sim.output() or not sim.alive,
                         "the simulator to listen", 20)
        assert f"Jasper simulator at https://127.0.0.1:{port}/rws/api/v1" in sim.output()
        base = f"https://127.0.0.1:{port}/rws/api/v1"
        assert await echo(communicator(base, ca_file=str(pki.ca))) is None
    finally:
        sim.popen.send_signal(signal.SIGINT)
        await asyncio.to_thread(sim.popen.wait, 10)
        sim.close()


def test_the_simulator_command_wants_both_tls_files(tmp_path: Path, pki: Pki):  # noqa: F811
    """--tls-cert without --tls-key, or files that do not load, are refused with exit 2."""
    def run(*args: str) -> tuple[int, str]:
        done = subprocess.run([sys.executable, "-m", "jasper_consumer", "simulator",
                               "--account", "a:k", *args], capture_output=True, text=True,
                              timeout=60, env={**os.environ})
        return done.returncode, done.stderr

    code, err = run("--tls-cert", str(pki.server_cert))
    assert (code, "--tls-cert and --tls-key go together" in err) == (2, True), err

    code, err = run("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key))
    assert code == 2, err
    assert re.search(r"simulator: --tls-cert/--tls-key cannot be used: the key is not the "
                     r"certificate's", err), err
