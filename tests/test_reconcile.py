"""``reconcile`` without a broker: the client list, classification, listing, output, exit
codes and the --fix plan (operator guide, section 7)."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from jasper_consumer.config import Command, Settings, parse_settings
from jasper_consumer.errors import (
    CommunicatorMisconfigured,
    JasperError,
    JasperRejected,
    JasperRetryable,
    RetriesExhausted,
)
from jasper_consumer.tools import ToolError, reconcile
from jasper_consumer.tools.progress import Progress
from jasper_consumer.tools.reconcile import fixes
from jasper_consumer.tools.reconcile.clientlist import (
    ClientList,
    ClientRow,
    parse_clients,
    read_clients,
)
from jasper_consumer.tools.reconcile.fixes import EventPublisher, Fix, FixSummary, event_code, plan
from jasper_consumer.tools.reconcile.listing import Listing, list_sims
from jasper_consumer.tools.reconcile.mismatches import Kind, Mismatch, classify, report_order
from jasper_consumer.tools.reconcile.report import Comparison, write_report

NZ, AU = "M2MOne NZ", "M2MOne AU"
HEADER = "client_id,ref_no,communicator_type,commissioned\n"


def sim(n: int) -> str:
    return f"8961018500{n:010d}"


def row(client: str, ref_no: str, commissioned: bool, line: int = 2,
        ct: str = NZ) -> ClientRow:
    return ClientRow(line, client, ref_no, ct, commissioned)


@pytest.fixture
def settings() -> Settings:
    return parse_settings({
        "retry": {"max_attempts": 3, "initial_delay_seconds": 0.001, "max_delay_seconds": 0.01,
                  "max_elapsed_seconds": 5},
        "communicator_types": [
            {"name": NZ, "server_address": "https://j.example/rws/api/v1", "username": "nz",
             "api_key": "k", "requests_per_second": 5},
            {"name": AU, "server_address": "https://j.example/rws/api/v1", "username": "au",
             "api_key": "k"}]}, {})


# --- the client list -----------------------------------------------------------------------


def test_patriot_captions_semicolons_and_a_bom_are_read(tmp_path: Path):
    """Patriot's captions, any case, semicolons and a UTF-8 BOM: the rows come out as typed."""
    path = tmp_path / "clients.csv"
    path.write_bytes("\ufeffClient No;DEVICE REF NO;Communicator Type;Commissioned;Name\r\n"
                     f"100234;8961 0185 0023 4567 8901;{NZ};Yes;Smith, J\r\n"
                     f"100235;;m2mone au;FALSE;\r\n".encode())

    clients = read_clients(path, [NZ, AU])

    assert clients.delimiter == ";"
    assert clients.rows == [row("100234", "8961 0185 0023 4567 8901", True),
                            row("100235", "", False, line=3, ct=AU)]
    assert clients.bad_rows == []


@pytest.mark.parametrize(("value", "commissioned"), [
    ("yes", True), ("no", False), ("true", True), ("False", False), ("1", True), ("0", False),
    (" YES ", True)])
def test_commissioned_takes_yes_no_true_false_1_0(value: str, commissioned: bool):
    """yes/no, true/false and 1/0 (any case, spaces around) say whether it is commissioned."""
    clients = parse_clients(HEADER + f"1,{sim(1)},{NZ},{value}\n", [NZ])

    assert clients.rows[0].commissioned is commissioned


def test_a_comma_separated_file_without_bom_is_read():
    """A plain comma-separated file with the guide's column names is read."""
    clients = parse_clients(HEADER + f'1,{sim(1)},"{NZ}",1\n', [NZ])

    assert (clients.delimiter, clients.rows[0].communicator_type) == (",", NZ)


