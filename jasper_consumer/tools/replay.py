"""``dead-letters replay``: re-queue dead-lettered events for processing, losing nothing.

Each dead letter that is an event (:mod:`.deadletters` says which) is published again
to the events exchange with routing key ``event.<code>``, persistent, with publisher
confirms and ``mandatory``, and only **then** acknowledged in ``<prefix>.dead``.
Interrupted at any point, a dead letter is still in the queue or its copy was
confirmed by the broker — at worst both (a duplicate, which the service handles like
any redelivery), never neither. What is not replayed — not an event, not matching
``--reason``, beyond ``--limit``, or returned by the broker as unroutable — stays in
the queue, in its order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

import aiormq
from aio_pika.abc import AbstractExchange

from ..broker import event_message
from ..config import Settings
from ..topology import REPLAYED_HEADER, Names
from . import EXIT_FAILED, EXIT_OK, ToolError
from .deadletters import DeadLetter, Replay, Snapshot, matches, read_message
from .progress import Progress
from .reach import connect

_CONFIRM_TIMEOUT_S = 30.0


@dataclass
class ReplaySummary:
    """What a replay did; filled in as it goes, so it is there also when interrupted."""

    queue: str
    exchange: str
    total: int = 0  # dead letters in the queue when the replay started
    seen: int = 0
    replayed: int = 0
    not_events: int = 0  # unreadable: nothing to replay
    not_matching: int = 0  # --reason did not match
    not_reached: int = 0  # after --limit was reached, or after a stop
    unroutable: int = 0  # the broker returned the copy: nothing bound to its routing key
    repeated: int = 0  # an event replayed earlier in this run (it failed again meanwhile)
    interrupted: bool = False
    routing_keys: set[str] = field(default_factory=set)

    @property
    def left(self) -> int:
        return self.total - self.replayed

    @property
    def fraction(self) -> float:
        return min(self.seen, self.total) / max(self.total, 1)

    @property
    def progress_text(self) -> str:
        return (f"{self.seen}/{self.total}  replayed {self.replayed}  "
                f"skipped {self.seen - self.replayed}")


async def replay(
    settings: Settings,
    *,
    reason: str | None = None,
    limit: int | None = None,
    progress: Progress | None = None,
    summary: ReplaySummary | None = None,
    on_replayed: Callable[[DeadLetter], None] | None = None,
    stop: asyncio.Event | None = None,
) -> ReplaySummary:
    """Replay the dead-lettered events matching ``reason``, oldest first, at most ``limit``.

    Once ``stop`` is set (Ctrl-C, in the CLI) nothing more is replayed, but the pass goes
    on to the end of the queue so that everything goes back in order (see
    :class:`~.deadletters.Snapshot`); a cancellation ends it at once, and the broker then
    takes back what is left in an order of its own."""
    names = Names.from_settings(settings)
    if summary is None:
        summary = ReplaySummary(names.dead_queue, settings.events_exchange)
    async with await connect(settings) as connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            exchange = await channel.get_exchange(settings.events_exchange, ensure=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise ToolError(f"there is no exchange {settings.events_exchange!r} to replay "
                            "to: has the service run with this config?") from None
        snapshot = Snapshot(connection, channel, names)
        replayed: set[str] = set()  # event ids: one that comes back failed again meanwhile
        try:
            while (message := await snapshot.next()) is not None:
                _stop_if_cancelled()
                summary.interrupted = summary.interrupted or (stop is not None and stop.is_set())
                summary.total, summary.seen = snapshot.total, snapshot.seen
                letter = read_message(snapshot.seen, message, settings)
                event_id = letter.replay.event_id if letter.replay else None
                if summary.interrupted or (limit is not None and summary.replayed >= limit):
                    summary.not_reached += 1  # walk on: handing back all keeps the order
                elif not matches(letter, reason):
                    summary.not_matching += 1
                elif letter.replay is None:
                    summary.not_events += 1
                elif event_id is not None and event_id in replayed:
                    summary.repeated += 1
                elif await _publish(exchange, letter.replay, letter.reason):
                    await snapshot.ack(message)  # only now: its copy is confirmed
                    summary.replayed += 1
                    summary.routing_keys.add(letter.replay.routing_key)
                    if event_id is not None:
                        replayed.add(event_id)
                    if on_replayed is not None:
                        on_replayed(letter)
                else:
                    summary.unroutable += 1
                if progress is not None:
                    progress.show(summary.fraction, summary.progress_text)
        except BaseException:  # Ctrl-C, cancelled, or an error: what is done is done
            summary.interrupted = True
            raise
        finally:
            if progress is not None and summary.seen:
                progress.finish(summary.progress_text)
            await snapshot.close()
    return summary


def _stop_if_cancelled() -> None:
    """Honour a cancellation (Ctrl-C) that an inner ``wait_for`` may have swallowed."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _publish(exchange: AbstractExchange, replay: Replay, reason: str) -> bool:
    """Publish a copy with confirms; False if the broker returned it as unroutable."""
    message = event_message(replay.body, message_id=replay.event_id,
                            headers={REPLAYED_HEADER: reason})
    try:
        await exchange.publish(message, replay.routing_key, mandatory=True,
                               timeout=_CONFIRM_TIMEOUT_S)
    except aiormq.exceptions.PublishError:
        return False  # returned: no queue is bound for this routing key
    except (aiormq.exceptions.DeliveryError, TimeoutError) as exc:
        raise ToolError(f"the broker did not confirm a replayed event ({exc!r}); its dead "
                        "letter stays in the queue") from None
    return True


def print_summary(summary: ReplaySummary, out: TextIO, *, reason: str | None,
                  limit: int | None) -> int:
    """The summary lines; the exit status (non-zero if some copies could not be routed)."""
    if summary.total == 0:
        print(f"{summary.queue} is empty: nothing to replay", file=out)
        return EXIT_OK
    head = "interrupted: " if summary.interrupted else ""
    keys = ", ".join(sorted(summary.routing_keys))
    print(f"{head}replayed {summary.replayed} of {summary.total} dead letter(s) to "
          f"{summary.exchange}" + (f" ({keys})" if keys else ""), file=out)
    if summary.not_events:
        print(f"skipped {summary.not_events} that are not events (see `dead-letters list`)",
              file=out)
    if summary.not_matching:
        print(f"skipped {summary.not_matching} not matching --reason {reason!r}", file=out)
    if summary.not_reached:
        why = "after the stop" if summary.interrupted else f"beyond --limit {limit}"
        print(f"skipped {summary.not_reached} {why}", file=out)
    if summary.repeated:
        print(f"skipped {summary.repeated} of events already replayed in this run (they "
              "failed again, or were there twice)", file=out)
    if summary.unroutable:
        print(f"skipped {summary.unroutable} the broker could not route (no queue bound for "
              "their event code: is the service's events queue declared?)", file=out)
    print(f"left in {summary.queue}: {summary.left}", file=out)
    return EXIT_FAILED if summary.unroutable else EXIT_OK
