"""JSON Schemas of the messages this service exchanges, generated from its pydantic models.

=============================  ===================================================
``event.schema.json``          a system event, as producers publish it (SPEC §3);
                               also the body of a ``RETRIES_EXHAUSTED`` dead letter
``signal.schema.json``         a result signal on the history exchange (SPEC §4)
=============================  ===================================================

They are JSON Schema draft-07 (AsyncAPI 3.0 reads it as
``application/schema+json;version=draft-07``) and live in ``docs/schemas/``, where
``docs/asyncapi.yaml`` refers to them. ``python -m jasper_consumer.tools.schemas`` (``make
schemas``) rewrites them; ``--check`` exits 1 when they differ from the models, and a
test does the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from ..events import Event
from ..signals import Signal

DRAFT_07 = "http://json-schema.org/draft-07/schema#"
DEFAULT_DIR = Path("docs/schemas")

_EVENT_FIELDS = {
    None: {
        "event_id": "Unique id of the event; also the AMQP message_id. Its signals carry it as "
                    "event_id and as correlation_id.",
        "event_code": "Patriot system event code: 65516 Client Commissioned, 65517 Client "
                      "Decommissioned (the service's `commands` map says which codes it "
                      "handles).",
        "client_id": "The Patriot client the event belongs to: the signal goes to its history.",
        "occurred_at": "When Patriot raised the event (RFC 3339).",
        "device": "The client's add-on device that holds the SIM.",
        "command": "What to do with the SIM; when present it overrides the command the "
                   "service maps event_code to.",
        "origin": "Who raised the event when it was not an operator's click, as a short word "
                  "(1 to 32 of a-z, 0-9, _ and -), e.g. reconcile; the signal's text then ends "
                  "with it in brackets. Anything else fails the event with INVALID_EVENT.",
    },
    "Device": {
        "ref_no": "The Device Ref No: the SIM's ICCID. Spaces and dashes are removed, then 18 "
                  "to 22 digits must remain (else INVALID_ICCID); missing or empty fails the "
                  "event with MISSING_ICCID. No API call is made in either case.",
        "communicator_type": "The name of the Jasper communicator type (Control Center "
                             "account) the SIM belongs to, exactly as configured.",
    },
}

_SIGNAL_FIELDS = {
    None: {
        "event_id": "The event's id (also the message's correlation_id); null only when the "
                    "event had none.",
        "client_id": "The Patriot client whose history the signal belongs to.",
        "event_code": "The event's code, when it could be read.",
        "command": "What was (or was to be) done with the SIM, when it is known.",
        "iccid": "The SIM's ICCID, normalised (digits only), when the event had one.",
        "communicator_type": "The communicator type named by the event.",
        "outcome": "succeeded or failed: the event's final signal (routing key "
                   "jasper.succeeded / jasper.failed); delayed: an interim signal while the "
                   "communicator type is paused (jasper.delayed).",
        "sim_status": "The SIM's status after a success; on failure null or the last known "
                      "status.",
        "error": "Why it failed or is delayed; null on success.",
        "attempts": "Jasper API calls made for this event (0 when none was needed).",
        "completed_at": "When the signal was made (RFC 3339, UTC).",
        "duration_ms": "Time from receiving the message to the signal, in milliseconds.",
        "text": "The one line an operator reads in the client's history.",
    },
    "SignalError": {
        "code": "The Jasper error code (8 digits, e.g. 20000001) or one of the service's own "
                "codes (upper-case words joined by _, e.g. MISSING_ICCID).",
        "http_status": "The HTTP status of Control Center's answer; null when no answer came.",
        "message": "The code's documented meaning, or what went wrong, for an operator.",
        "retryable": "true when trying again later can help (always true for delayed).",
    },
}


@dataclass(frozen=True)
class _Spec:
    model: type[BaseModel]
    mode: Literal["validation", "serialization"]
    title: str
    description: str
    fields: Mapping[str | None, Mapping[str, str]]


SCHEMAS: dict[str, _Spec] = {
    "event.schema.json": _Spec(
        Event, "validation", "System event",
        "A Patriot system event (65516 Client Commissioned, 65517 Client Decommissioned) as "
        "a producer publishes it to the events exchange with routing key event.<code>; "
        "content_type application/json, persistent, message_id = event_id. Unknown extra "
        "fields are ignored.",
        _EVENT_FIELDS),
    "signal.schema.json": _Spec(
        Signal, "serialization", "Result signal",
        "What became of an event, for the client's history: published to the history "
        "exchange with routing key jasper.<outcome>, persistent, correlation_id = event_id. "
        "Every field is always present; consumers should ignore fields they do not know.",
        _SIGNAL_FIELDS),
}


def _describe(node: dict[str, Any], descriptions: Mapping[str, str], where: str) -> None:
    properties = node["properties"]
    unknown = set(descriptions) - set(properties)
    if unknown:
        raise ValueError(f"{where}: described fields not in the model: {sorted(unknown)}")
    for name, prop in properties.items():
        prop.pop("title", None)  # "Event Id": noise next to the description
        if name not in descriptions:
            continue
        if "$ref" in prop:  # draft-07 ignores keywords beside $ref: wrap it
            prop["allOf"] = [{"$ref": prop.pop("$ref")}]
        prop["description"] = descriptions[name]


def build(spec: _Spec) -> dict[str, Any]:
    """One schema: the model's, in draft-07 form, with titles and descriptions."""
    raw = spec.model.model_json_schema(mode=spec.mode, ref_template="#/definitions/{model}")
    definitions: dict[str, Any] = raw.pop("$defs", {})
    for name, fields in spec.fields.items():
        node = raw if name is None else definitions[name]
        _describe(node, fields, f"{spec.model.__name__}.{name or ''}")
    if spec.mode == "serialization":  # the service always writes every field
        for node in [raw, *definitions.values()]:
            if "properties" in node:
                node["required"] = list(node["properties"])
    raw.pop("title", None)
    raw.pop("description", None)
    schema: dict[str, Any] = {"$schema": DRAFT_07, "title": spec.title,
                              "description": spec.description, **raw}
    if definitions:
        schema["definitions"] = definitions
    return schema


def render() -> dict[str, str]:
    """File name -> file text of every schema."""
    return {name: json.dumps(build(spec), indent=2, ensure_ascii=False) + "\n"
            for name, spec in SCHEMAS.items()}


def stale(directory: Path) -> list[str]:
    """The schema files in ``directory`` that are missing or differ from the models."""
    out = []
    for name, text in render().items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            out.append(name)
    return out


def write(directory: Path) -> list[str]:
    """(Re)write the schema files that changed; return their names."""
    directory.mkdir(parents=True, exist_ok=True)
    changed = stale(directory)
    texts = render()
    for name in changed:
        (directory / name).write_text(texts[name], encoding="utf-8")
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jasper_consumer.tools.schemas",
                                     description="Write the message JSON Schemas.")
    parser.add_argument("directory", nargs="?", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if any file is stale")
    args = parser.parse_args(argv)
    if args.check:
        names = stale(args.directory)
        for name in names:
            print(f"{args.directory / name} is stale: run `make schemas`", file=sys.stderr)
        return 1 if names else 0
    for name in write(args.directory):
        print(f"wrote {args.directory / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