def test_bad_rows_are_reported_with_line_numbers_and_the_rest_is_read():
    """Each unreadable row names its line and what is wrong; the good rows still count."""
    text = (HEADER
            + f"1,{sim(1)},{NZ},yes\n"
            + "\n"                                      # line 3: blank, skipped
            + f'2,"{sim(2)}\nsecond line",{NZ},maybe\n'  # lines 4-5
            + f",{sim(3)},{NZ},yes\n"                   # line 6
            + f"4,{sim(4)}\n"                           # line 7
            + f"5,{sim(5)},Vodafone,yes\n"              # line 8
            + f"6,{sim(6)},vodafone,maybe\n"            # line 9
            + f"7,{sim(7)},,yes\n")                     # line 10

    clients = parse_clients(text, [NZ])

    assert [r.client_id for r in clients.rows] == ["1"]
    assert [(b.line, b.problem) for b in clients.bad_rows] == [
        (4, "commissioned is 'maybe'; expected yes/no, true/false or 1/0"),
        (6, "client_id is empty"),
        (7, "has 2 of the 4 columns (is a ',' missing?)"),
        (10, "communicator_type is empty"),
    ]
    assert clients.other_types == {"Vodafone": 1, "vodafone": 1}
    assert clients.read == 7


@pytest.mark.parametrize(("text", "says"), [
    ("", "is empty"),
    ("client_id,ref_no,commissioned\n1,2,yes\n", "no column communicator_type"),
    ("Client No;Client ID;Device Ref No;Communicator Type;Commissioned\n",
     "columns 1 and 2 are both client_id"),
])
def test_a_header_without_the_columns_stops_the_run(text: str, says: str):
    """A file without the four columns cannot be compared: a ToolError naming what is missing."""
    with pytest.raises(ToolError, match=says):
        parse_clients(text, [NZ])


@pytest.mark.parametrize(("data", "says"), [
    (b"\xff\xfec\x00", "UTF-16"),
    (HEADER.encode() + b"1,2,M2MOne NZ,yes\n3,\xe9,M2MOne NZ,no\n", r"not UTF-8 \(line 3\)"),
])
def test_a_file_that_is_not_utf8_stops_the_run(tmp_path: Path, data: bytes, says: str):
    """A file in another encoding is refused with the line where it goes wrong."""
    path = tmp_path / "clients.csv"
    path.write_bytes(data)

    with pytest.raises(ToolError, match=says):
        read_clients(path, [NZ])


def test_a_missing_file_stops_the_run(tmp_path: Path):
    """A clients file that cannot be opened is an error naming it."""
    with pytest.raises(ToolError, match="cannot read the clients file"):
        read_clients(tmp_path / "nope.csv", [NZ])


# --- classification ------------------------------------------------------------------------


def kinds(found: list[Mismatch]) -> dict[str, tuple[str, str | None, str | None]]:
    return {m.iccid: (m.kind.value, m.sim_status, m.client_id) for m in found}


def test_every_kind_is_found_and_agreeing_sims_are_not_reported():
    """Each kind is reported with its status and client; SIMs that agree are not."""
    sims = {sim(1): "ACTIVATED", sim(2): "DEACTIVATED", sim(3): "ACTIVATED",
            sim(4): "ACTIVATED", sim(5): "DEACTIVATED", sim(6): "ACTIVATION_READY",
            sim(7): "DEACTIVATED"}
    rows = [row("a", sim(1), True), row("b", sim(2), True), row("c", sim(3), False),
            row("d", sim(5), False), row("e", sim(6), True), row("f", sim(9), True),
            row("g", "12345", True), row("h", "", True), row("i", "", False)]

    found, counts = classify(NZ, sims, rows)

    assert kinds(found) == {
        sim(2): ("MONITORED_NOT_LIVE", "DEACTIVATED", "b"),
        sim(6): ("MONITORED_NOT_LIVE", "ACTIVATION_READY", "e"),
        sim(3): ("LIVE_NOT_MONITORED", "ACTIVATED", "c"),
        sim(4): ("LIVE_NOT_MONITORED", "ACTIVATED", None),
        sim(9): ("UNKNOWN_SIM", None, "f"),
        "12345": ("INVALID_ICCID", None, "g"),
        "": ("INVALID_ICCID", None, "h"),
    }
    assert (counts.sims, counts.activated, counts.rows, counts.iccids) == (7, 3, 9, 6)


def test_linked_areas_sharing_a_sim_need_only_one_commissioned_client():
    """A base and its areas share one SIM: live when any of them is commissioned."""
    sims = {sim(1): "ACTIVATED", sim(2): "DEACTIVATED", sim(3): "ACTIVATED"}
    rows = [row("base", sim(1), True), row("area-1", sim(1), False),
            row("area-2", sim(2), False), row("base-2", sim(2), True), row("area-3", sim(2), True),
            row("old-1", sim(3), False), row("old-2", sim(3), False)]

    found, counts = classify(NZ, sims, rows)

    assert [(m.iccid, m.kind, m.client_id, m.clients) for m in found] == [
        (sim(2), Kind.MONITORED_NOT_LIVE, "base-2", ("area-2", "base-2", "area-3")),
        (sim(3), Kind.LIVE_NOT_MONITORED, "old-1", ("old-1", "old-2")),
    ]
    assert counts.shared == 3


