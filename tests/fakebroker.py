"""An in-memory stand-in for the broker as the worker sees it: queues, consumers with
prefetch, basic.get, acks, channel close returning unacked messages in order, and a
History whose publishes land on those queues. For fast unit tests of the worker's
decisions; the real broker is used by tests/integration and tests/reliability."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from typing import Any

import aiormq

from jasper_consumer.signals import Kind

_TAGS = itertools.count(1)


class Message:
    def __init__(self, body: bytes, headers: dict[str, Any] | None = None,
                 message_id: str | None = None) -> None:
        self.body = body
        self.headers = headers or {}
        self.message_id = message_id
        self.channel: Channel | None = None
        self.queue = ""
        self.delivery_tag: int | None = None  # not batched by edge.Acks
        self.acked = False
        self.priority: int | None = None

    async def ack(self, multiple: bool = False) -> None:
        channel = self.channel
        if channel is None or channel.is_closed:
            raise RuntimeError("channel closed")
        if multiple:  # every delivery of the channel up to this one
            upto = channel.unacked.index(self)
            for message in channel.unacked[:upto + 1]:
                message.acked = True
            del channel.unacked[:upto + 1]
        else:
            self.acked = True
            channel.unacked.remove(self)
        channel.broker.pump(self.queue)  # room in the prefetch window


class Queue:
    def __init__(self, broker: Broker, channel: Channel, name: str) -> None:
        self.broker, self.channel, self.name = broker, channel, name

    async def consume(self, callback: Any) -> str:
        if self.name in self.broker.unreachable:
            raise ConnectionError(f"queue {self.name} unreachable")
        tag = f"ctag-{next(_TAGS)}"
        self.broker.consumers.setdefault(self.name, []).append((self.channel, callback, tag))
        self.broker.pump(self.name)
        return tag

    async def cancel(self, tag: str) -> None:
        self.broker.consumers[self.name] = [
            c for c in self.broker.consumers.get(self.name, []) if c[2] != tag]

    async def get(self, no_ack: bool = False, fail: bool = True) -> Message | None:
        messages = self.broker.queues.setdefault(self.name, [])
        if not messages:
            return None
        return self.channel.take(messages.pop(0), self.name)


class Channel:
    def __init__(self, broker: Broker, prefetch: int | None) -> None:
        self.broker = broker
        self.prefetch = prefetch or 1000
        self.close_callbacks: set[Callable[..., None]] = set()
        self.is_closed = False
        self.unacked: list[Message] = []

    def take(self, message: Message, queue: str) -> Message:
        message.channel, message.queue, message.acked = self, queue, False
        self.unacked.append(message)
        return message

    async def get_queue(self, name: str, ensure: bool = True) -> Queue:
        return Queue(self.broker, self, name)

    async def declare_queue(self, name: str, passive: bool = False, **_: Any) -> Any:
        if passive and ".direct." in name and name not in self.broker.queues:
            raise aiormq.exceptions.ChannelNotFoundEntity(f"NOT_FOUND - no queue '{name}'")
        count = len(self.broker.queues.get(name, []))
        consumers = len(self.broker.consumers.get(name, []))
        return type("Declared", (), {"name": name, "declaration_result": type(
            "Ok", (), {"message_count": count, "consumer_count": consumers})()})()

    async def set_qos(self, prefetch_count: int) -> None:
        self.prefetch = prefetch_count

    async def get_underlay_channel(self) -> Channel:
        return self

    async def queue_declare(self, name: str, exclusive: bool = False, **_: Any) -> None:
        """An exclusive queue held by another open channel is locked (RESOURCE_LOCKED)."""
        holder = self.broker.exclusive.get(name)
        if holder is not None and holder is not self and not holder.is_closed:
            raise aiormq.exceptions.ChannelLockedResource(f"RESOURCE_LOCKED - {name}")
        if exclusive:
            self.broker.exclusive[name] = self

    async def queue_delete(self, name: str) -> None:
        if self.broker.exclusive.get(name) is self:
            del self.broker.exclusive[name]

    async def close(self) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        self.broker.close_channel(self)
        for callback in list(self.close_callbacks):
            callback(self, None)


class Broker:
    """Queues by name; the first consumer of a queue is its active consumer."""

    def __init__(self) -> None:
        self.queues: dict[str, list[Message]] = {}
        self.consumers: dict[str, list[tuple[Channel, Any, str]]] = {}
        self.unreachable: set[str] = set()
        self.exclusive: dict[str, Channel] = {}  # exclusive queues and who holds them
        self.channels: list[Channel] = []

    async def open_channel(self, prefetch: int | None = None) -> Channel:
        channel = Channel(self, prefetch)
        self.channels.append(channel)
        return channel

    def publish(self, queue: str, message: Message) -> None:
        self.queues.setdefault(queue, []).append(message)
        self.pump(queue)

    def pump(self, queue: str) -> None:
        consumers = [c for c in self.consumers.get(queue, []) if not c[0].is_closed]
        if not consumers:
            return
        channel, callback, _ = consumers[0]
        waiting = self.queues.setdefault(queue, [])
        while waiting and len(channel.unacked) < channel.prefetch:
            message = channel.take(waiting.pop(0), queue)
            asyncio.get_running_loop().create_task(callback(message))

    def close_channel(self, channel: Channel) -> None:
        """The broker returns a closed channel's unacked messages to the head, in order."""
        returned: dict[str, list[Message]] = {}
        for message in channel.unacked:
            returned.setdefault(message.queue, []).append(
                Message(message.body, message.headers, message.message_id))
        channel.unacked.clear()
        for queue, messages in returned.items():
            self.queues[queue] = messages + self.queues.get(queue, [])
        for queue in list(self.consumers):
            self.consumers[queue] = [c for c in self.consumers[queue] if c[0] is not channel]
        for queue in returned:
            self.pump(queue)


