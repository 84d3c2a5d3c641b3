"""A loopback TCP proxy between one replica and one broker node, with three modes.

* ``pass``: bytes flow both ways;
* ``blackhole``: a network partition. Nothing is read or forwarded any more (what was
  sent waits in the kernel's buffers, as on a silent network), new connections are
  accepted and then left alone. When it heals, the held connections flow again (unless
  a side gave up meanwhile: heartbeats) and those accepted during it are reset;
* ``reset``: every connection is reset (RST), and so is every new one until it heals.

The broker sees the proxy's outgoing port as the connection's ``peer_port``:
:meth:`Proxy.upstream_ports` lets the soak tell which replica a broker connection is.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

MODES = ("pass", "blackhole", "reset")


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client, self.upstream = client, upstream
        self.tasks: list[asyncio.Task[None]] = []

    @property
    def upstream_port(self) -> int | None:
        name = self.upstream.get_extra_info("sockname")
        return int(name[1]) if name else None

    def reset(self) -> None:
        for task in self.tasks:
            task.cancel()
        _rst(self.client)
        _rst(self.upstream)


class Proxy:
    """Listens on 127.0.0.1 (a free port) and forwards to ``upstream_host:upstream_port``."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode = "pass"
        self.port = 0
        self._open = asyncio.Event()
        self._open.set()
        self._links: set[_Link] = set()
        self._held: set[asyncio.StreamWriter] = set()  # accepted while blackholed
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def upstream_ports(self) -> set[int]:
        return {p for link in self._links if (p := link.upstream_port) is not None}

    def set_mode(self, mode: str) -> None:
        assert mode in MODES, mode
        self.mode = mode
        if mode == "pass":
            for writer in self._held:
                _rst(writer)
            self._held.clear()
            self._open.set()
            return
        self._open.clear()
        if mode == "reset":
            for link in list(self._links):
                link.reset()
            self._links.clear()

    async def close(self) -> None:
        self.set_mode("reset")
        self.set_mode("pass")
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reset":
            _rst(writer)
            return
        if self.mode == "blackhole":
            self._held.add(writer)
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), 10)
        except (OSError, TimeoutError):
            _rst(writer)  # the node is down: the client sees its connection refused
            return
        if self.mode != "pass":  # the fault began while connecting
            _rst(up_writer)
            _rst(writer)
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        link.tasks = [asyncio.create_task(self._pump(reader, up_writer, link)),
                      asyncio.create_task(self._pump(up_reader, writer, link))]

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    link: _Link) -> None:
        try:
            while True:
                await self._open.wait()
                data = await src.read(65536)
                if not data:
                    break
                await self._open.wait()  # read just as a partition began: it waits too
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            return
        # one side closed: close both, as the network would carry the FIN
        self._links.discard(link)
        for task in link.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        for w in (link.client, link.upstream):
            with contextlib.suppress(Exception):
                w.close()