def test_an_iccid_gets_one_kind_and_typed_spaces_do_not_matter():
    """ICCIDs typed with spaces and dashes match; an ICCID is reported at most once."""
    typed = "8961 0185-00 0000 0000 01"
    found, _ = classify(NZ, {sim(1): "DEACTIVATED"},
                        [row("a", typed, True), row("b", sim(1), True), row("c", typed, False)])

    assert [(m.iccid, m.kind) for m in found] == [(sim(1), Kind.MONITORED_NOT_LIVE)]


def test_an_unknown_sim_of_a_decommissioned_client_is_reported_too():
    """UNKNOWN_SIM does not depend on commissioning; INVALID_ICCID groups one Ref No."""
    found, _ = classify(NZ, {}, [row("a", sim(1), False), row("b", "x1", False),
                                 row("c", "x1", True)])

    assert [(m.iccid, m.kind, m.client_id, m.clients) for m in found] == [
        (sim(1), Kind.UNKNOWN_SIM, "a", ("a",)),
        ("x1", Kind.INVALID_ICCID, "b", ("b", "c")),
    ]


def test_the_report_lists_houses_that_cannot_call_for_help_first():
    """Kinds in report order, then types in config order, then ICCIDs."""
    found = [Mismatch("3", Kind.INVALID_ICCID, NZ, None, "c"),
             Mismatch("2", Kind.LIVE_NOT_MONITORED, NZ, "ACTIVATED", None),
             Mismatch("9", Kind.MONITORED_NOT_LIVE, AU, "DEACTIVATED", "a"),
             Mismatch("8", Kind.MONITORED_NOT_LIVE, NZ, "DEACTIVATED", "b"),
             Mismatch("1", Kind.UNKNOWN_SIM, NZ, None, "d")]

    ordered = report_order(found, [NZ, AU])

    assert [m.iccid for m in ordered] == ["8", "9", "2", "1", "3"]


# --- output --------------------------------------------------------------------------------

FOUND = [Mismatch(sim(2), Kind.MONITORED_NOT_LIVE, NZ, "DEACTIVATED", "b", ("a", "b")),
         Mismatch(sim(4), Kind.LIVE_NOT_MONITORED, NZ, "ACTIVATED", None)]


def test_json_output_is_one_array_in_the_spec_shape():
    """--format json prints one array of objects with exactly the keys of the guide's
    section 7."""
    out = io.StringIO()
    write_report(FOUND, "json", out)

    assert json.loads(out.getvalue()) == [
        {"iccid": sim(2), "kind": "MONITORED_NOT_LIVE", "communicator_type": NZ,
         "sim_status": "DEACTIVATED", "client_id": "b"},
        {"iccid": sim(4), "kind": "LIVE_NOT_MONITORED", "communicator_type": NZ,
         "sim_status": "ACTIVATED", "client_id": None},
    ]


def test_csv_output_has_a_header_and_empty_cells_for_unknowns():
    """--format csv prints the same fields, empty where unknown."""
    out = io.StringIO()
    write_report(FOUND, "csv", out)

    assert out.getvalue().splitlines() == [
        "iccid,kind,communicator_type,sim_status,client_id",
        f"{sim(2)},MONITORED_NOT_LIVE,{NZ},DEACTIVATED,b",
        f"{sim(4)},LIVE_NOT_MONITORED,{NZ},ACTIVATED,",
    ]


