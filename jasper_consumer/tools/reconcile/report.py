"""What ``reconcile`` prints: the report on stdout (a table, CSV or JSON, README, Commands), and on
stderr what was read, each type's counts with each kind's meaning, and a hint."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from ..check import explain
from ..tables import render_table
from .clientlist import ClientList
from .fixes import plan
from .listing import Listing
from .mismatches import MEANINGS, Kind, Mismatch, TypeCounts

MAX_BAD_ROWS_SHOWN = 20


@dataclass
class Comparison:
    """Every listed type's SIMs against the client list."""

    listings: list[Listing]
    found: list[Mismatch]  # in report order
    counts: dict[str, TypeCounts]  # by type, for the types that could be listed

    @property
    def failed(self) -> bool:
        return any(listing.error for listing in self.listings)



def _client_cell(m: Mismatch) -> str:
    if m.client_id is None:
        return "- (no client has it)"
    others = len(m.clients) - 1
    return f"{m.client_id} (+{others} linked)" if others > 0 else m.client_id


def write_report(found: Sequence[Mismatch], fmt: str, out: TextIO) -> None:
    """The reported ICCIDs on ``out``: a table, CSV or a JSON array (README, Commands)."""
    if fmt == "json":
        print(json.dumps([m.as_dict() for m in found], indent=2), file=out)
        return
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["iccid", "kind", "communicator_type", "sim_status", "client_id"])
        for m in found:
            writer.writerow([m.iccid, m.kind.value, m.communicator_type, m.sim_status or "",
                             m.client_id or ""])
        return
    if not found:
        print("Nothing to report: every SIM agrees with the client list.", file=out)
        return
    rows = [[m.kind.value, m.communicator_type, m.iccid or "(none)", m.sim_status or "-",
             _client_cell(m)] for m in found]
    print(render_table(["KIND", "COMMUNICATOR TYPE", "ICCID", "SIM STATUS", "CLIENT"], rows,
                       max_widths={2: 40}), file=out)


def print_reading(clients: ClientList, left_out: int, err: TextIO) -> None:
    separator = {",": "comma", ";": "semicolon"}[clients.delimiter]
    print(f"{clients.source}: {clients.read:,} row(s) ({separator}-separated): "
          f"{len(clients.rows) - left_out:,} to compare", file=err)
    if clients.other_types:
        listed = ", ".join(f"{name!r}: {n}" for name, n in clients.other_types.most_common())
        print(f"  skipped {sum(clients.other_types.values()):,} row(s) of communicator types "
              f"not in the config ({listed})", file=err)
    if left_out:
        print(f"  left out {left_out:,} row(s) of other communicator types "
              "(--communicator-type)", file=err)
    for bad in clients.bad_rows[:MAX_BAD_ROWS_SHOWN]:
        print(f"  {clients.source} line {bad.line}: {bad.problem}", file=err)
    if len(clients.bad_rows) > MAX_BAD_ROWS_SHOWN:
        print(f"  … and {len(clients.bad_rows) - MAX_BAD_ROWS_SHOWN} more row(s) that could "
              "not be read", file=err)


def print_summary(result: Comparison, clients: ClientList, err: TextIO) -> None:
    print("", file=err)
    for listing in result.listings:
        name = listing.ct.name
        if listing.error is not None:
            print(f"{name}: could not list its SIMs after {listing.pages} page(s): "
                  f"{explain(listing.error)}", file=err)
            continue
        c = result.counts[name]
        print(f"{name}: {c.sims:,} SIM(s) in Control Center ({c.activated:,} ACTIVATED), "
              f"{listing.pages} page(s) in {listing.elapsed_s:.1f} s; {c.rows:,} client "
              f"row(s) with {c.iccids:,} ICCID(s) ({c.shared:,} shared by linked areas)",
              file=err)
        shown = False
        for kind in Kind:
            n = sum(1 for m in result.found if m.communicator_type == name and m.kind is kind)
            if n:
                print(f"  {kind.value:<18} {n:>6,}  {MEANINGS[kind]}", file=err)
                shown = True
        if not shown:
            print("  every SIM agrees with the client list", file=err)
    urgent = sum(1 for m in result.found if m.kind is Kind.MONITORED_NOT_LIVE)
    bad = len(clients.bad_rows)
    if result.found or bad:
        print(f"\n{len(result.found):,} ICCID(s) reported ({urgent:,} where alarms cannot get "
              "through)" + (f"; {bad:,} row(s) of {clients.source} could not be read"
                            if bad else ""), file=err)
    elif not result.failed:
        print("\nEvery SIM agrees with the client list.", file=err)


def print_hint(found: Sequence[Mismatch], err: TextIO) -> None:
    fixable = len(plan(found))
    if fixable:
        print(f"--fix would publish {fixable} corrective event(s) (it shows them and asks "
              "first)", file=err)
