"""JSON Schemas of the messages this service exchanges, generated from its pydantic models.

=============================  ===================================================
``event.schema.json``          a system event, as producers publish it (docs/asyncapi.yaml);
                               also the body of a ``RETRIES_EXHAUSTED`` dead letter
``signal.schema.json``         a result signal on the history exchange (docs/asyncapi.yaml)
``status.schema.json``         ``GET /status.json``: the status page's facts
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
from ..status import StatusReport

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


_LANES = "per lane: interactive (a technician waits) and bulk"
_STATUS_FIELDS = {
    None: {
        "queue_prefix": "The deployment's queue_prefix.",
        "generated_at": "When the serving process built these facts.",
        "served_by": "The process that answered this request.",
        "broker_connected": "false when the serving process could not publish its report "
                            "to RabbitMQ at its last try: it then sees no other process.",
        "refresh_seconds": "How often the HTML page reloads itself.",
        "facts_ttl_seconds": "A process not heard from for longer counts as gone; an owner's "
                             "facts are never older than this.",
        "dead_letters": "Messages in <queue_prefix>.dead (all types); null when unknown.",
        "processes": "Every service process heard from within facts_ttl_seconds.",
        "communicator_types": "One entry per configured communicator type, in config order.",
    },
    "TypeStatus": {
        "name": "The communicator type's name, as configured.",
        "state": "running; paused (see pause); no_owner (no process has reported owning it "
                 "within facts_ttl_seconds).",
        "attention": "What needs a look, in words (empty when nothing): paused, backlog "
                     "growing, no owner for N s.",
        "owner": "The process consuming the type's work queue (the only one that calls its "
                 "Control Center account); null when there is none.",
        "facts_age_s": "Seconds since the owner collected the facts shown.",
        "no_owner_for_s": "With state no_owner: seconds since an owner was last heard (or "
                          "since the serving process started listening).",
        "standbys": "The other processes: one takes the type over if the owner goes.",
        "pause": "Why the type is paused; null while it runs.",
        "calls_per_second": "Calls started per second over the last 10 s (Echo probes "
                            "and operator tools' calls included).",
        "requests_per_second": "The configured limit on calls started per second.",
        "in_flight": "Calls under way now.",
        "max_concurrency": "The configured limit on calls under way at once.",
        "waiting": f"Jobs without a final signal, {_LANES}: what the owner has taken from "
                   "the queues plus what waits in them (the work queue counts as "
                   "interactive, <queue_prefix>.bulk.<slug> as bulk). Parked jobs apart.",
        "held": "Of waiting: jobs the owner has taken from the queues (in flight included).",
        "queued": "The type's queues as the last passive declare saw them: ready messages "
                  "and consumers; null for a queue that does not exist.",
        "parked": "Jobs in the parked queue (the type is paused, or they wait behind those "
                  "a pause held up), each with its delayed signal sent.",
        "backlog": "waiting plus parked.",
        "backlog_growing": "The backlog holds 10 or more and is larger than 30 s ago.",
        "oldest_waiting_age_s": "Age of the oldest waiting job (from the router receiving "
                                "its event); null when none waits or its age is unknown.",
        "oldest_waiting_at_least": "true when jobs are parked: their own ages are not known, "
                                   "the age given is a lower bound (the pause's length).",
        "time_to_final": f"Publish → final signal over the last 10 minutes, {_LANES}; "
                         "since the owner took the type over.",
        "dead_lettered_10m": "Finals whose retries ran out (a copy went to the dead "
                             "letters) in the last 10 minutes.",
        "failures": "The last 20 failed final signals, newest first.",
    },
    "PauseFacts": {
        "code": "The error that paused the type (Jasper's code or the service's own).",
        "http_status": "Its HTTP status; null when no answer came.",
        "message": "Its meaning or message, as in the delayed signals.",
        "words": "What it means for the centre, and what to do.",
        "since": "When the pause began.",
        "next_probe_at": "When the next Echo probe runs (the type resumes when one passes).",
    },
    "Failure": {
        "at": "When the failure signal was confirmed.",
        "client_id": "The Patriot client.",
        "iccid": "The SIM's ICCID, when the event had one.",
        "code": "The error code, as in the signal.",
        "message": "Its meaning, as in the signal.",
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
    "status.schema.json": _Spec(
        StatusReport, "serialization", "Status page facts",
        "GET /status.json on http_port: the facts the status page (GET /) shows, for "
        "scripts. Any replica answers for every communicator type (operator guide, "
        "Status page). Consumers should ignore fields they do not know.",
        _STATUS_FIELDS),
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
