"""``jasper-consumer reconcile``: the SIMs that cost money and the houses that cannot call
for help (README, Commands).

::

    clients.csv ──clientlist──▶ client rows per type ──┐
                                                        ├──▶ mismatches ──▶ report (stdout)
    Control Center ──listing (Search Devices)──▶ SIMs ──┘        │          summary (stderr)
                                                                 └──▶ --fix: fixes (events)

This package is the command; beside it :mod:`.clientlist` (Patriot's CSV export),
:mod:`.listing` (every SIM, Search Devices), :mod:`.mismatches` (what disagrees, no I/O),
:mod:`.fixes` (``--fix``: corrective events), :mod:`.report` (what it prints) and
:mod:`.demo` (``make demo-reconcile``).

Control Center calls keep the account within its limits together with the service
(operator guide, section 13), decided call by call (:mod:`..account`): while a service process
owns the type (consumes its work queue), that process makes them through its own limiter; while
none does, the tool makes them itself within the type's configured limits.

The report goes to stdout (a table, ``--format csv`` or ``--format json``); progress,
summaries, the ``--fix`` plan and its question go to stderr. Exit status: 0 when all
agree, 1 when anything is reported or a row could not be read, 2 on an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import aio_pika
import aiormq

from ...config import CommunicatorType, Settings
from ...errors import ConfigError
from .. import EXIT_FAILED, EXIT_OK, ToolError
from ..account import Accounts
from ..calls import AccountCalls
from ..reach import communicator, connect
from .clientlist import ClientList, read_clients
from .fixes import EventPublisher, FixSummary, apply, plan, plan_table, print_fixes
from .listing import Listing, list_all
from .mismatches import Mismatch, TypeCounts, classify, report_order
from .report import Comparison, print_hint, print_reading, print_summary, write_report

EXIT_ERROR = 2
FORMATS = ("table", "csv", "json")
REMOTE_WINDOW = 3  # pages asked of the owning process at a time; it serialises them anyway

Confirm = Callable[[str], Awaitable[bool]]


@dataclass(frozen=True)
class Options:
    clients: Path
    communicator_type: str | None = None
    format: str = "table"
    fix: bool = False
    yes: bool = False


async def ask(question: str, *, stdin: TextIO = sys.stdin, err: TextIO = sys.stderr) -> bool:
    """Ask on stderr, read the answer from stdin without blocking the event loop."""
    print(f"{question} [y/N]", end=" ", file=err, flush=True)
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[str] = loop.create_future()

    def readable() -> None:
        if not answer.done():
            answer.set_result(stdin.readline())

    try:
        fd = stdin.fileno()
        loop.add_reader(fd, readable)
    except (OSError, ValueError, NotImplementedError):  # a regular file, or no fileno
        return (await asyncio.to_thread(stdin.readline)).strip().lower() in ("y", "yes")
    try:
        reply = (await answer).strip()
    finally:
        loop.remove_reader(fd)
    if not stdin.isatty():  # piped in: show what was answered
        print(reply, file=err)
    return reply.lower() in ("y", "yes")


async def run(settings: Settings, options: Options, out: TextIO, err: TextIO, *,
              confirm: Confirm | None = None) -> int:
    """The whole command; returns the exit status."""
    try:
        return await _run(settings, options, out, err, confirm or ask)
    except ToolError as exc:
        print(f"jasper-consumer reconcile: {exc}", file=err)
    except ConfigError as exc:
        print("jasper-consumer reconcile: " + "; ".join(exc.problems), file=err)
    except (aio_pika.exceptions.AMQPError, aiormq.exceptions.AMQPError, OSError) as exc:
        print(f"jasper-consumer reconcile: RabbitMQ failed ({type(exc).__name__}); nothing "
              "more was done", file=err)
    return EXIT_ERROR


def _types(settings: Settings, only: str | None) -> list[CommunicatorType]:
    if only is None:
        return list(settings.communicator_types)
    return [communicator(settings, only)]


async def _run(settings: Settings, options: Options, out: TextIO, err: TextIO,
               confirm: Confirm) -> int:
    if options.format not in FORMATS:
        raise ToolError(f"--format must be one of {', '.join(FORMATS)}")
    types = _types(settings, options.communicator_type)
    clients = read_clients(options.clients, [ct.name for ct in settings.communicator_types])
    selected = {ct.name for ct in types}
    left_out = sum(1 for r in clients.rows if r.communicator_type not in selected)
    print_reading(clients, left_out, err)

    async with contextlib.AsyncExitStack() as stack:
        connection = await connect(settings)
        stack.push_async_callback(connection.close)
        calls, windows = await _open_calls(settings, types, connection, stack, err)
        result = await compare(settings, types, clients, calls, windows, err)
        write_report(result.found, options.format, out)
        print_summary(result, clients, err)
        if not options.fix:
            print_hint(result.found, err)
        elif result.failed:
            print("not fixing anything: a communicator type could not be listed", file=err)
        else:
            await _fix(result.found, calls, settings, connection, options, err, confirm)
    return exit_status(result, clients)


async def compare(settings: Settings, types: Sequence[CommunicatorType], clients: ClientList,
                  calls: Mapping[str, AccountCalls], windows: Mapping[str, int],
                  err: TextIO) -> Comparison:
    """List every SIM of each type (at once) and classify what disagrees."""
    listings = [Listing(ct, expected=len({r.ref_no for r in clients.rows
                                          if r.communicator_type == ct.name}))
                for ct in types]
    await list_all(calls, listings, settings.retry, windows, err)
    found: list[Mismatch] = []
    counts: dict[str, TypeCounts] = {}
    for listing in listings:
        if listing.error is None:  # a type listed in part is not compared at all
            rows = [r for r in clients.rows if r.communicator_type == listing.ct.name]
            type_found, counts[listing.ct.name] = classify(listing.ct.name, listing.sims, rows)
            found += type_found
    return Comparison(listings, report_order(found, [ct.name for ct in types]), counts)


def exit_status(result: Comparison, clients: ClientList) -> int:
    """2: a type could not be listed; 1: something reported or a row unread; 0: all agree."""
    if result.failed:
        return EXIT_ERROR
    return EXIT_FAILED if result.found or clients.bad_rows else EXIT_OK


async def _open_calls(settings: Settings, types: Sequence[CommunicatorType],
                      connection: aio_pika.abc.AbstractConnection,
                      stack: contextlib.AsyncExitStack,
                      err: TextIO) -> tuple[dict[str, AccountCalls], dict[str, int]]:
    """Per type, its :class:`~..account.Account` (the owning service makes each call while
    one runs, else the tool itself), and how many pages to ask for at a time."""
    accounts = Accounts(connection, settings, say=lambda line: print(line, file=err))
    stack.push_async_callback(accounts.close)
    calls: dict[str, AccountCalls] = {}
    windows: dict[str, int] = {}
    for ct in types:
        account = calls[ct.name] = accounts[ct]
        print(await account.describe(), file=err)
        # Pages asked at a time (more than the limits allow only wait for their turn): a
        # few for the owner, which serialises them anyway; for our own client, its limit.
        windows[ct.name] = (REMOTE_WINDOW if account.route == "owner"
                            else min(REMOTE_WINDOW, ct.max_concurrency))
    return calls, windows


async def _fix(found: Sequence[Mismatch], calls: dict[str, AccountCalls], settings: Settings,
               connection: aio_pika.abc.AbstractConnection, options: Options, err: TextIO,
               confirm: Confirm) -> None:
    fixes = plan(found)
    kept = len(found) - len(fixes)
    if not fixes:
        print("--fix: nothing to fix" + (f" ({kept} reported ICCID(s) are not for --fix)"
                                         if kept else ""), file=err)
        return
    print(f"\n--fix will publish {len(fixes)} event(s) to {settings.events_exchange} "
          "(each SIM's status is read again first; a SIM that changed is skipped):", file=err)
    print(plan_table(fixes), file=err)
    if kept:
        print(f"not touched: {kept} reported ICCID(s) (UNKNOWN_SIM, INVALID_ICCID, and "
              "ACTIVATED SIMs that no client has)", file=err)
    if not options.yes and not await confirm(f"Publish these {len(fixes)} event(s)?"):
        print("nothing published", file=err)
        return
    publisher = await EventPublisher.open(connection, settings)
    summary = FixSummary()
    try:
        await apply(fixes, calls, publisher, settings, summary, err)
    finally:  # also when publishing failed half-way: say what was done
        await publisher.close()
        print_fixes(summary, err)
