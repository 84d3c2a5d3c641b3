"""Every SIM of a Control Center account, page by page with Search Devices (operator guide,
section 13).

Pages are asked for a few at a time (pages 1..k, then the next as each answers) until
one says ``lastPage``; answers for pages after it are dropped. A page that fails with a
transient error (rate limit, 5xx, network) is tried again with back-off within the
config's ``retry`` budget; any other error stops that type's listing. Calls go through
:class:`~jasper_consumer.tools.calls.AccountCalls`: the owning service's limiter, or the
tool's own client when no service runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from ... import errors
from ...config import CommunicatorType, RetrySettings
from ...errors import JasperError, JasperRejected
from ...jasper.retry import retrying
from ..calls import AccountCalls
from ..progress import Progress

PAGE_SIZE = 50
MAX_PAGES = 20_000  # a million SIMs: more means Control Center never says lastPage


@dataclass
class Listing:
    """One type's SIMs as they come in."""

    ct: CommunicatorType
    expected: int = 0  # SIMs expected (from the client list): only for the progress bar
    sims: dict[str, str] = field(default_factory=dict)  # ICCID -> status
    pages: int = 0
    done: bool = False
    error: JasperError | None = None
    started: float = field(default_factory=time.monotonic)
    elapsed_s: float = 0.0

    def fraction(self) -> float:
        if self.done:
            return 1.0
        return min(0.95, len(self.sims) / max(self.expected, PAGE_SIZE))


def _checked(page: Mapping[str, Any], number: int) -> tuple[list[tuple[str, str]], bool]:
    """The (ICCID, status) pairs of a page and whether it is the last one."""
    devices = page.get("devices")
    pairs = []
    for device in devices if isinstance(devices, list) else [None]:
        iccid = device.get("iccid") if isinstance(device, dict) else None
        status = device.get("status") if isinstance(device, dict) else None
        if not (isinstance(iccid, str) and isinstance(status, str)):
            raise JasperRejected(errors.UNEXPECTED_RESPONSE,
                                 f"page {number} of Search Devices has a device without an "
                                 "iccid and a status")
        pairs.append((iccid, status))
    last = page.get("lastPage")
    if not isinstance(last, bool):  # not promised by the answer: a short page is the last
        last = len(pairs) < PAGE_SIZE
    return pairs, last or not pairs


async def fetch_page(calls: AccountCalls, number: int,
                     retry: RetrySettings) -> tuple[list[tuple[str, str]], bool]:
    """One page's (ICCID, status) pairs and whether it is the last, with retries."""
    page = await retrying(lambda: calls.search_devices(number, page_size=PAGE_SIZE), retry)
    return _checked(page, number)


async def list_sims(calls: AccountCalls, listing: Listing, retry: RetrySettings, *,
                    window: int, changed: Callable[[], None] = lambda: None) -> None:
    """Fill ``listing.sims`` with every SIM of the account; a page failing for good raises."""
    pending: dict[asyncio.Task[tuple[list[tuple[str, str]], bool]], int] = {}
    next_page, last_page = 1, None
    try:
        while True:
            while len(pending) < window and last_page is None and next_page <= MAX_PAGES:
                pending[asyncio.create_task(fetch_page(calls, next_page, retry))] = next_page
                next_page += 1
            if not pending:
                break
            finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(finished, key=pending.__getitem__):
                number = pending.pop(task)
                if last_page is not None and number > last_page:
                    if not task.cancelled():
                        task.exception()  # asked for before the last page answered: not needed
                    continue
                pairs, last = task.result()
                listing.sims.update(pairs)
                listing.pages += 1
                if last:
                    last_page = number if last_page is None else min(last_page, number)
                    for other, other_number in list(pending.items()):
                        if other_number > last_page:
                            other.cancel()
                changed()
        if last_page is None:
            raise JasperRejected(errors.UNEXPECTED_RESPONSE,
                                 f"Search Devices never said lastPage in {MAX_PAGES} pages")
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    listing.done = True
    listing.elapsed_s = time.monotonic() - listing.started
    changed()


def _status_line(listings: Sequence[Listing]) -> str:
    parts = []
    for listing in listings:
        state = ("failed" if listing.error else "done" if listing.done
                 else f"page {listing.pages + 1}")
        parts.append(f"{listing.ct.name} {state} ({len(listing.sims):,} SIMs)")
    return " · ".join(parts)


async def list_all(calls: Mapping[str, AccountCalls], listings: Sequence[Listing],
                   retry: RetrySettings, windows: Mapping[str, int], err: TextIO) -> None:
    """List every type at once (they are separate accounts); a type's failure is kept in its
    ``error``, the others go on."""
    progress = Progress(err, "listing SIMs")

    def changed() -> None:
        fraction = sum(listing.fraction() for listing in listings) / len(listings)
        progress.show(fraction, _status_line(listings))

    async def one(listing: Listing) -> None:
        try:
            await list_sims(calls[listing.ct.name], listing, retry,
                            window=windows[listing.ct.name], changed=changed)
        except JasperError as exc:
            listing.error = exc
            listing.elapsed_s = time.monotonic() - listing.started
            changed()

    await asyncio.gather(*(one(listing) for listing in listings))
    progress.finish(_status_line(listings))
