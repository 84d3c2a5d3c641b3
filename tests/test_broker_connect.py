"""Connecting to RabbitMQ when nodes misbehave, without a broker: node rotation, and
SIGTERM while start-up is stuck in a connection attempt (the service as a subprocess)."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from yarl import URL

from jasper_consumer.broker import ClusterConnection
from jasper_consumer.errors import BrokerUnavailable

from .netfaults import Silent, dropping_syns, syn_sent_to
from .reliability.conftest import Proc, free_port, wait_until

NODES = [f"amqp://guest:guest@127.0.0.{n}:5672/" for n in (1, 2, 3)]
SIM_URL = "http://127.0.0.1:9/rws/api/v1"


async def test_rotation_after_a_start_on_node_1_visits_every_node():
    """Started on the second node, reconnection attempts go to every node in turn."""
    connection = ClusterConnection(URL(NODES[1]), nodes=NODES)
    connection.start_at(1)

    visited = [str(connection.url) for _ in range(4)]

    assert visited == [NODES[1], NODES[2], NODES[0], NODES[1]]


async def test_a_new_password_applies_to_every_node():
    """update_secret's new password (set through ``url``) is used for every node."""
    connection = ClusterConnection(URL(NODES[0]), nodes=NODES)
    connection.start_at(0)

    connection.url = URL(NODES[0]).with_password("rotated")

    assert [URL(connection.url).password for _ in range(3)] == ["rotated"] * 3
    assert [URL(connection.url).host for _ in range(3)] == ["127.0.0.1", "127.0.0.2",
                                                            "127.0.0.3"]


def _config(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(f"""\
amqp_url: amqp://guest:guest@127.0.0.1:{port}/
http_port: 0
communicator_types:
  - {{name: Type A, server_address: "{SIM_URL}", username: a, api_key: ka}}
""")
    return config


async def _sigterm_exits_0(tmp_path: Path, port: int, attempting: Callable[[], bool],
                           what: str) -> None:
    service = Proc([sys.executable, "-m", "jasper_consumer", "run", "--config",
                    str(_config(tmp_path, port))], tmp_path / "service.log")
    try:
        await wait_until(lambda: attempting() or not service.alive, what, 30)
        assert service.alive, f"exited {service.popen.returncode}: {service.output()[-2000:]}"
        service.popen.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        await wait_until(lambda: not service.alive, "the exit after SIGTERM", 10)
        print(f"{what}: SIGTERM -> exit {service.popen.returncode} after "
              f"{time.monotonic() - sent:.2f} s")
    except AssertionError as exc:
        state = "still running" if service.alive else f"exited {service.popen.returncode}"
        raise AssertionError(f"{exc}; {state}; log: {service.output()[-1500:]}") from None
    finally:
        service.close()
    assert service.popen.returncode == 0, service.output()[-2000:]
    assert "Traceback" not in service.output(), service.output()[-2000:]


async def test_sigterm_while_connecting_to_a_node_that_drops_packets_exits_0(tmp_path: Path):
    """SIGTERM while start-up waits on a node that drops SYNs ends the process with 0 at once."""
    with dropping_syns() as (port, fillers):
        await _sigterm_exits_0(tmp_path, port, lambda: syn_sent_to(port, fillers) > 0,
                               "a SYN from the service to the silent port")


async def test_sigterm_while_a_handshake_stalls_exits_0(tmp_path: Path):
    """SIGTERM while start-up waits on a node that accepts and never answers ends the
    process with 0 at once."""
    async with Silent() as silent:
        await _sigterm_exits_0(tmp_path, silent.port, lambda: silent.accepted > 0,
                               "the service's connection to the silent port")


@pytest.mark.parametrize("kind", ["drops SYNs", "accepts, never answers"])
async def test_a_connection_attempt_ends_within_its_bound(kind: str):
    """One attempt to a node that does not answer fails within the 5 s bound, and the
    failure says so in words."""
    from jasper_consumer import broker

    async def attempt(port: int) -> tuple[float, str]:
        started = time.monotonic()
        with pytest.raises(OSError, match="answer") as failed:  # BrokerUnavailable is one
            await broker.connect_once([f"amqp://guest:secret-pw@127.0.0.1:{port}/"])
        return time.monotonic() - started, str(failed.value)

    if kind == "drops SYNs":
        with dropping_syns() as (port, _):
            took, words = await attempt(port)
    else:
        async with Silent() as silent:
            port = silent.port
            took, words = await attempt(port)
    print(f"{kind}: failed after {took:.2f} s: {words}")
    assert took < 6
    assert words == f"RabbitMQ at 127.0.0.1:{port} did not answer within 5 s"


@pytest.mark.parametrize(("url", "words"), [
    ("amqp://guest:Secret-pw@127.0.0.1:{closed}/",
     "RabbitMQ at 127.0.0.1:{closed} refused the connection (nothing listens on that port?)"),
    ("amqp://guest:Secret-pw@rabbit.invalid:5672/",
     "RabbitMQ at rabbit.invalid:5672 cannot be found: DNS lookup of the host name failed"),
    ("amqps://guest:Secret-pw@127.0.0.1:{closed}/?cafile=/nonexistent/ca.pem",
     "RabbitMQ at 127.0.0.1:{closed} cannot be reached: a TLS file of amqp_url (cafile, "
     "certfile, keyfile) cannot be read: No such file or directory"),
], ids=["refused", "DNS", "TLS file gone"])
async def test_a_failed_attempt_is_said_in_words(url: str, words: str):
    """Refused, unknown host, a TLS file gone: the node named, what failed in words, and
    never the password."""
    from jasper_consumer import broker

    closed = free_port()
    with pytest.raises(BrokerUnavailable) as failed:
        await broker.connect_once([url.format(closed=closed)])

    assert str(failed.value) == words.format(closed=closed)
