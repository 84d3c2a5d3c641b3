"""The service's replicas as the soak runs them: each a subprocess behind its own proxies.

A replica keeps its index, HTTP port, proxies (one per broker node) and log file across
restarts; each start is a new process (its pid is how the simulator's request log names
it). The soak reads ``/readyz`` and ``/metrics`` of each one; the exits it caused itself
(kill -9, SIGTERM) are expected, any other is recorded as a replica exiting by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.reliability.conftest import Proc, free_port, wait_until

from .proxy import Proxy

READY_BOUND_S = 60.0
# The AMQP heartbeat the replicas ask for: a partition (blackhole) longer than about two
# of these makes both sides drop the connection within the soak's time scale.
HEARTBEAT_S = 10


def listening_port() -> int:
    """A free port for a replica's HTTP server, below the kernel's ephemeral range: the
    soak's proxies and every client connection take ports from that range (``bind`` to 0),
    and one of them took a replica's port between ``free_port()`` and the replica's start
    (the replica then stopped: address already in use)."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    pick = random.Random()
    for _ in range(200):
        port = pick.randrange(max(1024, low - 12_000), low)
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("0.0.0.0", port))
            return port
    return free_port()


class Replica:
    def __init__(self, index: int, workdir: Path, config: dict[str, Any],
                 proxies: list[Proxy]) -> None:
        self.index = index
        self.port = listening_port()
        self.proxies = proxies
        self.log_path = workdir / f"replica-{index}.log"
        self.config_path = workdir / f"replica-{index}.yaml"
        urls = [f"amqp://guest:guest@127.0.0.1:{p.port}/?heartbeat={HEARTBEAT_S}"
                for p in proxies]
        self.config_path.write_text(yaml.safe_dump(dict(config, amqp_url=urls,
                                                        http_port=self.port)))
        self.proc: Proc | None = None
        self.pids: list[int] = []
        self.expected_exit = False  # the soak is stopping or killing it
        self.busy = False  # a fault of the soak is under way on it
        self.procs: list[Proc] = []

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive

    @property
    def pid(self) -> int | None:
        return self.proc.popen.pid if self.proc is not None else None

    def start(self) -> int:
        with self.log_path.open("a") as log:
            log.write(f"=== chaos: replica {self.index} starts at {time.monotonic():.3f}\n")
        self.proc = Proc([sys.executable, "-m", "jasper_consumer", "run", "--config",
                          str(self.config_path)], self.log_path)
        self.procs.append(self.proc)
        self.pids.append(self.proc.popen.pid)
        self.expected_exit = False
        return self.proc.popen.pid

    async def wait_ready(self, http: aiohttp.ClientSession,
                         bound_s: float = READY_BOUND_S) -> None:
        async def ready() -> bool:
            if not self.alive:
                raise AssertionError(f"replica {self.index} exited while starting")
            return await self.ready(http) is True

        await wait_until(ready, f"replica {self.index} to be ready", bound_s, 0.2)

    async def ready(self, http: aiohttp.ClientSession) -> bool | None:
        """``/readyz``: True, False, or None when it does not answer."""
        return (await self.probe(http))[0]

    async def probe(self, http: aiohttp.ClientSession) -> tuple[bool | None, str]:
        """``/readyz``: ready (None when it does not answer), and what it said."""
        try:
            async with http.get(f"http://127.0.0.1:{self.port}/readyz",
                                timeout=aiohttp.ClientTimeout(total=2)) as resp:
                return resp.status == 200, f"{resp.status} {(await resp.text())[:200]}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return None, f"no answer ({type(exc).__name__})"

    async def communicator_up(self, http: aiohttp.ClientSession) -> dict[str, float] | None:
        """``jasper_communicator_up`` by type from ``/metrics``, None when unreadable."""
        try:
            async with http.get(f"http://127.0.0.1:{self.port}/metrics",
                                timeout=aiohttp.ClientTimeout(total=2)) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None
        up: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            if family.name == "jasper_communicator_up":
                for sample in family.samples:
                    up[sample.labels.get("communicator_type", "")] = float(sample.value)
        return up

    def kill9(self) -> None:
        assert self.proc is not None
        self.expected_exit = True
        self.proc.popen.send_signal(signal.SIGKILL)

    async def sigterm(self, bound_s: float) -> int | None:
        """SIGTERM, then the exit code; None (and kill -9) if it did not end in ``bound_s``."""
        assert self.proc is not None
        self.expected_exit = True
        popen = self.proc.popen
        popen.send_signal(signal.SIGTERM)
        try:
            await wait_until(lambda: popen.poll() is not None,
                             f"replica {self.index} to exit after SIGTERM", bound_s, 0.05)
        except AssertionError:
            popen.kill()
            await asyncio.to_thread(popen.wait, 10)
            return None
        return popen.returncode

    async def wait_exit(self) -> None:
        if self.proc is not None:
            await asyncio.to_thread(self.proc.popen.wait, 10)

    def close(self) -> None:
        for proc in self.procs:
            proc.close()
