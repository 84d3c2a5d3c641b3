"""A communicator type's Control Center account as an operator tool calls it (operator guide,
section 13).

Tools' calls keep the account within its limits together with the service. Before every
call (not once per run) the tool asks the broker whether a service process owns the type
(consumes its work queue):

* **a service owns it**: the call goes to that process (:class:`~.calls.RemoteCalls`),
  which makes it through its own limiter, beside its own calls;
* **none does**: the tool makes the call itself, with a client of its own whose limiter
  keeps the type's limits, and asks once more after that limiter grants the start and
  right before the request leaves: a service that started meanwhile gets the call instead.
  A new owner waits one call interval plus the request timeout before its first call
  (the previous owner's last request may still be open), so a call the tool sent just
  before the service took the type has ended by then. To call directly the tool holds
  ``<prefix>.direct.<slug>`` (an exclusive queue, released when the tool ends): a second
  tool that finds it held while no service runs is refused with :data:`IN_USE` — two
  tools, each within the limits, would together be over them.

A broker that does not answer whether a service runs is an error (:class:`~.ToolError`),
never a reason to call directly: a service may own the type all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from ..calls import DEFAULT_MODIFIED_SINCE
from ..config import CommunicatorType, Settings
from ..errors import JasperRejected
from ..jasper import JasperClient, Limiter
from ..topology import Names
from . import ToolError
from .calls import RemoteCalls, Replies, work_queue_consumers
from .reach import jasper_client

IN_USE = "ACCOUNT_IN_USE"  # another tool calls the account directly (no service runs)
OWNER_CHECK_TIMEOUT_S = 10.0

Route = Literal["owner", "direct"]
T = TypeVar("T")


class _OwnedNow(Exception):
    """A service took the type between the tool's check and its direct call."""


class _CheckingLimiter(Limiter):
    """The tool's own limiter, which asks once more, after granting a start and before the
    request leaves, whether a service owns the type now (then the call is not sent)."""

    def __init__(self, ct: CommunicatorType, owned: Callable[[], Awaitable[bool]]) -> None:
        super().__init__(ct.max_concurrency, ct.requests_per_second, count_from_send=True)
        self._owned = owned

    async def acquire(self) -> None:
        await super().acquire()
        try:
            if await self._owned():
                raise _OwnedNow
        except BaseException:
            self.discard()  # no request leaves: the start is not counted
            raise


