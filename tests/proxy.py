"""A real forward proxy for tests: Debian's ``tinyproxy``, started on a loopback port.

``make test`` puts it in ``.tools/bin`` when it is not on PATH (the Makefile's
``$(TOOLS)/tinyproxy`` rule, from Debian's ``tinyproxy-bin`` package); where it could not
be installed, the ``forward_proxy`` fixture skips the test and says so.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tinyproxy_binary() -> str | None:
    """tinyproxy from $TINYPROXY, PATH or .tools/bin; None where none is installed."""
    for candidate in (os.environ.get("TINYPROXY"), shutil.which("tinyproxy"),
                      str(REPO / ".tools" / "bin" / "tinyproxy")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


class Tinyproxy:
    """One tinyproxy process; ``url`` has no credentials (add them in the test)."""

    def __init__(self, binary: str, workdir: Path, *, credentials: tuple[str, str] | None,
                 connect_ports: list[int] | None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"tinyproxy-{self.port}.log"
        conf = workdir / f"tinyproxy-{self.port}.conf"
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Timeout 30", "MaxClients 50",
                 "Allow 127.0.0.1", f"LogFile \"{self.log}\"", "LogLevel Connect"]
        if credentials is not None:
            lines.append(f"BasicAuth {credentials[0]} {credentials[1]}")
        lines += [f"ConnectPort {p}" for p in connect_ports or []]
        conf.write_text("\n".join(lines) + "\n")
        self._popen = subprocess.Popen([binary, "-d", "-c", str(conf)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:  # a bounded wait for the port to accept
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self._popen.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"tinyproxy did not start (see {self.log})") from None
                time.sleep(0.05)

    def tunnels(self, port: int) -> int:
        """CONNECT requests the proxy took for 127.0.0.1:``port``."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return len(re.findall(rf"Request \(file descriptor \d+\): CONNECT 127\.0\.0\.1:{port} ",
                              text))

    def stop(self) -> None:
        if self._popen.poll() is None:
            self._popen.terminate()
            self._popen.wait(10)


StartProxy = Callable[..., Tinyproxy]


@pytest.fixture
def forward_proxy(tmp_path: Path) -> Iterator[StartProxy]:
    """Start tinyproxies: ``forward_proxy(credentials=("user", "pw"), connect_ports=[443])``."""
    binary = tinyproxy_binary()
    if binary is None:
        pytest.skip("tinyproxy is not installed ($TINYPROXY, PATH, .tools/bin): `make test` "
                    "extracts it from Debian's tinyproxy-bin package, which failed here")
    started: list[Tinyproxy] = []

    def start(*, credentials: tuple[str, str] | None = None,
              connect_ports: list[int] | None = None) -> Tinyproxy:
        proxy = Tinyproxy(binary, tmp_path, credentials=credentials, connect_ports=connect_ports)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
