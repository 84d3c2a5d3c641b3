"""The result signal's text: the line an operator reads in the client's history (operator
guide, section 4)."""

from __future__ import annotations

import pytest

from jasper_consumer import signals
from jasper_consumer.config import Command
from jasper_consumer.events import Job, Partial
from jasper_consumer.signals import Signal, SignalError

ICCID = "89610185002345678901"
ERROR = SignalError(code="10000001", http_status=401, message="Invalid credentials",
                    retryable=True)


def job(**overrides: object) -> Job:
    fields: dict[str, object] = {
        "event_id": "e1", "event_code": 65517, "client_id": "100234",
        "command": Command.DEACTIVATE, "iccid": ICCID, "communicator_type": "M2MOne NZ"}
    fields.update(overrides)
    return Job.model_validate(fields)


def test_a_signal_without_origin_reads_as_before():
    """A signal of an operator's click has no bracketed origin."""
    signal = signals.succeeded(job(), "DEACTIVATED", 1, 5.0)

    assert signal.text == f"SIM {ICCID} deactivated via M2MOne NZ"


@pytest.mark.parametrize("make", [
    lambda j: signals.succeeded(j, "DEACTIVATED", 1, 5.0),
    lambda j: signals.failed(j, ERROR, 1, 5.0),
    lambda j: signals.delayed(j, ERROR, 1, 5.0),
])
def test_every_signal_of_an_event_with_origin_ends_with_it(make):
    """Succeeded, failed and delayed texts end with the origin in brackets."""
    signal: Signal = make(job(origin="reconcile"))

    assert signal.text.endswith(" (reconcile)")
    assert signal.text.count("(reconcile)") == 1


def test_the_spec_example_text():
    """A reconcile's deactivation reads as the operator guide, section 7, shows it."""
    signal = signals.succeeded(job(origin="reconcile"), "DEACTIVATED", 1, 5.0)

    assert signal.text == f"SIM {ICCID} deactivated via M2MOne NZ (reconcile)"


def test_a_locally_failed_event_keeps_its_origin():
    """A failure decided before any call (here: no ICCID) also names the origin."""
    partial = Partial(client_id="100234", command=Command.ACTIVATE,
                      communicator_type="M2MOne NZ", origin="reconcile")

    signal = signals.failed(partial, SignalError(code="MISSING_ICCID", message="no ICCID"), 0, 0.1)

    assert signal.text == ("Could not activate SIM via M2MOne NZ: no ICCID (MISSING_ICCID) "
                           "(reconcile)")


def test_constructed_signals_are_valid_signals():
    """Signals are built without validation; each kind validates as the model says."""
    from datetime import UTC, datetime

    from jasper_consumer.config import Command
    from jasper_consumer.events import Job
    from jasper_consumer.signals import Signal, SignalError, delayed, failed, succeeded

    job = Job(event_id="e", event_code=65516, client_id="c", command=Command.ACTIVATE,
              iccid="89610185002345678901", communicator_type="T", origin="reconcile",
              occurred_at=datetime(2026, 1, 1, tzinfo=UTC))
    error = SignalError.model_construct(code="10000001", http_status=401, message="m",
                                        retryable=True)
    for signal in (succeeded(job, "ACTIVATED", 1, 2.0), failed(job, error, 1, 2.0),
                   delayed(job, error, 0, 0.0), delayed(job, error, 0, 0.0, backlog=True)):
        dumped = signal.__pydantic_serializer__.to_json(signal)
        assert Signal.model_validate_json(dumped) == Signal.model_validate(signal.model_dump())
        assert dumped == Signal.model_validate_json(dumped).model_dump_json().encode()
