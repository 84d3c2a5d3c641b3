"""The published contract: JSON Schemas from the models, and docs/asyncapi.yaml."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from jasper_consumer import signals
from jasper_consumer.config import Command
from jasper_consumer.events import Job, Partial
from jasper_consumer.signals import SignalError
from jasper_consumer.tools import schemas

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def load_schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((DOCS / "schemas" / name).read_text(encoding="utf-8"))
    return schema


def validator(name: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(load_schema(name),
                                      format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


@pytest.fixture(scope="module")
def asyncapi() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DOCS / "asyncapi.yaml").read_text(encoding="utf-8"))
    return doc


def resolve(doc: dict[str, Any], node: Any) -> Any:
    """Follow a ``$ref`` inside the document or to a file beside it."""
    while isinstance(node, dict) and set(node) == {"$ref"}:
        ref = node["$ref"]
        if ref.startswith("#/"):
            node = doc
            for part in ref[2:].split("/"):
                node = node[part]
        else:
            node = json.loads((DOCS / ref).read_text(encoding="utf-8"))
    return node


def message_schema(doc: dict[str, Any], part: Any) -> dict[str, Any]:
    """A message's payload or headers schema, unwrapped from a multi-format schema object."""
    part = resolve(doc, part)
    if isinstance(part, dict) and "schemaFormat" in part:
        assert part["schemaFormat"] == "application/schema+json;version=draft-07"
        part = resolve(doc, part["schema"])
    assert isinstance(part, dict)
    return part


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def test_schema_files_are_up_to_date() -> None:
    """docs/schemas/ holds exactly what the models generate (run `make schemas` if not)."""
    assert schemas.stale(DOCS / "schemas") == [], "stale: run `make schemas`"


@pytest.mark.parametrize("name", sorted(schemas.SCHEMAS))
def test_schemas_are_valid_draft_07(name: str) -> None:
    """Each generated schema is a valid draft-07 schema with every field described."""
    schema = load_schema(name)
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["$schema"] == schemas.DRAFT_07
    assert all("description" in p for p in schema["properties"].values())


def test_event_schema_requires_what_the_service_requires() -> None:
    """An event without client_id, or with a string event_code, is invalid; extra fields are not."""
    check = validator("event.schema.json")
    event = {"event_id": "e1", "event_code": 65516, "client_id": "100234",
             "device": {"ref_no": "89610185002345678901", "communicator_type": "M2MOne NZ"},
             "producer_note": "extra fields are allowed"}
    check.validate(event)
    assert not check.is_valid({k: v for k, v in event.items() if k != "client_id"})
    assert not check.is_valid({**event, "event_code": "65516"})
    assert not check.is_valid({**event, "command": "reboot"})


def test_signals_the_service_makes_match_the_schema() -> None:
    """Succeeded, failed and delayed signals, as serialised, are valid under the schema."""
    job = Job(event_id="e1", event_code=65516, client_id="100234", command=Command.ACTIVATE,
              iccid="89610185002345678901", communicator_type="M2MOne NZ",
              occurred_at=datetime(2026, 11, 25, 10, 15, tzinfo=UTC))
    error = SignalError(code="10000001", http_status=401, message="Invalid credentials",
                        retryable=True)
    made = [
        signals.succeeded(job, "ACTIVATED", 1, 12.5),
        signals.failed(job, error, 1, 3.0),
        signals.failed(Partial(client_id="100234"),
                       SignalError(code="MISSING_ICCID", message="no ICCID"), 0, 0.1),
        signals.delayed(job, error, 1, 0.0),
    ]
    check = validator("signal.schema.json")
    for signal in made:
        check.validate(json.loads(signal.model_dump_json()))


def test_asyncapi_document_is_well_formed(asyncapi: dict[str, Any]) -> None:
    """AsyncAPI 3.0 with every $ref resolving, channels and operations in place."""
    assert asyncapi["asyncapi"] == "3.0.0"
    for ref in set(refs(asyncapi)):
        assert resolve(asyncapi, {"$ref": ref}) is not None, ref
    assert set(asyncapi["channels"]) == {"systemEvents", "resultSignals", "historyQueue",
                                         "deadLetters"}
    for name, operation in asyncapi["operations"].items():
        assert operation["action"] in ("send", "receive"), name
        channel = resolve(asyncapi, operation["channel"])
        for message in operation["messages"]:
            assert resolve(asyncapi, message) in [
                resolve(asyncapi, m) for m in channel["messages"].values()], name


def test_asyncapi_examples_match_their_schemas(asyncapi: dict[str, Any]) -> None:
    """Every message's payload and headers schemas are valid, and so is every example."""
    checked = 0
    for name, message in asyncapi["components"]["messages"].items():
        payload = message_schema(asyncapi, message["payload"])
        headers = message_schema(asyncapi, message["headers"]) if "headers" in message else None
        jsonschema.Draft7Validator.check_schema(payload)
        if headers is not None:
            jsonschema.Draft7Validator.check_schema(headers)
            assert headers["type"] == "object", name
        assert message["examples"], f"{name} has no example"
        for example in message["examples"]:
            jsonschema.Draft7Validator(
                payload, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
            ).validate(example["payload"])
            if headers is not None:
                jsonschema.Draft7Validator(headers).validate(example.get("headers", {}))
            checked += 1
    assert checked >= 8
