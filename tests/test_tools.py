"""Operator tools without a broker: wording, tables, reading dead letters, progress, CLI."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from jasper_consumer import cli, errors
from jasper_consumer.config import Settings, parse_settings
from jasper_consumer.errors import (
    CommunicatorMisconfigured,
    JasperRejected,
    JasperRetryable,
    JasperUnreachable,
)
from jasper_consumer.tools import ToolError, reach
from jasper_consumer.tools.check import explain, sim_table
from jasper_consumer.tools.deadletters import Listing, format_age, print_listing, read, reason_of
from jasper_consumer.tools.progress import Progress
from jasper_consumer.tools.replay import ReplaySummary, print_summary
from jasper_consumer.tools.tables import render_table

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
EVENT_ID = "c7d0a7a2-5b0e-4c53-8a55-1f0c3c1e9b11"
EVENT: dict[str, Any] = {
    "event_id": EVENT_ID, "event_code": 65516,
    "client_id": "100234", "occurred_at": "2026-11-25T10:15:00Z",
    "device": {"ref_no": "89610185002345678901", "communicator_type": "M2MOne NZ"},
}


@pytest.fixture
def settings() -> Settings:
    return parse_settings({"communicator_types": [{
        "name": "M2MOne NZ", "server_address": "http://127.0.0.1:1/rws/api/v1",
        "username": "u", "api_key": "k"}]}, {})


def test_invalid_credentials_are_explained_with_what_to_check() -> None:
    """10000001 reads as the issue asks: meaning, code, and what to check."""
    err = CommunicatorMisconfigured("10000001", errors.JASPER_ERROR_MEANINGS["10000001"], 401)

    assert f"M2MOne NZ: {explain(err)}" == (
        "M2MOne NZ: invalid credentials (10000001) — check the user name and API key, "
        "and that this host's IP is allowed")


def test_own_codes_keep_their_detail() -> None:
    """An unreachable host or an odd answer keeps the detail of what happened."""
    unreachable = explain(JasperUnreachable("connection refused by 127.0.0.1:1"))
    odd = explain(JasperRejected(errors.UNEXPECTED_RESPONSE,
                                 "unexpected HTTP 404 answer (text/html, 9 bytes)", 404))

    assert unreachable.startswith("Control Center unreachable: connection refused by "
                                  "127.0.0.1:1 (JASPER_UNREACHABLE) — check server_address")
    assert "unexpected HTTP 404 answer" in odd
    assert "(UNEXPECTED_RESPONSE) — server_address may not point" in odd


def test_undocumented_code_falls_back_to_its_message() -> None:
    """A code without advice shows Control Center's message and the code."""
    assert explain(JasperRetryable("19999999", "Something odd", 400)) == \
        "Something odd (19999999)"


@pytest.mark.parametrize("code", sorted(errors.PAUSE_CODES))
def test_every_pausing_code_has_advice(code: str) -> None:
    """Each code that pauses a communicator type says what to check."""
    assert " — " in explain(CommunicatorMisconfigured(code, "x", 400))


def test_render_table_aligns_and_cuts() -> None:
    """Columns line up under a rule; a cell over its limit is cut with an ellipsis."""
    text = render_table(["A", "LONGER"], [["x", "abcdefghij"], ["yyy", "k\nl"]],
                        max_widths={1: 5})

    assert text.splitlines() == [
        "A    LONGER",
        "---  ------",
        "x    abcd…",
        "yyy  k l",
    ]


def test_sim_table_shows_main_fields_and_the_status_meaning() -> None:
    """sim-status shows the known fields in order, skips empty ones, explains the status."""
    text = sim_table({"iccid": "8961", "status": "DEACTIVATED", "ratePlan": "10MB",
                      "dateActivated": None, "accountCustom1": "hidden"})

    lines = text.splitlines()
    assert lines[2].split() == ["ICCID", "8961"]
    assert lines[3].startswith("Status")
    assert "DEACTIVATED — off: the SIM cannot connect" in lines[3]
    assert "Rate plan" in lines[4]
    assert "Date activated" not in text
    assert "hidden" not in text


def test_reason_comes_from_our_header_or_the_brokers() -> None:
    """x-jasper-error wins (with the last error); else the broker's delivery limit, with
    the queue where x-death names it."""
    assert reason_of({"x-jasper-error": "RETRIES_EXHAUSTED",
                      "x-jasper-last-error": "30000001"}) == \
        "RETRIES_EXHAUSTED (last error 30000001)"
    assert reason_of({"x-death": [{"reason": "delivery_limit", "queue": "p.events"}]}) == \
        "delivery limit in p.events"
    assert reason_of({}) == "delivery limit (dead-lettered by the broker)"


