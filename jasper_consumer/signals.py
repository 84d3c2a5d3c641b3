"""The result signal written to the client's history (SPEC §4), and the line an operator reads."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from .config import Command
from .events import Job, Partial


class Outcome(StrEnum):
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
    outcome: Outcome
    sim_status: str | None = None
    error: SignalError | None = None
    attempts: int = 0
    completed_at: datetime
    duration_ms: float
    text: str


def _now() -> datetime:
    return datetime.now(UTC)


def _subject(command: Command | None, iccid: str | None) -> str:
    verb = {Command.ACTIVATE: "activate", Command.DEACTIVATE: "deactivate"}.get(
        command, "change"  # type: ignore[arg-type]
    )
    return f"{verb} SIM {iccid}" if iccid else f"{verb} SIM"


def succeeded(job: Job, sim_status: str | None, attempts: int, duration_ms: float) -> Signal:
    return Signal(
        event_id=job.event_id,
        client_id=job.client_id,
        event_code=job.event_code,
        command=job.command,
        iccid=job.iccid,
        communicator_type=job.communicator_type,
        outcome=Outcome.SUCCEEDED,
        sim_status=sim_status or job.command.target_status,
        attempts=attempts,
        completed_at=_now(),
        duration_ms=round(duration_ms, 1),
        text=f"SIM {job.iccid} {job.command.past_tense} via {job.communicator_type}",
    )


def failed(
    job: Job | Partial,
    error: SignalError,
    attempts: int,
    duration_ms: float,
    sim_status: str | None = None,
) -> Signal:
    via = f" via {job.communicator_type}" if job.communicator_type else ""
    text = f"Could not {_subject(job.command, job.iccid)}{via}: {error.message} ({error.code})"
    return Signal(
        event_id=job.event_id,
        client_id=job.client_id,
        event_code=job.event_code,
        command=job.command,
        iccid=job.iccid,
        communicator_type=job.communicator_type,
        outcome=Outcome.FAILED,
        sim_status=sim_status,
        error=error,
        attempts=attempts,
        completed_at=_now(),
        duration_ms=round(duration_ms, 1),
        text=text,
    )


def delayed(job: Job, error: SignalError, attempts: int, duration_ms: float) -> Signal:
    text = (
        f"Waiting to {_subject(job.command, job.iccid)} via {job.communicator_type}: "
        f"{error.message} ({error.code}); it will be applied once {job.communicator_type} "
        "answers again"
    )
    return Signal(
        event_id=job.event_id,
        client_id=job.client_id,
        event_code=job.event_code,
        command=job.command,
        iccid=job.iccid,
        communicator_type=job.communicator_type,
        outcome=Outcome.DELAYED,
        error=error,
        attempts=attempts,
        completed_at=_now(),
        duration_ms=round(duration_ms, 1),
        text=text,
    )