class Account:
    """One type's calls from a tool (see the module docstring); made by
    :class:`Accounts`."""

    def __init__(self, ct: CommunicatorType, connection: AbstractConnection, names: Names,
                 replies: Callable[[], Awaitable[Replies]], say: Callable[[str], None]) -> None:
        self.ct = ct
        self.route: Route | None = None  # how the last call (or :meth:`describe`) went
        self._connection = connection
        self._names = names
        self._replies = replies
        self._say = say
        self._remote: RemoteCalls | None = None
        self._client: JasperClient | None = None
        self._lock: AbstractChannel | None = None  # the channel that holds the direct queue
        self._opening = asyncio.Lock()

    async def search_devices(
        self, page_number: int, *, page_size: int = 50,
        modified_since: str = DEFAULT_MODIFIED_SINCE, status: str | None = None,
    ) -> dict[str, Any]:
        """Search Devices: one page of the account's SIMs."""
        return await self._call(lambda calls: calls.search_devices(
            page_number, page_size=page_size, modified_since=modified_since, status=status))

    async def get_device(self, iccid: str) -> dict[str, Any]:
        """Get Device Details."""
        return await self._call(lambda calls: calls.get_device(iccid))

    async def echo(self) -> None:
        """Echo: the credentials work (the owner's, when a service owns the type)."""
        await self._call(lambda calls: calls.echo())

    async def owned(self) -> bool:
        """Whether a service process owns the type now (consumes its work queue)."""
        try:
            async with asyncio.timeout(OWNER_CHECK_TIMEOUT_S):
                return await work_queue_consumers(self._connection, self._names, self.ct) > 0
        except (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError, OSError) as exc:
            raise ToolError(
                f"cannot ask RabbitMQ whether a service owns {self.ct.name} "
                f"({type(exc).__name__}); not calling Control Center directly, since a "
                "service may own it") from None

    async def describe(self) -> str:
        """Who makes the calls now, in a line for the operator."""
        self.route = "owner" if await self.owned() else "direct"
        return self._line(self.route)

    def _line(self, route: Route) -> str:
        if route == "owner":
            return (f"{self.ct.name}: the service process that owns it makes the calls, "
                    f"within the account's limits together with its own "
                    f"({self._names.calls_queue(self.ct)})")
        return (f"{self.ct.name}: no service consumes {self._names.work_queue(self.ct)}: "
                f"calling Control Center directly within the type's limits "
                f"({self.ct.max_concurrency} at a time, {self.ct.requests_per_second:g}/s)")

    async def _call(self, call: Callable[[Any], Awaitable[T]]) -> T:
        while True:
            if await self.owned():
                self._went("owner")
                return await call(await self._remote_calls())
            client = await self._direct_client()
            try:
                result = await call(client)
            except _OwnedNow:
                continue  # a service took the type meanwhile: it makes the call
            except BaseException:
                self._went("direct")
                raise
            self._went("direct")
            return result

    def _went(self, route: Route) -> None:
        if self.route is not None and route != self.route:
            self._say(("a service now owns it: " if route == "owner"
                       else "no service owns it any more: ") + self._line(route))
            if route == "owner":
                self._remote = None  # a new owner, maybe idle: wake it with the next call
        self.route = route

    async def _remote_calls(self) -> RemoteCalls:
        if self._remote is None:
            replies = await self._replies()
            if self._remote is None:  # another call may have made it meanwhile
                self._remote = RemoteCalls(replies, self._names, self.ct)
        return self._remote

    async def _direct_client(self) -> JasperClient:
        """The tool's own client, once the type's direct queue is held (or IN_USE)."""
        async with self._opening:  # pages are asked for a few at a time
            if self._client is None:
                client = jasper_client(self.ct, limiter=_CheckingLimiter(self.ct, self.owned))
                await client.start()  # reads the API key: a ConfigError names the file
                try:
                    await self._hold_direct_queue()
                except BaseException:
                    await client.close()
                    raise
                self._client = client
            return self._client

    async def _hold_direct_queue(self) -> None:
        channel = await self._connection.channel()
        try:
            await channel.declare_queue(self._names.direct_queue(self.ct), exclusive=True)
        except aiormq.exceptions.ChannelLockedResource:
            raise JasperRejected(IN_USE, (
                f"another operator tool is calling {self.ct.name}'s account directly (no "
                "service runs), and two at once could go over its limits: run this when "
                "it has finished, or start the service, through which tools share the "
                "account")) from None
        except aiormq.exceptions.AMQPError as exc:  # refused (permissions), say
            raise ToolError(f"cannot declare {self._names.direct_queue(self.ct)}: "
                            f"{type(exc).__name__}: {exc}") from None
        self._lock = channel

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()
        lock, self._lock = self._lock, None
        if lock is not None and not lock.is_closed:  # else the broker dropped it already
            with contextlib.suppress(Exception):
                await lock.queue_delete(self._names.direct_queue(self.ct))
            with contextlib.suppress(Exception):
                await lock.close()


class Accounts:
    """Every communicator type's :class:`Account` for one tool run, sharing one reply
    queue (opened when a service is first asked to make a call)."""

    def __init__(self, connection: AbstractConnection, settings: Settings, *,
                 say: Callable[[str], None] = lambda line: None) -> None:
        self._connection = connection
        self._names = Names.from_settings(settings)
        self._say = say
        self._accounts: dict[str, Account] = {}
        self._replies: Replies | None = None
        self._opening = asyncio.Lock()

    def __getitem__(self, ct: CommunicatorType) -> Account:
        account = self._accounts.get(ct.name)
        if account is None:
            account = self._accounts[ct.name] = Account(
                ct, self._connection, self._names, self._open_replies, self._say)
        return account

    async def _open_replies(self) -> Replies:
        async with self._opening:
            if self._replies is None:
                try:
                    self._replies = await Replies.open(self._connection, self._names)
                except aiormq.exceptions.AMQPError as exc:  # refused (permissions), say
                    raise ToolError(f"cannot open a reply queue to ask the service: "
                                    f"{type(exc).__name__}: {exc}") from None
        return self._replies

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        for account in self._accounts.values():
            await account.close()
        replies, self._replies = self._replies, None
        if replies is not None:
            await replies.close()
