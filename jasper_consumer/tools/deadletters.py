"""The dead-letter queue ``<prefix>.dead``: list what is there, replay what can be replayed.

Three kinds of message end up there (docs/asyncapi.yaml; operator guide, section 5):

* **unreadable input** (router): the original bytes, the reason in ``x-jasper-error``;
* **RETRIES_EXHAUSTED copies** (worker): the event as a producer publishes it,
  ``message_id`` = event id, the last error's code in ``x-jasper-last-error``;
* messages the **broker** dead-lettered after ``delivery_limit`` deliveries (the only
  reason the service's queues dead-letter for): no ``x-jasper-error``; the body is an event
  (from ``.events``) or a job (from ``.work.<type>``, turned back into its event on
  replay). The broker's ``x-death`` header, where it is there, only adds detail (which
  queue, when): nothing here depends on it, since RabbitMQ 4 changed what it keeps there.

This module reads dead letters (:func:`read`), walks the queue without losing or
reordering anything (:class:`Snapshot`) and lists it (:func:`list_dead_letters`);
:mod:`.replay` re-queues them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue
from pydantic import ValidationError

from ..config import Settings
from ..errors import UnreadableMessage
from ..events import Job, parse_event
from ..topology import DEAD_REASON_HEADER, LAST_ERROR_HEADER, Names
from . import ToolError
from .reach import connect
from .tables import render_table

_RETURN_BATCH = 16  # messages handed back at once (see Snapshot)
_RETURN_WAIT_S = 3.0  # the longest wait for one batch to be back
_MAX_ARRIVALS = 1000  # new dead letters a pass takes in beyond twice what it found


@dataclass(frozen=True)
class Replay:
    """What replaying a dead letter publishes: an event, to ``events_exchange``."""

    routing_key: str
    body: bytes
    event_id: str | None


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered message, as the tools show it."""

    position: int  # 1 = the head of the queue
    reason: str
    client_id: str | None
    event_id: str | None
    dead_lettered_at: datetime | None
    size: int
    replay: Replay | None  # None: not an event (see ``not_replayable``)
    not_replayable: str | None = None

    def age(self, now: datetime) -> str:
        return format_age(now - self.dead_lettered_at) if self.dead_lettered_at else "?"

    def as_dict(self, now: datetime) -> dict[str, Any]:
        at = self.dead_lettered_at
        return {
            "position": self.position, "reason": self.reason, "client_id": self.client_id,
            "event_id": self.event_id, "bytes": self.size,
            "dead_lettered_at": at.isoformat() if at else None,
            "age_seconds": round((now - at).total_seconds(), 1) if at else None,
            "replayable": self.replay is not None, "not_replayable": self.not_replayable,
        }


