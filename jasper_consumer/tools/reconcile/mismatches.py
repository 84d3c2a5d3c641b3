"""Where Control Center and Patriot's client list disagree (README, Commands). Pure: no I/O.

A SIM should be live exactly when at least one client that has its ICCID is
commissioned: a base and its linked areas share one SIM, so several clients with one
ICCID is normal. Per communicator type, each ICCID gets at most one :class:`Kind`:

* ``MONITORED_NOT_LIVE`` — a client with it is commissioned, the SIM is not ``ACTIVATED``;
* ``LIVE_NOT_MONITORED`` — ``ACTIVATED``, and no client with it is commissioned, or no
  client has it at all;
* ``UNKNOWN_SIM`` — a client's ICCID that the account does not have;
* ``INVALID_ICCID`` — a Device Ref No that is not an ICCID (also an empty one of a
  commissioned client: that house cannot be checked).

The report lists them in that order: the houses that cannot call for help first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ...errors import EventRejected
from ...events import normalise_iccid
from .clientlist import ClientRow

ACTIVATED = "ACTIVATED"


class Kind(StrEnum):
    """A kind of disagreement, in report order."""

    MONITORED_NOT_LIVE = "MONITORED_NOT_LIVE"
    LIVE_NOT_MONITORED = "LIVE_NOT_MONITORED"
    UNKNOWN_SIM = "UNKNOWN_SIM"
    INVALID_ICCID = "INVALID_ICCID"

    @property
    def rank(self) -> int:
        return list(Kind).index(self)


#: Each kind in an operator's words: what it means and what to do.
MEANINGS: dict[Kind, str] = {
    Kind.MONITORED_NOT_LIVE: "a commissioned client's SIM is not ACTIVATED: its alarms "
                             "cannot get through. Fix these first (--fix activates them)",
    Kind.LIVE_NOT_MONITORED: "an ACTIVATED SIM that no commissioned client has: billed "
                             "every month for nothing (--fix deactivates those a client "
                             "has; one no client has is left to you)",
    Kind.UNKNOWN_SIM: "a client's Device Ref No that this account does not have: a typo, "
                      "or the wrong communicator type. Correct it in Patriot",
    Kind.INVALID_ICCID: "a Device Ref No that is not an ICCID (18 to 22 digits), or none "
                        "on a commissioned client. Correct it in Patriot",
}


@dataclass(frozen=True)
class Mismatch:
    """One reported ICCID."""

    iccid: str  # for INVALID_ICCID: the Device Ref No as written
    kind: Kind
    communicator_type: str
    sim_status: str | None  # in Control Center; None when it does not have the SIM
    client_id: str | None  # the client it concerns (for a fix: the one the event is for)
    clients: tuple[str, ...] = ()  # every client with this ICCID, in file order

    def as_dict(self) -> dict[str, Any]:
        """The object ``--format json`` prints (README, Commands)."""
        return {"iccid": self.iccid, "kind": self.kind.value,
                "communicator_type": self.communicator_type, "sim_status": self.sim_status,
                "client_id": self.client_id}


@dataclass(frozen=True)
class TypeCounts:
    """What one communicator type's comparison covered."""

    sims: int  # SIMs the account has
    activated: int
    rows: int  # client rows of this type
    iccids: int  # distinct valid ICCIDs among them
    shared: int  # ICCIDs that more than one client has (linked areas)


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


def classify(communicator_type: str, sims: Mapping[str, str],
             rows: Sequence[ClientRow]) -> tuple[list[Mismatch], TypeCounts]:
    """Compare one type's SIMs (ICCID -> status) with its client rows."""
    by_iccid: dict[str, list[ClientRow]] = {}
    invalid: dict[str, list[ClientRow]] = {}
    for row in rows:
        try:
            iccid = normalise_iccid(row.ref_no)
        except EventRejected:
            if row.ref_no.strip():
                invalid.setdefault(row.ref_no.strip(), []).append(row)
            elif row.commissioned:  # each client without a Device Ref No on its own
                invalid[f"\x00{row.line}"] = [row]
            continue
        by_iccid.setdefault(iccid, []).append(row)

    found: list[Mismatch] = []
    for iccid, holders in by_iccid.items():
        clients = _unique(r.client_id for r in holders)
        live = _unique(r.client_id for r in holders if r.commissioned)
        status = sims.get(iccid)
        kind = None
        if status is None:
            kind = Kind.UNKNOWN_SIM
        elif live and status != ACTIVATED:
            kind = Kind.MONITORED_NOT_LIVE
        elif not live and status == ACTIVATED:
            kind = Kind.LIVE_NOT_MONITORED
        if kind is not None:
            found.append(Mismatch(iccid, kind, communicator_type, status,
                                  (live or clients)[0], clients))
    for iccid, status in sims.items():
        if status == ACTIVATED and iccid not in by_iccid:
            found.append(Mismatch(iccid, Kind.LIVE_NOT_MONITORED, communicator_type, status,
                                  None))
    for ref_no, holders in invalid.items():
        clients = _unique(r.client_id for r in holders)
        found.append(Mismatch("" if ref_no.startswith("\x00") else ref_no, Kind.INVALID_ICCID,
                              communicator_type, None, clients[0], clients))

    counts = TypeCounts(
        sims=len(sims), activated=sum(1 for s in sims.values() if s == ACTIVATED),
        rows=len(rows), iccids=len(by_iccid),
        shared=sum(1 for holders in by_iccid.values() if len(_unique(
            r.client_id for r in holders)) > 1))
    return found, counts


def report_order(mismatches: Iterable[Mismatch], type_order: Sequence[str]) -> list[Mismatch]:
    """Kinds in report order (MONITORED_NOT_LIVE first), then types in config order, then
    ICCIDs."""
    position = {name: i for i, name in enumerate(type_order)}
    return sorted(mismatches, key=lambda m: (m.kind.rank, position.get(m.communicator_type, 0),
                                             m.iccid))
