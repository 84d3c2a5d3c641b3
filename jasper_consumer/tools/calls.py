"""A tool's side of the calls that the process owning a type makes for it (operator guide,
section 13).

The wire format and the owner's side are in :mod:`jasper_consumer.calls`. Here:

* :class:`Replies` — the tool's exclusive reply queue ``<prefix>.reply.<random>`` and the
  requests waiting for their reply;
* :class:`RemoteCalls` — one type's calls, sent to ``<prefix>.calls.<slug>`` for the
  owner to make; after the first, a wake token on the type's work queue;
* :func:`error_from_reply` — the :class:`~jasper_consumer.errors.JasperError` an error
  reply stands for;
* :func:`work_queue_consumers` — whether a service owns the type (when none does, the
  tool calls Control Center itself: :mod:`.account` decides, call by call);
* :class:`AccountCalls` — the calls reconcile makes of an account.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, Protocol

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from .. import errors
from ..calls import DEFAULT_MODIFIED_SINCE, WAKE
from ..config import CommunicatorType
from ..errors import (
    PAUSE_CODES,
    CommunicatorMisconfigured,
    JasperError,
    JasperRejected,
    JasperRetryable,
)
from ..topology import CALLS_TTL_MS, TOKEN_HEADER, Names

NO_REPLY = "NO_REPLY"  # the tool heard nothing back in time


class AccountCalls(Protocol):
    """The calls reconcile makes of one account (:class:`~.account.Account` makes them)."""

    async def search_devices(
        self, page_number: int, *, page_size: int = 50,
        modified_since: str = DEFAULT_MODIFIED_SINCE, status: str | None = None,
    ) -> dict[str, Any]: ...

    async def get_device(self, iccid: str) -> dict[str, Any]: ...


def error_from_reply(error: Any) -> JasperError:
    """The :class:`JasperError` an ``ok: false`` reply stands for."""
    if not isinstance(error, dict):
        return JasperRejected(errors.UNEXPECTED_RESPONSE, "malformed reply from the service")
    code = str(error.get("code") or errors.UNEXPECTED_RESPONSE)
    message = str(error.get("message") or code)
    status = error.get("http_status")
    http_status = status if isinstance(status, int) and not isinstance(status, bool) else None
    if code in PAUSE_CODES or code == errors.UNAUTHORIZED:
        return CommunicatorMisconfigured(code, message, http_status)
    if error.get("retryable") is True:
        return JasperRetryable(code, message, http_status)
    return JasperRejected(code, message, http_status)


async def work_queue_consumers(connection: AbstractConnection, names: Names,
                               ct: CommunicatorType) -> int:
    """How many consumers the type's work queue has (0 also when it does not exist)."""
    channel = await connection.channel()  # a failed passive declare closes its channel
    try:
        queue = await channel.declare_queue(names.work_queue(ct), passive=True)
        count = queue.declaration_result.consumer_count
    except aiormq.exceptions.ChannelNotFoundEntity:
        return 0
    finally:
        if not channel.is_closed:
            await channel.close()
    return int(count or 0)


class Replies:
    """A tool's exclusive reply queue, and the requests waiting for their reply."""

    def __init__(self, channel: AbstractChannel, queue_name: str) -> None:
        self.channel = channel
        self.queue_name = queue_name
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}

    @classmethod
    async def open(cls, connection: AbstractConnection, names: Names) -> Replies:
        """Named ``<prefix>.reply.<random>``, like every queue of the deployment: the broker
        user's permissions cover ``<prefix>.*`` only (operator guide §10), not ``amq.gen-*``."""
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await channel.declare_queue(names.reply_queue(), exclusive=True,
                                            auto_delete=True)
        replies = cls(channel, queue.name)
        await queue.consume(replies._on_reply, no_ack=True)
        return replies

    async def close(self) -> None:
        for future in self._waiting.values():
            future.cancel()
        if not self.channel.is_closed:
            await self.channel.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._waiting.get(message.correlation_id or "")
        if future is None or future.done():
            return  # a reply that came after its request timed out
        try:
            reply = json.loads(message.body)
        except (ValueError, RecursionError):
            reply = None
        future.set_result(reply if isinstance(reply, dict) else {"ok": False, "error": None})

    async def publish(self, routing_key: str, body: bytes, **properties: Any) -> None:
        """Publish to the default exchange with confirms; an unroutable one raises."""
        await self.channel.default_exchange.publish(
            aio_pika.Message(body, content_type="application/json", **properties),
            routing_key=routing_key, mandatory=True)

    async def send(self, routing_key: str,
                   body: dict[str, Any]) -> tuple[str, asyncio.Future[dict[str, Any]]]:
        """Publish a request; return its correlation id and the future of its reply
        (:meth:`forget` it when done waiting)."""
        correlation_id = str(uuid.uuid4())
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = future
        try:
            await self.publish(routing_key, json.dumps(body).encode(),
                               correlation_id=correlation_id, reply_to=self.queue_name)
        except BaseException:
            self.forget(correlation_id)
            raise
        return correlation_id, future

    def forget(self, correlation_id: str) -> None:
        self._waiting.pop(correlation_id, None)


class RemoteCalls:
    """One type's calls, made by the process that owns the type (see
    :mod:`jasper_consumer.calls`)."""

    def __init__(self, replies: Replies, names: Names, ct: CommunicatorType) -> None:
        self.replies = replies
        self.ct = ct
        self.calls_queue = names.calls_queue(ct)
        self.work_queue = names.work_queue(ct)
        # Long enough for a request to wait out the queue's TTL and then the call itself.
        self.timeout_s = CALLS_TTL_MS / 1000 + ct.request_timeout_seconds + 5.0
        self._woken = False

    async def search_devices(
        self, page_number: int, *, page_size: int = 50,
        modified_since: str = DEFAULT_MODIFIED_SINCE, status: str | None = None,
    ) -> dict[str, Any]:
        return await self._call({"op": "search_devices", "page_number": page_number,
                                 "page_size": page_size, "modified_since": modified_since,
                                 "status": status})

    async def get_device(self, iccid: str) -> dict[str, Any]:
        return await self._call({"op": "get_device", "iccid": iccid})

    async def echo(self) -> None:
        await self._call({"op": "echo"})

    async def _call(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            correlation_id, reply_future = await self.replies.send(self.calls_queue, body)
        except aio_pika.exceptions.DeliveryError:
            raise JasperRejected(NO_REPLY, (
                f"the broker has no queue {self.calls_queue}: the running service is a "
                "version that does not serve operator tools' calls")) from None
        try:
            if not self._woken:
                self._woken = True
                await self._wake()
            async with asyncio.timeout(self.timeout_s):
                reply = await reply_future
        except TimeoutError:  # a lost reply (the owner failed over, say): worth asking again
            raise JasperRetryable(NO_REPLY, (
                f"the service process that owns {self.ct.name} did not answer within "
                f"{self.timeout_s:.0f} s; is it running a version that serves "
                f"{self.calls_queue}?")) from None
        finally:
            self.replies.forget(correlation_id)
        if reply.get("ok") is True and isinstance(reply.get("result"), dict):
            result: dict[str, Any] = reply["result"]
            return result
        raise error_from_reply(reply.get("error"))

    async def _wake(self) -> None:
        """One token on the work queue, so that an idle owner learns it owns the type."""
        await self.replies.publish(
            self.work_queue, b"{}", headers={TOKEN_HEADER: WAKE},
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