def format_age(delta: Any) -> str:
    """``timedelta`` -> ``"42s"``, ``"17m"``, ``"5h"``, ``"3d"``."""
    seconds = max(0, int(delta.total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _first_death(headers: Mapping[str, Any]) -> Mapping[str, Any] | None:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        return deaths[0]
    return None


def reason_of(headers: Mapping[str, Any]) -> str:
    """Why the message was dead-lettered: ``x-jasper-error`` (with the last error of an
    exhausted retry), else the broker's delivery limit (detailed by ``x-death`` if any)."""
    reason = headers.get(DEAD_REASON_HEADER)
    if reason:
        text = _text(reason)
        last = headers.get(LAST_ERROR_HEADER)
        return f"{text} (last error {_text(last)})" if last else text
    death = _first_death(headers)
    if death is not None:
        why = _text(death.get("reason", "dead-lettered")).replace("_", " ")
        queue = death.get("queue")
        return f"{why} in {_text(queue)}" if queue else why
    return "delivery limit (dead-lettered by the broker)"


def _when(timestamp: datetime | None, headers: Mapping[str, Any]) -> datetime | None:
    """When it was dead-lettered: the message's timestamp, else the broker's x-death time."""
    death = _first_death(headers)
    when = timestamp or (death.get("time") if death is not None else None)
    if not isinstance(when, datetime):
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _routing_key(data: Mapping[str, Any], headers: Mapping[str, Any]) -> str | None:
    code = data.get("event_code")
    if isinstance(code, int) and not isinstance(code, bool):
        return f"event.{code}"
    if isinstance(code, str) and code.isdigit():  # it fails again, with its signal
        return f"event.{int(code)}"
    death = _first_death(headers)  # the broker kept the key it was published with
    keys = death.get("routing-keys") if death is not None else None
    for key in keys if isinstance(keys, list) else []:
        if _text(key).startswith("event."):
            return _text(key)
    return None


def _replay_of(body: bytes, headers: Mapping[str, Any], settings: Settings
               ) -> tuple[Replay | None, str | None]:
    """The event a dead letter stands for, or why it is not one."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict) and "device" not in data:
        try:  # a job from a work queue, dead-lettered by the broker: back to its event
            job = Job.model_validate(data)
        except ValidationError:
            pass
        else:
            event = job.to_event()
            return Replay(f"event.{job.event_code}", json.dumps(event).encode(),
                          job.event_id), None
    try:
        parse_event(body, settings)
    except UnreadableMessage as exc:
        return None, f"not an event: {exc.reason}"
    except ValueError:
        pass  # an event that will fail again, with a signal: still worth its signal
    assert isinstance(data, dict)  # parse_event accepted or rejected an object
    key = _routing_key(data, headers)
    if key is None:
        return None, "no event_code to route it by"
    event_id = data.get("event_id")
    return Replay(key, body, event_id if isinstance(event_id, str) else None), None


def read(position: int, body: bytes, headers: Mapping[str, Any], message_id: str | None,
         timestamp: datetime | None, settings: Settings) -> DeadLetter:
    """What the tools show of one dead-lettered message."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        data = None
    fields = data if isinstance(data, dict) else {}
    client_id = fields.get("client_id")
    event_id = fields.get("event_id")
    replay, why_not = _replay_of(body, headers, settings)
    return DeadLetter(
        position=position,
        reason=reason_of(headers),
        client_id=client_id if isinstance(client_id, str) else None,
        event_id=event_id if isinstance(event_id, str) else message_id,
        dead_lettered_at=_when(timestamp, headers),
        size=len(body),
        replay=replay,
        not_replayable=why_not,
    )


def read_message(position: int, message: AbstractIncomingMessage, settings: Settings
                  ) -> DeadLetter:
    return read(position, message.body, dict(message.headers or {}), message.message_id,
                message.timestamp, settings)


# --- walking the queue --------------------------------------------------------------------


class Snapshot:
    """One pass over ``<prefix>.dead`` with ``basic.get``, losing and reordering nothing.

    Every message it gives out stays unacknowledged unless the caller removes it with
    :meth:`ack`; :meth:`close` hands the others back in queue order. How matters, as
    RabbitMQ 3.10 shows: a quorum queue puts returned messages at its back, in the order
    the returns are applied. Closing the channel returns them all in no particular
    order, and so does one ``nack(multiple)``; even single nacks in order get shuffled
    once more than a few dozen are in flight. So they go back with single nacks,
    :data:`_RETURN_BATCH` at a time, each batch applied (seen ready) before the next. And
    the pass goes to the end of the queue even when only the first few are wanted:
    handing back only those would move them behind the rest. Before RabbitMQ 4.3 each
    return counts as a delivery (4.3 counts only ``basic.reject``, so these nacks do not):
    ``.dead`` therefore has an unbounded delivery limit (topology.UNBOUNDED_DELIVERIES).
    """

    def __init__(self, connection: AbstractConnection, channel: AbstractChannel,
                 names: Names) -> None:
        self.names = names
        self.total = 0  # messages in the queue at the first get (approximate: others may act)
        self.seen = 0
        self._connection = connection
        self._channel = channel
        self._queue: AbstractQueue | None = None
        self._current: AbstractIncomingMessage | None = None  # the last one given out
        self._held: list[int] = []  # delivery tags to hand back, in queue order
        self._bound = _MAX_ARRIVALS

    def _keep_current(self) -> None:
        if self._current is not None:
            self._held.append(self._current.delivery_tag or 0)
            self._current = None

    async def next(self) -> AbstractIncomingMessage | None:
        """The next message, or None at the end of the queue."""
        self._keep_current()
        if self._queue is None:
            try:
                self._queue = await self._channel.get_queue(self.names.dead_queue, ensure=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise ToolError(f"there is no queue {self.names.dead_queue!r}: has the service "
                                f"run with queue_prefix {self.names.prefix!r} on this broker?"
                                ) from None
        if self.seen >= self._bound:
            return None  # a flood of new dead letters: stop here (order may suffer, not data)
        message = await self._queue.get(no_ack=False, fail=False)
        if message is None:
            return None
        if self.seen == 0:
            self.total = (message.message_count or 0) + 1
            self._bound = 2 * self.total + _MAX_ARRIVALS
        self.seen += 1
        self.total = max(self.total, self.seen)
        self._current = message
        return message

    async def ack(self, message: AbstractIncomingMessage) -> None:
        """Remove ``message`` (the one :meth:`next` gave last) from the queue for good."""
        await message.ack()
        if self._current is message:
            self._current = None

    async def close(self) -> None:
        """Hand every message not acked back, in order, then close the channel."""
        self._keep_current()
        probe: AbstractChannel | None = None
        try:  # failing that, closing the channel returns them, in no particular order
            if not self._held:
                return
            channel = await self._channel.get_underlay_channel()
            probe = await self._connection.channel()
            base = await _ready(probe, self.names.dead_queue)
            for start in range(0, len(self._held), _RETURN_BATCH):
                batch = self._held[start:start + _RETURN_BATCH]
                for tag in batch:
                    await channel.basic_nack(tag, multiple=False, requeue=True)
                await _until_ready(probe, self.names.dead_queue, base + start + len(batch))
        except Exception:  # the channel is gone: the broker takes them back itself
            pass
        finally:
            for each in (probe, self._channel):
                if each is not None:
                    with contextlib.suppress(Exception):
                        await each.close()


async def _ready(channel: AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    return declared.declaration_result.message_count or 0


async def _until_ready(channel: AbstractChannel, queue: str, count: int) -> None:
    """Wait (bounded) until ``queue`` has ``count`` messages ready."""
    deadline = time.monotonic() + _RETURN_WAIT_S
    while time.monotonic() < deadline:
        if await _ready(channel, queue) >= count:
            return
        await asyncio.sleep(0.005)  # the broker says nothing when it is done: ask again


# --- list ---------------------------------------------------------------------------------


@dataclass
class Listing:
    queue: str
    total: int = 0  # messages in the queue when the listing started
    matched: int = 0
    letters: list[DeadLetter] = field(default_factory=list)  # the first ``limit`` matched


def matches(letter: DeadLetter, reason: str | None) -> bool:
    """``--reason``: a case-insensitive substring of the reason shown."""
    return reason is None or reason.lower() in letter.reason.lower()


async def list_dead_letters(settings: Settings, *, reason: str | None = None,
                            limit: int = 100) -> Listing:
    """The first ``limit`` dead letters matching ``reason``, head of the queue first."""
    names = Names.from_settings(settings)
    listing = Listing(names.dead_queue)
    async with await connect(settings) as connection:
        snapshot = Snapshot(connection, await connection.channel(), names)
        try:
            while (message := await snapshot.next()) is not None:
                letter = read_message(snapshot.seen, message, settings)
                if matches(letter, reason):
                    listing.matched += 1
                    if len(listing.letters) < limit:
                        listing.letters.append(letter)
        finally:
            listing.total = snapshot.total
            await snapshot.close()
    return listing


def print_listing(listing: Listing, out: TextIO, *, reason: str | None, limit: int,
                  now: datetime | None = None) -> None:
    now = now or datetime.now(UTC)
    if listing.total == 0:
        print(f"{listing.queue} is empty", file=out)
        return
    rows = [[str(d.position), d.age(now), d.reason, d.client_id or "-", d.event_id or "-",
             "yes" if d.replay else "no"] for d in listing.letters]
    print(f"{listing.queue}: {listing.total} dead letter(s)", file=out)
    if rows:
        print(render_table(["#", "AGE", "REASON", "CLIENT", "EVENT ID", "REPLAY"], rows,
                           max_widths={2: 60, 3: 20, 4: 40}), file=out)
    shown = f"showing {len(rows)} of {listing.matched}"
    if reason is not None:
        shown += f" matching --reason {reason!r}"
    if listing.matched > len(rows):
        shown += f" (--limit {limit}; raise it to see more)"
    print(shown, file=out)
    skipped = sum(1 for d in listing.letters if d.replay is None)
    if skipped:
        print(f"{skipped} shown are not events (REPLAY no): replay skips them", file=out)