class History:
    """Records every publish and puts it on the fake broker's queues; ``hold`` keeps
    publishes waiting (an unconfirmed publish); ``fail`` makes the next ones fail."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.signals: list[tuple[str, Kind, dict[str, Any]]] = []
        self.queued: list[tuple[str, dict[str, Any]]] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.fail: Callable[[str, dict[str, Any]], bool] = lambda queue, headers: False

    async def report(self, subject: Any, kind: Kind, **fields: Any) -> None:
        await self.hold.wait()
        self.signals.append((subject.event_id, kind, fields))
        if fields.get("park_key"):
            body = json.dumps({"event_id": subject.event_id, "event_code": subject.event_code,
                               "client_id": subject.client_id,
                               "command": subject.command.value, "iccid": subject.iccid,
                               "communicator_type": subject.communicator_type}).encode()
            self.broker.publish(fields["park_key"],
                                Message(body, dict(fields.get("park_headers") or {})))

    async def final(self, job: Any, outcome: Any, **fields: Any) -> None:
        await self.hold.wait()
        self.signals.append((job.event_id, Kind(outcome.result.value), fields))
        self.signals[-1][2]["error"] = outcome.error

    async def to_queue(self, queue: str, body: bytes, message_id: Any,
                       headers: Any = None, **_: Any) -> None:
        from jasper_consumer.errors import PublishFailed

        headers = dict(headers or {})
        if self.fail(queue, headers):
            raise PublishFailed(f"refused publish to {queue}")
        self.queued.append((queue, headers))
        self.broker.publish(queue, Message(body, headers, message_id))

    async def dead_letter(self, body: bytes, reason: str, **_: Any) -> None:
        self.queued.append(("dead", {"reason": reason}))

    async def bad_job(self, body: bytes, message_id: Any, reason: str) -> None:
        self.queued.append(("dead", {"reason": reason}))
