"""Network faults on loopback, for connection tests: a port that drops SYNs, a port that
accepts and never says a word, and a TCP relay whose target can change and whose
connections can be cut. No root, no iptables.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path


def syn_sent_to(port: int, exclude: set[int]) -> int:
    """Sockets on this host in SYN_SENT towards 127.0.0.1:``port`` (from /proc/net/tcp),
    not counting those whose local port is in ``exclude``."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if state == "02" and int(remote.split(":")[1], 16) == port \
                and int(local.split(":")[1], 16) not in exclude:
            count += 1
    return count


@contextlib.contextmanager
def dropping_syns() -> Iterator[tuple[int, set[int]]]:
    """A loopback port whose SYNs go unanswered, as behind a firewall that drops packets:
    a listening socket that never accepts, its backlog filled. Yields ``(port, the filler
    sockets' local ports)``."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        yield port, {int(f.getsockname()[1]) for f in fillers}
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


class Silent:
    """A loopback port that accepts connections and never sends a byte (a stalled TLS or
    AMQP handshake); ``accepted`` counts them."""

    def __init__(self) -> None:
        self.accepted = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Silent:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def _accept(self, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()


class Relay:
    """A TCP relay on 127.0.0.1 (or ``host``) to ``target``; :meth:`cut` drops every
    connection through it, and ``target`` may be changed for the next ones."""

    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.target = target
        self.host = host
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    def cut(self) -> None:
        """Drop every connection through the relay (the far ends see a reset or EOF)."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self._server.wait_closed()
