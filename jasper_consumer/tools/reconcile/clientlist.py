"""The client list exported from Patriot, as ``reconcile`` reads it (README, Commands).

A CSV file with a header row naming (in any order, any case, other columns ignored):

==================  ==============================  =====================================
column              Patriot's caption also works    value
==================  ==============================  =====================================
``client_id``       ``Client No``                   the client's number
``ref_no``          ``Device Ref No``               the add-on device's ICCID, as typed
``communicator_type`` ``Communicator Type``         the Jasper communicator type's name
``commissioned``    ``Commissioned``                yes/no, true/false or 1/0
==================  ==============================  =====================================

UTF-8 with or without a byte order mark; comma- or semicolon-separated (the header
tells which). A row that cannot be read is kept as a :class:`BadRow` with its line
number and what is wrong, and the rest still counts; a row of a communicator type that
is not configured is counted and skipped. A file that cannot be read at all (missing,
not UTF-8, no header, a column missing) raises :class:`ToolError`.
"""

from __future__ import annotations

import collections
import csv
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .. import ToolError

FIELDS = ("client_id", "ref_no", "communicator_type", "commissioned")
_NAMES = {  # normalised header -> field
    "client id": "client_id", "client no": "client_id",
    "ref no": "ref_no", "device ref no": "ref_no",
    "communicator type": "communicator_type",
    "commissioned": "commissioned",
}
_CAPTIONS = {"client_id": "Client No", "ref_no": "Device Ref No",
             "communicator_type": "Communicator Type", "commissioned": "Commissioned"}
_YES = frozenset({"yes", "true", "1"})
_NO = frozenset({"no", "false", "0"})
_BOMS_NOT_UTF8 = (b"\xff\xfe", b"\xfe\xff")  # UTF-16, as Excel's "Unicode text" saves it


@dataclass(frozen=True)
class ClientRow:
    """One device of one client: what Patriot says about a SIM."""

    line: int
    client_id: str
    ref_no: str  # as written; reconcile turns it into an ICCID
    communicator_type: str  # the configured name
    commissioned: bool


@dataclass(frozen=True)
class BadRow:
    line: int
    problem: str


@dataclass
class ClientList:
    """What was read from the file."""

    source: str
    delimiter: str
    rows: list[ClientRow] = field(default_factory=list)
    bad_rows: list[BadRow] = field(default_factory=list)
    other_types: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def read(self) -> int:
        """Data rows in the file (blank lines aside)."""
        return len(self.rows) + len(self.bad_rows) + sum(self.other_types.values())


def _normalise(header: str) -> str:
    return re.sub(r"[\s_.\-]+", " ", header.strip().lower()).strip()


def _columns(header: list[str]) -> tuple[dict[str, int], list[str]]:
    """Field -> column index, and the problems with the header."""
    found: dict[str, int] = {}
    problems = []
    for index, name in enumerate(header):
        key = _NAMES.get(_normalise(name))
        if key is None:
            continue
        if key in found:
            problems.append(f"columns {found[key] + 1} and {index + 1} are both {key}")
        found[key] = index
    missing = [f"{f} (or {_CAPTIONS[f]!r})" for f in FIELDS if f not in found]
    if missing:
        problems.append("no column " + ", ".join(missing))
    return found, problems


def _decode(data: bytes, source: str) -> str:
    if data.startswith(_BOMS_NOT_UTF8):
        raise ToolError(f"{source} is UTF-16 text: export or save it as CSV UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ToolError(f"{source} is not UTF-8 (line {line}): export or save it as "
                        "CSV UTF-8") from None


def read_clients(path: str | Path, type_names: Iterable[str]) -> ClientList:
    """Read the client list at ``path`` (see the module docstring)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ToolError(f"cannot read the clients file {str(path)!r}: {exc.strerror}") from None
    return parse_clients(_decode(data, str(path)), type_names, source=str(path))


def parse_clients(text: str, type_names: Iterable[str], *, source: str = "clients") -> ClientList:
    """Parse the text of a client list; ``type_names`` are the configured communicator types."""
    types = {_normalise(name): name for name in type_names}
    lines = text.splitlines(keepends=True)
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise ToolError(f"{source} is empty: expected a header row naming the columns "
                        + ", ".join(FIELDS))
    attempts = []
    for delimiter in sorted((",", ";"), key=lambda d: -lines[first].count(d)):
        header = next(csv.reader([lines[first]], delimiter=delimiter))
        columns, problems = _columns(header)
        if not problems:
            break
        attempts.append(problems)
    else:
        raise ToolError(f"{source} line {first + 1}: the header row has "
                        + "; ".join(attempts[0]))
    clients = ClientList(source, delimiter)
    reader = csv.reader(io.StringIO("".join(lines[first + 1:]), newline=""),
                        delimiter=delimiter)
    read_to = 0  # lines of the data part read so far
    for cells in reader:
        line = first + 2 + read_to  # where the record starts, counting from 1 in the file
        read_to = reader.line_num
        if any(c.strip() for c in cells):
            _add_row(clients, cells, columns, header, types, line)
    return clients


def _add_row(clients: ClientList, cells: list[str], columns: dict[str, int],
             header: list[str], types: dict[str, str], line: int) -> None:
    need = max(columns.values()) + 1
    if len(cells) < need:
        clients.bad_rows.append(BadRow(line, f"has {len(cells)} of the {len(header)} columns "
                                             f"(is a {clients.delimiter!r} missing?)"))
        return
    value = {f: cells[i].strip() for f, i in columns.items()}
    caption = {f: header[i].strip() for f, i in columns.items()}
    type_name = value["communicator_type"]
    configured = types.get(_normalise(type_name))
    if type_name and configured is None:
        clients.other_types[type_name] += 1
        return
    problems = [f"{caption[f]} is empty" for f in ("client_id", "communicator_type")
                if not value[f]]
    commissioned = value["commissioned"].lower()
    if commissioned not in _YES | _NO:
        problems.append(f"{caption['commissioned']} is {value['commissioned']!r}; expected "
                        "yes/no, true/false or 1/0")
    if problems:
        clients.bad_rows.append(BadRow(line, "; ".join(problems)))
        return
    assert configured is not None
    clients.rows.append(ClientRow(line, value["client_id"], value["ref_no"], configured,
                                  commissioned in _YES))