@pytest.mark.parametrize("body", [
    {"event_id": "e-9", "event_code": 65517, "client_id": "100234", "command": "deactivate",
     "iccid": "89610185002345678901", "communicator_type": "M2MOne NZ", "occurred_at": None},
    EVENT,
    {**EVENT, "event_code": "65516"},
], ids=["job", "event", "event-with-a-text-code"])
def test_a_broker_dead_letter_reads_and_replays_without_x_death(settings: Settings,
                                                               body: dict[str, Any]) -> None:
    """Without x-death (RabbitMQ 4 keeps other records) a dead letter still has a reason
    and replays to its event's routing key."""
    letter = read(1, json.dumps(body).encode(), {}, None, None, settings)

    assert letter.reason == "delivery limit (dead-lettered by the broker)"
    assert letter.replay is not None
    assert letter.replay.routing_key == f"event.{int(body['event_code'])}"


def test_an_exhausted_event_reads_as_replayable(settings: Settings) -> None:
    """A RETRIES_EXHAUSTED copy shows its client and event and replays as is."""
    body = json.dumps(EVENT).encode()
    letter = read(3, body, {"x-jasper-error": "RETRIES_EXHAUSTED"}, EVENT_ID,
                  NOW - timedelta(minutes=5), settings)

    assert (letter.position, letter.client_id, letter.event_id) == \
        (3, "100234", EVENT_ID)
    assert letter.age(NOW) == "5m"
    assert letter.replay is not None
    assert (letter.replay.routing_key, letter.replay.body) == ("event.65516", body)


@pytest.mark.parametrize(("body", "why"), [
    (b"not json", "not an event: body is not JSON"),
    (b"\xff\xfe", "not an event: body is not UTF-8"),
    (b'{"event_id": "x"}', "not an event: event has no client_id"),
])
def test_unreadable_bodies_are_not_replayable(settings: Settings, body: bytes, why: str) -> None:
    """What the router could not read is shown, with why it will not be replayed."""
    letter = read(1, body, {"x-jasper-error": "whatever"}, "m-1", None, settings)

    assert letter.replay is None
    assert letter.not_replayable is not None
    assert letter.not_replayable.startswith(why)
    assert letter.event_id == ("x" if b"event_id" in body else "m-1")
    assert letter.age(NOW) == "?"


def test_a_work_item_replays_as_its_event(settings: Settings) -> None:
    """A job the broker dead-lettered from a work queue goes back as the event it came from."""
    job = {"event_id": "e-9", "event_code": 65517, "client_id": "100234",
           "command": "deactivate", "iccid": "89610185002345678901",
           "communicator_type": "M2MOne NZ", "occurred_at": None}
    death = {"reason": "delivery_limit", "queue": "p.work.m2mone-nz", "time": NOW}
    letter = read(1, json.dumps(job).encode(), {"x-death": [death]}, "e-9", None, settings)

    assert letter.replay is not None
    assert letter.replay.routing_key == "event.65517"
    assert json.loads(letter.replay.body) == {
        "event_id": "e-9", "event_code": 65517, "client_id": "100234", "occurred_at": None,
        "device": {"ref_no": "89610185002345678901", "communicator_type": "M2MOne NZ"},
        "command": "deactivate"}
    assert letter.dead_lettered_at == NOW
    assert letter.reason == "delivery limit in p.work.m2mone-nz"


def test_an_event_without_a_code_routes_by_the_brokers_record(settings: Settings) -> None:
    """An event with no usable event_code routes by the key x-death kept, else not at all."""
    event: dict[str, Any] = {**EVENT, "event_code": "sixty-five"}
    death = {"reason": "delivery_limit", "routing-keys": ["event.65516"]}

    routed = read(1, json.dumps(event).encode(), {"x-death": [death]}, None, None, settings)
    lost = read(1, json.dumps(event).encode(), {"x-jasper-error": "x"}, None, None, settings)

    assert routed.replay is not None
    assert routed.replay.routing_key == "event.65516"
    assert lost.replay is None
    assert lost.not_replayable == "no event_code to route it by"


@pytest.mark.parametrize(("seconds", "shown"), [
    (0, "0s"), (59, "59s"), (60, "1m"), (3599, "59m"), (7200, "2h"), (3 * 86400 + 5, "3d"),
])
def test_format_age(seconds: int, shown: str) -> None:
    """Ages read in the largest whole unit."""
    assert format_age(timedelta(seconds=seconds)) == shown


