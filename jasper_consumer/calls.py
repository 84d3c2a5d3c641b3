"""Operator tools' Control Center calls, made by the process that owns the type (operator guide,
section 13).

A tool (``reconcile``) must keep a Control Center account within its limits together
with the running service, and must not be starved by a backlog. So the process that
owns a communicator type — the active consumer of its work queue — makes the tool's
calls through its own limiter, which gives them a share of the start slots::

    tool ──request──▶ <prefix>.calls.<slug> ──▶ owner: serve_call(client, body) ──▶ Control Center
      ▲                                                      │
      └────────── reply (to reply_to, same correlation_id) ◀─┘

* **request**: on the default exchange to ``<prefix>.calls.<slug>`` (a quorum queue whose
  messages expire after 60 s), ``reply_to`` the tool's exclusive reply queue,
  ``correlation_id`` a uuid, body ``{"op": "search_devices", "page_number": N,
  "page_size": 50, "modified_since": "...", "status": null}``, ``{"op": "get_device",
  "iccid": "..."}`` or ``{"op": "echo"}`` (``check-config --ping``);
* **reply**: ``{"ok": true, "result": <Control Center's JSON object; {} for echo>}`` or
  ``{"ok": false, "error": {"code", "http_status", "message", "retryable"}}`` (the signal's
  error shape);
  a malformed request gets code :data:`INVALID_REQUEST`;
* **wake**: after its first request for a type the tool puts one token on the type's work
  queue (header ``x-jasper-token:`` :data:`WAKE`, body ``{}``), so that an idle owner
  learns it is the owner.

This module is the wire format and the owner's side (:func:`serve_call`, which never
raises, and :class:`OwnerCalls`); the tool's side is :mod:`jasper_consumer.tools.calls`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Literal

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .edge import Acks
from .errors import ConfigError, JasperError
from .jasper import JasperClient

log = logging.getLogger(__name__)

CONSUME_RETRY_MIN_S = 1.0
CONSUME_RETRY_MAX_S = 30.0

WAKE = "wake"
INVALID_REQUEST = "INVALID_REQUEST"  # the request is not one of the shapes above
CALL_FAILED = "CALL_FAILED"  # the owner could not make the call (not Control Center's answer)
MAX_REQUEST_BYTES = 4096
DEFAULT_MODIFIED_SINCE = "2000-01-01T00:00:00Z"


# --- the wire format -----------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SearchDevicesRequest(_Request):
    op: Literal["search_devices"]
    page_number: int = Field(ge=1, le=1_000_000)
    page_size: int = Field(50, ge=1, le=50)
    modified_since: str = Field(DEFAULT_MODIFIED_SINCE,
                                pattern=r"^\d{4}-\d{2}-\d{2}T[0-9:.]+(Z|[+-]\d{2}:\d{2})?$")
    status: str | None = Field(None, pattern=r"^[A-Z_]{1,32}$")


class GetDeviceRequest(_Request):
    op: Literal["get_device"]
    iccid: str = Field(pattern=r"^[0-9]{18,22}$")


class EchoRequest(_Request):
    op: Literal["echo"]


CallRequest = Annotated[SearchDevicesRequest | GetDeviceRequest | EchoRequest,
                        Field(discriminator="op")]
_REQUEST: TypeAdapter[SearchDevicesRequest | GetDeviceRequest | EchoRequest] = TypeAdapter(
    CallRequest)


def _error_reply(code: str, message: str, *, http_status: int | None = None,
                 retryable: bool = False) -> bytes:
    return json.dumps({"ok": False, "error": {
        "code": code, "http_status": http_status, "message": message,
        "retryable": retryable}}).encode()


def _describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:3])


# --- the owner's side ----------------------------------------------------------------------


async def serve_call(client: JasperClient, body: bytes) -> bytes:
    """Run one tool request on ``client`` (through its limiter) and return the reply body.

    Never raises (cancellation aside): a malformed request, Control Center's refusal and
    a failure of the call itself all become an ``ok: false`` reply.
    """
    if len(body) > MAX_REQUEST_BYTES:
        return _error_reply(INVALID_REQUEST, f"request of {len(body)} bytes is over "
                                             f"{MAX_REQUEST_BYTES}")
    try:
        request = _REQUEST.validate_json(body)
    except ValidationError as exc:
        return _error_reply(INVALID_REQUEST, _describe(exc))
    try:
        if isinstance(request, SearchDevicesRequest):
            result = await client.search_devices(
                request.page_number, page_size=request.page_size,
                modified_since=request.modified_since, status=request.status)
        elif isinstance(request, GetDeviceRequest):
            result = await client.get_device(request.iccid)
        else:
            await client.echo()
            result = {}
    except JasperError as err:
        return json.dumps({"ok": False, "error": err.as_dict()}).encode()
    except ConfigError as err:  # an unreadable api_key_file: the message names the file
        return _error_reply(CALL_FAILED, "; ".join(err.problems), retryable=True)
    except Exception as exc:  # a bug must not take the owner's consumer down
        log.exception("a tool's call failed", extra={"fields": {
            "communicator_type": client.ct.name, "op": request.op}})
        return _error_reply(CALL_FAILED, f"the call failed in the service "
                                         f"({type(exc).__name__})", retryable=True)
    return json.dumps({"ok": True, "result": result}).encode()


def reply_message(body: bytes, correlation_id: str | None) -> aio_pika.Message:
    """The reply to publish (default exchange, routing key = the request's ``reply_to``)."""
    return aio_pika.Message(body, content_type="application/json",
                            correlation_id=correlation_id)


class OwnerCalls:
    """The owner's consumer of ``<prefix>.calls.<slug>``: one request at a time, each made
    through the type's limiter, where it waits behind at most one call of the service's
    per concurrency slot — with ``max_concurrency`` 1, a tool gets every other start, half
    the account's rate, however long the service's backlog."""

    def __init__(self, client: JasperClient, queue_name: str,
                 open_channel: Callable[[], Awaitable[AbstractChannel]], acks: Acks) -> None:
        self._client = client
        self._acks = acks
        self._queue_name = queue_name
        self._open_channel = open_channel
        self._channel: AbstractChannel | None = None
        self._retrying: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Consume the calls queue; never raises. While the queue cannot be reached (a
        majority of its cluster nodes may be down) it tries again in the
        background, 1 s doubling to 30 s: tools' calls wait, the type's own jobs do not."""
        if self._channel is not None or self._retrying is not None:
            return
        try:
            await self._consume()
        except Exception as exc:
            log.warning("cannot consume %s (%s: %s); trying again in the background",
                        self._queue_name, type(exc).__name__, exc)
            self._retrying = asyncio.create_task(self._retry(), name=f"consume {self._queue_name}")

    async def _consume(self) -> None:
        channel = await self._open_channel()
        try:
            self._channel = channel
            await channel.set_qos(prefetch_count=1)
            queue = await channel.get_queue(self._queue_name, ensure=False)
            await queue.consume(self._serve)
        except BaseException:
            self._channel = None
            with contextlib.suppress(Exception):
                await channel.close()
            raise

    async def _retry(self) -> None:
        delay = CONSUME_RETRY_MIN_S
        while True:
            await asyncio.sleep(delay)
            try:
                await self._consume()
            except Exception as exc:  # said at warning level once the wait is at its cap
                level = logging.WARNING if delay >= CONSUME_RETRY_MAX_S else logging.DEBUG
                log.log(level, "still cannot consume %s (tools' calls wait): %r",
                        self._queue_name, exc)
                delay = min(delay * 2, CONSUME_RETRY_MAX_S)
            else:
                log.info("consuming %s again", self._queue_name)
                self._retrying = None
                return

    async def _serve(self, message: AbstractIncomingMessage) -> None:
        reply = await serve_call(self._client, message.body)
        channel = self._channel
        try:
            if message.reply_to and channel is not None:
                await channel.default_exchange.publish(
                    reply_message(reply, message.correlation_id), message.reply_to)
        finally:
            await self._acks.ack(message)  # a lost reply: the tool asks again after its timeout

    async def stop(self) -> None:
        retrying, self._retrying = self._retrying, None
        if retrying is not None:
            retrying.cancel()
        channel, self._channel = self._channel, None
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()