def test_the_table_shows_linked_clients_and_sims_no_client_has():
    """The table names the client, how many linked areas share the SIM, or that none has it."""
    out = io.StringIO()
    write_report(FOUND, "table", out)
    empty = io.StringIO()
    write_report([], "table", empty)

    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["KIND", "COMMUNICATOR", "TYPE", "ICCID", "SIM", "STATUS",
                                "CLIENT"]
    assert lines[2].endswith("DEACTIVATED  b (+1 linked)")
    assert lines[3].endswith("ACTIVATED    - (no client has it)")
    assert empty.getvalue().startswith("Nothing to report")


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    """On a terminal the bar is redrawn in place; elsewhere a line at most every few s."""
    now = [0.0]
    tty, log = io.StringIO(), io.StringIO()
    bar = Progress(tty, "listing", tty=True)
    lines = Progress(log, "listing", tty=False, every_s=2.0, clock=lambda: now[0])

    for step in range(5):
        now[0] = step * 1.0
        bar.show(step / 4, f"page {step}")
        lines.show(step / 4, f"page {step}")
    bar.finish("done")
    lines.finish("done")

    assert tty.getvalue().count("\r") >= 5
    assert "[" + "#" * 24 + "]" in tty.getvalue()
    assert log.getvalue().splitlines() == ["listing: page 2", "listing: page 4", "listing: done"]


# --- listing -------------------------------------------------------------------------------


class FakeAccount:
    """Search Devices and Get Device Details of an account held in a dict."""

    def __init__(self, sims: Mapping[str, str], *, failures: list[JasperError] | None = None,
                 last_page_flag: bool = True) -> None:
        self.sims = dict(sims)
        self.failures = list(failures or [])
        self.last_page_flag = last_page_flag
        self.pages_asked: list[int] = []
        self.reads: list[str] = []

    async def search_devices(self, page_number: int, *, page_size: int = 50,
                             modified_since: str = "", status: str | None = None
                             ) -> dict[str, Any]:
        self.pages_asked.append(page_number)
        if self.failures:
            raise self.failures.pop(0)
        iccids = sorted(self.sims)
        start = (page_number - 1) * page_size
        page: dict[str, Any] = {"pageNumber": page_number, "devices": [
            {"iccid": i, "status": self.sims[i]} for i in iccids[start:start + page_size]]}
        if self.last_page_flag:
            page["lastPage"] = start + page_size >= len(iccids)
        return page

    async def get_device(self, iccid: str) -> dict[str, Any]:
        self.reads.append(iccid)
        if self.failures:
            raise self.failures.pop(0)
        return {"iccid": iccid, "status": self.sims[iccid]}


def account_sims(count: int) -> dict[str, str]:
    return {sim(n): "ACTIVATED" if n % 3 else "DEACTIVATED" for n in range(count)}


@pytest.mark.parametrize("window", [1, 3])
async def test_every_page_is_listed_up_to_a_full_last_page(settings: Settings, window: int):
    """All pages are read until lastPage (also on a full page); later pages are not used."""
    account = FakeAccount(account_sims(150))
    listing = Listing(settings.communicator_types[0])

    await list_sims(account, listing, settings.retry, window=window)

    assert listing.sims == account.sims
    assert (listing.pages, listing.done) == (3, True)
    assert sorted(account.pages_asked)[:3] == [1, 2, 3]
    assert len(account.pages_asked) <= 3 + window - 1


async def test_without_a_last_page_flag_a_short_page_ends_the_listing(settings: Settings):
    """An answer without lastPage ends at the first page shorter than 50."""
    account = FakeAccount(account_sims(120), last_page_flag=False)
    listing = Listing(settings.communicator_types[0])

    await list_sims(account, listing, settings.retry, window=1)

    assert (len(listing.sims), account.pages_asked) == (120, [1, 2, 3])


async def test_a_transient_failure_of_a_page_is_tried_again(settings: Settings):
    """A rate-limited or failed page is asked again within the retry budget."""
    account = FakeAccount(account_sims(60), failures=[
        JasperRetryable("40000029", "Rate limit exceeded", 429),
        JasperRetryable("30000001", "Unknown server error", 500)])
    listing = Listing(settings.communicator_types[0])

    await list_sims(account, listing, settings.retry, window=1)

    assert (len(listing.sims), account.pages_asked) == (60, [1, 1, 1, 2])


@pytest.mark.parametrize(("failures", "raised"), [
    ([JasperRetryable("30000001", "x", 500)] * 6, RetriesExhausted),
    ([CommunicatorMisconfigured("10000001", "Invalid credentials", 401)],
     CommunicatorMisconfigured),
    ([JasperRejected("10000030", "no access", 400)], JasperRejected),
])
async def test_a_page_that_keeps_failing_stops_the_listing(settings: Settings, failures, raised):
    """Retries run out, or an error that retrying cannot help: the type's listing fails."""
    account = FakeAccount(account_sims(60), failures=list(failures))
    listing = Listing(settings.communicator_types[0])

    with pytest.raises(raised):
        await list_sims(account, listing, settings.retry, window=2)

    assert not listing.done