def test_listing_prints_a_table_and_what_was_left_out(settings: Settings) -> None:
    """The list output names the queue, the total, the rows, and the limit that cut it."""
    letters = [read(1, b"nope", {"x-jasper-error": "body is not JSON"}, None, NOW, settings),
               read(2, json.dumps(EVENT).encode(), {"x-jasper-error": "RETRIES_EXHAUSTED"},
                    EVENT_ID, NOW - timedelta(hours=2), settings)]
    out = io.StringIO()

    print_listing(Listing("p.dead", total=5, matched=3, letters=letters), out, reason=None,
                  limit=2, now=NOW)

    lines = out.getvalue().splitlines()
    assert lines[0] == "p.dead: 5 dead letter(s)"
    assert lines[1].split() == ["#", "AGE", "REASON", "CLIENT", "EVENT", "ID", "REPLAY"]
    assert lines[3].split()[:2] == ["1", "0s"]
    assert lines[3].endswith("no")
    assert lines[4].split()[:2] == ["2", "2h"]
    assert "100234" in lines[4]
    assert lines[5] == "showing 2 of 3 (--limit 2; raise it to see more)"
    assert "1 shown are not events" in lines[6]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_without_a_terminal_prints_plain_periodic_lines() -> None:
    """Off a terminal, progress is a plain line at most every every_s seconds, and at the end."""
    out, clock = io.StringIO(), Clock()
    progress = Progress(out, "replay", every_s=2.0, clock=clock)
    summary = ReplaySummary("p.dead", "p.events", total=10)
    for n in range(1, 11):
        clock.now = n * 0.5
        summary.seen = summary.replayed = n
        progress.show(summary.fraction, summary.progress_text)
    progress.finish(summary.progress_text)

    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines == [
        "replay: 4/10  replayed 4  skipped 0",
        "replay: 8/10  replayed 8  skipped 0",
        "replay: 10/10  replayed 10  skipped 0",
    ]


def test_progress_on_a_terminal_redraws_a_bar() -> None:
    """On a terminal, progress redraws one line with a bar; at the end a plain line
    takes its place."""
    out = io.StringIO()
    progress = Progress(out, "replay", tty=True, width=10)
    summary = ReplaySummary("p.dead", "p.events", total=4, seen=1, replayed=1)
    progress.show(summary.fraction, summary.progress_text)
    summary.seen = 4
    progress.finish(summary.progress_text)

    bar = "replay [##--------] 1/4  replayed 1  skipped 0"
    assert out.getvalue() == (f"\r{bar}\r{' ' * len(bar)}\r"
                              "replay: 4/4  replayed 1  skipped 3\n")


def test_summary_counts_and_exit_status() -> None:
    """The summary says what was replayed, skipped and left; unroutable copies fail the run."""
    summary = ReplaySummary("p.dead", "p.events", total=7, seen=7, replayed=3, not_events=1,
                            not_matching=1, not_reached=1, unroutable=1,
                            routing_keys={"event.65516"})
    out = io.StringIO()

    status = print_summary(summary, out, reason="RETRIES", limit=4)

    assert out.getvalue().splitlines() == [
        "replayed 3 of 7 dead letter(s) to p.events (event.65516)",
        "skipped 1 that are not events (see `dead-letters list`)",
        "skipped 1 not matching --reason 'RETRIES'",
        "skipped 1 beyond --limit 4",
        "skipped 1 the broker could not route (no queue bound for their event code: is the "
        "service's events queue declared?)",
        "left in p.dead: 4",
    ]
    assert status == 1


def test_parser_keeps_publish_command_and_adds_the_tools() -> None:
    """publish --command still parses next to the new subcommands' options."""
    parser = cli.build_parser()

    publish = parser.parse_args(["publish", "--event", "65516", "--client-id", "1", "--iccid",
                                 "8961", "--communicator-type", "NZ", "--command", "activate"])
    status = parser.parse_args(["sim-status", "--communicator-type", "NZ", "8961", "--json"])
    replay = parser.parse_args(["dead-letters", "replay", "--reason", "RETRIES", "--limit", "5"])

    assert (publish.cmd, publish.command) == ("publish", "activate")
    assert (status.cmd, status.iccid, status.json) == ("sim-status", "8961", True)
    assert (replay.cmd, replay.dead_cmd, replay.reason, replay.limit) == \
        ("dead-letters", "replay", "RETRIES", 5)
    with pytest.raises(SystemExit):
        parser.parse_args(["dead-letters", "replay", "--limit", "0"])


async def test_a_broker_that_does_not_answer_is_named_without_its_password() -> None:
    """A tool that cannot connect names the broker and says why, without the password."""
    url = "amqp://jasper:s3cret-pw@127.0.0.1:1/"  # nothing listens on port 1
    settings = parse_settings({"amqp_url": url, "communicator_types": [{
        "name": "M2MOne NZ", "server_address": "http://127.0.0.1:1/rws/api/v1",
        "username": "u", "api_key": "k"}]}, {})

    with pytest.raises(ToolError) as caught:
        await reach.connect(settings)

    assert str(caught.value).startswith("cannot connect: RabbitMQ at 127.0.0.1:1")
    assert "refused" in str(caught.value)
    assert "s3cret-pw" not in str(caught.value)
