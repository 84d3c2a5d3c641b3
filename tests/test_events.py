import json
from typing import Any

import pytest

from jasper_consumer.config import Settings, parse_settings
from jasper_consumer.errors import UnreadableMessage
from jasper_consumer.events import Rejected, normalise_iccid, parse_event

ICCID = "89610185002345678901"


@pytest.fixture
def settings() -> Settings:
    return parse_settings({"communicator_types": [{
        "name": "M2MOne NZ", "server_address": "https://j.example/rws/api/v1",
        "username": "u", "api_key": "k"}]}, {})


def event(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event_id": "e-1", "event_code": 65516, "client_id": "100234",
        "occurred_at": "2026-11-25T10:15:00Z",
        "device": {"ref_no": ICCID, "communicator_type": "M2MOne NZ"},
    }
    body.update(overrides)
    return body


def encode(body: Any) -> bytes:
    return json.dumps(body).encode()


def test_event_becomes_a_job(settings: Settings):
    """A valid commission becomes an activate job with the ICCID normalised."""
    job = parse_event(encode(event(device={"ref_no": "8961 0185-0023 4567 8901",
                                           "communicator_type": "M2MOne NZ"},
                                   extra_field=1)), settings)
    assert (job.command, job.iccid, job.client_id) == ("activate", ICCID, "100234")


@pytest.mark.parametrize("ref_no", [ICCID + "\n", ICCID + "\r\n", "\n" + ICCID, ICCID + " "])
def test_whitespace_around_an_iccid_is_removed(settings: Settings, ref_no: str):
    """An ICCID with a line break or space around it is the same ICCID as without (the
    same SIM, so the same lane and the same order), not one of its own."""
    job = parse_event(encode(event(device={"ref_no": ref_no,
                                           "communicator_type": "M2MOne NZ"})), settings)

    assert job.iccid == ICCID


def test_explicit_command_wins(settings: Settings):
    """A message naming its command overrides the commands map."""
    assert parse_event(encode(event(command="deactivate")), settings).command == "deactivate"


@pytest.mark.parametrize(
    "ref_no", ["8961018500234567", "8961018500234567890123456", "89610185X0234567890"]
)
def test_invalid_iccid(ref_no: str):
    """Anything but 18 to 22 digits after removing spaces and dashes is INVALID_ICCID."""
    with pytest.raises(Exception, match="INVALID_ICCID"):
        normalise_iccid(ref_no)


def test_iccid_failing_luhn_is_accepted():
    """Prefix and Luhn digit are not checked: Control Center accepts such ICCIDs."""
    assert normalise_iccid("123456789012345678") == "123456789012345678"


@pytest.mark.parametrize(
    ("body", "code", "names"),
    [
        (event(event_id=None), "INVALID_EVENT", "event_id"),
        (event(event_code="65516"), "INVALID_EVENT", "event_code"),
        ({k: v for k, v in event().items() if k != "device"}, "INVALID_EVENT", "device"),
        (event(device={"communicator_type": "M2MOne NZ"}), "MISSING_ICCID", "Ref No"),
        (event(device={"ref_no": "  ", "communicator_type": "M2MOne NZ"}), "MISSING_ICCID", ""),
        (event(device={"ref_no": "12", "communicator_type": "M2MOne NZ"}), "INVALID_ICCID", "'12'"),
        (event(device={"ref_no": ICCID, "communicator_type": "Telstra"}),
         "UNKNOWN_COMMUNICATOR_TYPE", "'Telstra'"),
        (event(event_code=1234), "UNKNOWN_EVENT_CODE", "1234"),
        (event(command="reboot"), "INVALID_EVENT", "command"),
    ],
)
def test_local_failures(settings: Settings, body: dict[str, Any], code: str, names: str):
    """Events that cannot succeed are rejected with their code and a message naming the problem."""
    with pytest.raises(Rejected) as info:
        parse_event(encode(body), settings)
    assert info.value.code == code
    assert names in info.value.message
    assert info.value.partial.client_id == "100234"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "not an object"),
        (encode({"event_id": "x"}), "no client_id"),
        (encode(event(client_id=42)), "no client_id"),
        (b"{" + b" " * 70000 + b"}", "exceeds max_message_bytes"),
    ],
)
def test_unreadable_messages(settings: Settings, body: bytes, reason: str):
    """Messages that are not events at all are unreadable, with the reason."""
    with pytest.raises(UnreadableMessage, match=reason):
        parse_event(body, settings)


def test_origin_travels_with_the_job(settings: Settings):
    """An event's origin is kept on its job and in the event rebuilt for replay."""
    job = parse_event(encode(event(origin="reconcile")), settings)

    assert job.origin == "reconcile"
    assert job.to_event()["origin"] == "reconcile"
    assert "origin" not in parse_event(encode(event()), settings).to_event()


@pytest.mark.parametrize("origin", ["Reconcile", "", "x" * 33, "re concile", "recon\n", 7])
def test_a_bad_origin_is_an_invalid_event(settings: Settings, origin: Any):
    """An origin that is not 1 to 32 of a-z, 0-9, _ and - is INVALID_EVENT naming the field."""
    with pytest.raises(Rejected) as info:
        parse_event(encode(event(origin=origin)), settings)

    assert info.value.code == "INVALID_EVENT"
    assert "'origin'" in info.value.message
    assert info.value.partial.origin is None