async def test_a_device_without_iccid_is_an_unexpected_answer(settings: Settings):
    """A page whose devices lack an iccid or status stops the listing."""
    class Broken(FakeAccount):
        async def search_devices(self, page_number: int, **_: Any) -> dict[str, Any]:
            return {"pageNumber": 1, "lastPage": True, "devices": [{"status": "ACTIVATED"}]}

    with pytest.raises(JasperRejected, match="without an iccid"):
        await list_sims(Broken({}), Listing(settings.communicator_types[0]), settings.retry,
                        window=1)


# --- the whole comparison and exit codes ---------------------------------------------------


async def compare(settings: Settings, clients: ClientList, accounts: dict[str, FakeAccount]
                  ) -> Comparison:
    types = [ct for ct in settings.communicator_types if ct.name in accounts]
    return await reconcile.compare(settings, types, clients, dict(accounts),
                                   dict.fromkeys(accounts, 2), io.StringIO())


async def test_exit_0_when_all_agree(settings: Settings):
    """Every SIM agrees and every row was read: exit 0."""
    clients = parse_clients(HEADER + f"1,{sim(1)},{NZ},yes\n2,{sim(2)},{NZ},no\n", [NZ, AU])
    result = await compare(settings, clients, {NZ: FakeAccount(
        {sim(1): "ACTIVATED", sim(2): "DEACTIVATED"})})

    assert (result.found, reconcile.exit_status(result, clients)) == ([], 0)


async def test_exit_1_when_something_is_reported_or_a_row_is_bad(settings: Settings):
    """A mismatch, or only a row that could not be read, makes exit 1."""
    agree = {sim(1): "ACTIVATED"}
    bad_row = parse_clients(HEADER + f"1,{sim(1)},{NZ},yes\n2,{sim(2)},{NZ},perhaps\n", [NZ])
    mismatch = parse_clients(HEADER + f"1,{sim(1)},{NZ},no\n", [NZ])

    first = await compare(settings, bad_row, {NZ: FakeAccount(agree)})
    second = await compare(settings, mismatch, {NZ: FakeAccount(agree)})

    assert (first.found, reconcile.exit_status(first, bad_row)) == ([], 1)
    assert ([m.kind for m in second.found], reconcile.exit_status(second, mismatch)) == (
        [Kind.LIVE_NOT_MONITORED], 1)


async def test_exit_2_when_a_type_cannot_be_listed_and_it_is_left_out(settings: Settings):
    """A type whose listing fails is not compared (no half report) and the exit is 2."""
    clients = parse_clients(HEADER + f"1,{sim(1)},{NZ},yes\n2,{sim(2)},{AU},yes\n", [NZ, AU])
    result = await compare(settings, clients, {
        NZ: FakeAccount({sim(1): "DEACTIVATED"}),
        AU: FakeAccount({}, failures=[CommunicatorMisconfigured("10000001", "bad key", 401)])})

    assert [(m.communicator_type, m.kind) for m in result.found] == [
        (NZ, Kind.MONITORED_NOT_LIVE)]
    assert result.failed
    assert reconcile.exit_status(result, clients) == 2


async def test_an_unknown_communicator_type_or_format_is_an_error(settings: Settings,
                                                                  tmp_path: Path):
    """--communicator-type naming no configured type, or a bad --format, exits 2 saying why."""
    path = tmp_path / "clients.csv"
    path.write_text(HEADER, encoding="utf-8")
    err = io.StringIO()

    status = await reconcile.run(settings, reconcile.Options(path, "Telstra"), io.StringIO(), err)
    bad_format = await reconcile.run(settings, reconcile.Options(path, format="xml"),
                                     io.StringIO(), io.StringIO())

    assert (status, bad_format) == (2, 2)
    assert "communicator type 'Telstra' is not configured" in err.getvalue()


# --- --fix ---------------------------------------------------------------------------------


