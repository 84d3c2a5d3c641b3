"""The result signal written to the client's history (docs/asyncapi.yaml), and the line an
operator reads."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from .config import Command
from .events import Job, Partial


class Kind(StrEnum):
    """A signal's ``outcome`` field and routing key (docs/asyncapi.yaml)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DELAYED = "delayed"

    @property
    def routing_key(self) -> str:
        return f"jasper.{self.value}"


class SignalError(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: str
    http_status: int | None = None
    message: str
    retryable: bool = False


class Signal(BaseModel):
    model_config = ConfigDict(frozen=True)

    event_id: str | None
    client_id: str
    event_code: int | None
    command: Command | None
    iccid: str | None
    communicator_type: str | None
    outcome: Kind
    sim_status: str | None = None
    error: SignalError | None = None
    attempts: int = 0
    completed_at: datetime
    duration_ms: float
    text: str


def _subject(command: Command | None, iccid: str | None) -> str:
    verb = {Command.ACTIVATE: "activate", Command.DEACTIVATE: "deactivate"}.get(
        command, "change"  # type: ignore[arg-type]
    )
    return f"{verb} SIM {iccid}" if iccid else f"{verb} SIM"


def _signal(job: Job | Partial, outcome: Kind, *, text: str, attempts: int,
            duration_ms: float, sim_status: str | None = None,
            error: SignalError | None = None) -> Signal:
    if job.origin:  # an event not raised by an operator says who raised it (docs/asyncapi.yaml)
        text = f"{text} ({job.origin})"
    # Every field comes from a validated job and this module: construct, do not validate
    # again (tests/test_signals.py checks the result against the model).
    return Signal.model_construct(
        event_id=job.event_id,
        client_id=job.client_id,
        event_code=job.event_code,
        command=job.command,
        iccid=job.iccid,
        communicator_type=job.communicator_type,
        outcome=outcome,
        sim_status=sim_status,
        error=error,
        attempts=attempts,
        completed_at=datetime.now(UTC),
        duration_ms=round(duration_ms, 1),
        text=text,
    )


def succeeded(job: Job, sim_status: str | None, attempts: int, duration_ms: float) -> Signal:
    return _signal(
        job, Kind.SUCCEEDED,
        text=f"SIM {job.iccid} {job.command.past_tense} via {job.communicator_type}",
        sim_status=sim_status or job.command.target_status,
        attempts=attempts, duration_ms=duration_ms)


def failed(
    job: Job | Partial,
    error: SignalError,
    attempts: int,
    duration_ms: float,
    sim_status: str | None = None,
) -> Signal:
    via = f" via {job.communicator_type}" if job.communicator_type else ""
    return _signal(
        job, Kind.FAILED,
        text=f"Could not {_subject(job.command, job.iccid)}{via}: {error.message} ({error.code})",
        sim_status=sim_status, error=error, attempts=attempts, duration_ms=duration_ms)


def delayed(job: Job, error: SignalError, attempts: int, duration_ms: float, *,
            backlog: bool = False) -> Signal:
    """The interim signal of a job that waits for a paused type (operator guide, section 5);
    ``backlog`` when
    the type is up again but the job waits behind those held up by the pause."""
    why = (f"{job.communicator_type} was paused ({error.message}, {error.code}) and the "
           "events held up meanwhile are applied first" if backlog else
           f"{error.message} ({error.code}); it will be applied once "
           f"{job.communicator_type} answers again")
    return _signal(
        job, Kind.DELAYED,
        text=f"Waiting to {_subject(job.command, job.iccid)} via {job.communicator_type}: {why}",
        error=error, attempts=attempts, duration_ms=duration_ms)
