"""``reconcile --fix``: the events that correct what the report found (README, Commands).

Fixes go through the normal flow, as a producer's events do — so order per SIM, the
account's limits, the signal in the client's history and dead letters all apply:

* ``MONITORED_NOT_LIVE`` → an activate event (65516) for a commissioned client with it;
* ``LIVE_NOT_MONITORED`` of a SIM that a client has → a deactivate event (65517) for one
  of its clients (none of them is commissioned; one event per SIM is enough).

Never fixed, only reported: ``UNKNOWN_SIM``, ``INVALID_ICCID``, and an ``ACTIVATED`` SIM
that no client has (there is no client history to write to).

Each event carries ``command``, ``origin: "reconcile"`` (its signal's text ends with
"(reconcile)"), a new ``event_id``, the client's id and ``device.ref_no`` /
``communicator_type``; it is published persistent, with publisher confirms and
``mandatory``, exactly as ``jasper-consumer publish`` does. Right before publishing a
fix, the SIM's status is read again (Get Device Details): if it is not what the report
saw (the export may be older than an operator's click), the fix is skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TextIO

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from ...broker import publish_event
from ...config import Command, Settings
from ...errors import JasperError
from ...events import new_event
from ...jasper.retry import retrying
from .. import ToolError
from ..calls import AccountCalls
from ..check import explain
from ..progress import Progress
from ..tables import render_table
from .mismatches import Kind, Mismatch

ORIGIN = "reconcile"


@dataclass(frozen=True)
class Fix:
    """One corrective event to publish."""

    mismatch: Mismatch
    command: Command

    @property
    def client_id(self) -> str:
        assert self.mismatch.client_id is not None
        return self.mismatch.client_id

    @property
    def why(self) -> str:
        clients = self.mismatch.clients
        if self.command is Command.ACTIVATE:
            return f"client {self.client_id} is commissioned"
        if len(clients) == 1:
            return f"client {self.client_id} is not commissioned"
        return (f"none of its {len(clients)} clients is commissioned "
                f"({', '.join(clients[:4])}{', …' if len(clients) > 4 else ''})")


def plan(mismatches: Sequence[Mismatch]) -> list[Fix]:
    """The fixes for what the report found; everything else is left as reported."""
    fixes = []
    for m in mismatches:
        if m.kind is Kind.MONITORED_NOT_LIVE:
            fixes.append(Fix(m, Command.ACTIVATE))
        elif m.kind is Kind.LIVE_NOT_MONITORED and m.client_id is not None:
            fixes.append(Fix(m, Command.DEACTIVATE))
    return fixes


def plan_table(fixes: Sequence[Fix]) -> str:
    rows = [[f.command.value, f.mismatch.communicator_type, f.mismatch.iccid,
             f.mismatch.sim_status or "-", f.client_id, f.why] for f in fixes]
    return render_table(["DO", "COMMUNICATOR TYPE", "ICCID", "STATUS NOW", "FOR CLIENT", "WHY"],
                        rows, max_widths={5: 70})


def event_code(command: Command, commands: Mapping[int, Command]) -> int:
    """The event code to publish for ``command``: the lowest the config maps to it (the
    event names its command anyway, so any bound code would do)."""
    codes = sorted(code for code, c in commands.items() if c is command) or sorted(commands)
    if not codes:
        raise ToolError("the config's commands map is empty: no event code to publish")
    return codes[0]


@dataclass
class FixSummary:
    published: list[tuple[Fix, str]] = field(default_factory=list)  # with the event id
    changed: list[tuple[Fix, str]] = field(default_factory=list)  # with the status now
    failed: list[tuple[Fix, str]] = field(default_factory=list)  # with why it was not re-read

    @property
    def done(self) -> int:
        return len(self.published) + len(self.changed) + len(self.failed)


class EventPublisher:
    """Publishes events to the events exchange as ``jasper-consumer publish`` does."""

    def __init__(self, channel: AbstractChannel, exchange: AbstractExchange,
                 settings: Settings) -> None:
        self.channel = channel
        self.exchange = exchange
        self.settings = settings

    @classmethod
    async def open(cls, connection: AbstractConnection, settings: Settings) -> EventPublisher:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.declare_exchange(
            settings.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        return cls(channel, exchange, settings)

    async def close(self) -> None:
        if not self.channel.is_closed:
            await self.channel.close()

    def event(self, fix: Fix) -> dict[str, Any]:
        m = fix.mismatch
        return new_event(event_code(fix.command, self.settings.commands), fix.client_id,
                         m.iccid, m.communicator_type, command=fix.command.value,
                         origin=ORIGIN)

    async def publish(self, fix: Fix) -> str:
        """Publish the fix's event (confirmed by the broker); return its event id."""
        event = self.event(fix)
        routing_key = f"event.{event['event_code']}"
        try:
            await publish_event(self.exchange, event)
        except aio_pika.exceptions.DeliveryError:
            raise ToolError(
                f"the broker has no queue for {routing_key} on {self.settings.events_exchange}"
                ": has the service (which declares it) ever run with this config?") from None
        return str(event["event_id"])


async def apply(fixes: Sequence[Fix], calls: Mapping[str, AccountCalls],
                publisher: EventPublisher, settings: Settings, summary: FixSummary,
                err: TextIO) -> None:
    """Re-read each SIM and publish its fix unless its status changed, noting each in
    ``summary``; types at once, each type's SIMs one after another."""
    progress = Progress(err, "fixing")

    def counts() -> str:
        return (f"{summary.done}/{len(fixes)}: published {len(summary.published)}, "
                f"changed since the report {len(summary.changed)}, "
                f"not re-read {len(summary.failed)}")

    async def one_type(type_fixes: list[Fix]) -> None:
        for fix in type_fixes:
            m = fix.mismatch
            account = calls[m.communicator_type]
            try:
                details = await retrying(partial(account.get_device, m.iccid), settings.retry)
            except JasperError as exc:
                summary.failed.append((fix, explain(exc)))
            else:
                now = details.get("status")
                if now != m.sim_status:
                    summary.changed.append((fix, str(now)))
                else:
                    summary.published.append((fix, await publisher.publish(fix)))
            progress.show(summary.done / len(fixes), counts())

    by_type: dict[str, list[Fix]] = {}
    for fix in fixes:
        by_type.setdefault(fix.mismatch.communicator_type, []).append(fix)
    try:
        await asyncio.gather(*(one_type(f) for f in by_type.values()))
    finally:
        progress.finish(counts())


def print_fixes(summary: FixSummary, err: TextIO) -> None:
    for fix, now in summary.changed:
        print(f"  skipped {fix.mismatch.iccid} ({fix.mismatch.communicator_type}): its status "
              f"changed since the report, {fix.mismatch.sim_status} -> {now}", file=err)
    for fix, why in summary.failed:
        print(f"  skipped {fix.mismatch.iccid} ({fix.mismatch.communicator_type}): could not "
              f"read its status: {why}", file=err)
    if summary.published:
        print(f"published {len(summary.published)} event(s) with origin {ORIGIN!r}: the "
              "service applies them in turn and writes a line ending \"(reconcile)\" in each "
              "client's history", file=err)