def test_the_fix_plan_leaves_what_fix_must_not_touch():
    """Activate MONITORED_NOT_LIVE, deactivate LIVE_NOT_MONITORED a client has, nothing else."""
    found = [Mismatch(sim(1), Kind.MONITORED_NOT_LIVE, NZ, "DEACTIVATED", "a", ("a",)),
             Mismatch(sim(2), Kind.LIVE_NOT_MONITORED, NZ, "ACTIVATED", "old-1",
                      ("old-1", "old-2")),
             Mismatch(sim(3), Kind.LIVE_NOT_MONITORED, NZ, "ACTIVATED", None),
             Mismatch(sim(4), Kind.UNKNOWN_SIM, NZ, None, "d", ("d",)),
             Mismatch("x", Kind.INVALID_ICCID, NZ, None, "e", ("e",))]

    planned = plan(found)

    assert [(f.mismatch.iccid, f.command, f.client_id) for f in planned] == [
        (sim(1), Command.ACTIVATE, "a"), (sim(2), Command.DEACTIVATE, "old-1")]
    assert planned[1].why == "none of its 2 clients is commissioned (old-1, old-2)"
    assert "old-1" in fixes.plan_table(planned)


def test_the_event_code_is_the_configs_for_the_command():
    """Fixes use the lowest event code the commands map gives the command."""
    commands = {65516: Command.ACTIVATE, 65517: Command.DEACTIVATE, 70001: Command.ACTIVATE}

    assert (event_code(Command.ACTIVATE, commands),
            event_code(Command.DEACTIVATE, commands)) == (65516, 65517)
    assert event_code(Command.DEACTIVATE, {65516: Command.ACTIVATE}) == 65516


class FakePublisher(EventPublisher):
    """Keeps the events instead of publishing them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.events: list[dict[str, Any]] = []

    async def publish(self, fix: Fix) -> str:
        event = self.event(fix)
        self.events.append(event)
        return str(event["event_id"])


async def test_fix_rereads_each_sim_and_skips_one_that_changed(settings: Settings):
    """A SIM whose status changed since the report is skipped; the rest get their event."""
    stale = Mismatch(sim(1), Kind.MONITORED_NOT_LIVE, NZ, "DEACTIVATED", "a", ("a",))
    still = Mismatch(sim(2), Kind.LIVE_NOT_MONITORED, NZ, "ACTIVATED", "b", ("b",))
    account = FakeAccount({sim(1): "ACTIVATED", sim(2): "ACTIVATED"})
    publisher = FakePublisher(settings)
    summary = FixSummary()

    await fixes.apply(plan([stale, still]), {NZ: account}, publisher, settings, summary,
                      io.StringIO())

    assert account.reads == [sim(1), sim(2)]
    assert [(f.mismatch.iccid, now) for f, now in summary.changed] == [(sim(1), "ACTIVATED")]
    event = publisher.events[0]
    assert {k: v for k, v in event.items() if k not in ("event_id", "occurred_at")} == {
        "event_code": 65517, "client_id": "b", "command": "deactivate", "origin": "reconcile",
        "device": {"ref_no": sim(2), "communicator_type": NZ}}
    assert [e for _, e in summary.published] == [event["event_id"]]


async def test_fix_skips_a_sim_it_cannot_reread(settings: Settings):
    """A SIM whose status cannot be read again gets no event, and says why."""
    fix = plan([Mismatch(sim(1), Kind.MONITORED_NOT_LIVE, NZ, "DEACTIVATED", "a", ("a",))])
    account = FakeAccount({}, failures=[JasperRejected("20000001", "Resource not found", 404)])
    publisher = FakePublisher(settings)
    summary = FixSummary()
    err = io.StringIO()

    await fixes.apply(fix, {NZ: account}, publisher, settings, summary, err)
    fixes.print_fixes(summary, err)

    assert (publisher.events, len(summary.failed)) == ([], 1)
    assert "could not read its status" in err.getvalue()


async def test_asking_reads_the_answer_from_stdin():
    """The question goes to stderr; only y or yes (any case) is a yes."""
    err = io.StringIO()

    yes = await reconcile.ask("Publish?", stdin=io.StringIO("Yes\n"), err=err)
    no = await reconcile.ask("Publish?", stdin=io.StringIO("\n"), err=err)

    assert (yes, no) == (True, False)
    assert err.getvalue().startswith("Publish? [y/N]")
