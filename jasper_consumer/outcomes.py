"""What a job came to, as small frozen values: never exception objects.

An exception raised by the Control Center client is control flow only; the moment it is
caught it becomes an :class:`Outcome` (or an :class:`ErrorInfo` for the pause), built once
from its safe fields, and nothing keeps a reference to the exception, its traceback or the
response body behind it. That keeps the memory of recent outcomes small and bounded.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from . import errors
from .errors import JasperError


class Result(StrEnum):
    """The final outcome of a job, as a signal's ``outcome`` (docs/asyncapi.yaml)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """The ``error`` object of a signal (docs/asyncapi.yaml)."""

    code: str
    http_status: int | None
    message: str
    retryable: bool
    cause: str | None = None  # RETRIES_EXHAUSTED: the last error's code (not in the signal)

    @classmethod
    def of(cls, err: JasperError, *, retryable: bool | None = None) -> ErrorInfo:
        return cls(err.code, err.http_status, _shared(err.message),
                   err.retryable if retryable is None else retryable,
                   getattr(err, "cause", None))

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "http_status": self.http_status, "message": self.message,
                "retryable": self.retryable}

    def size(self) -> int:
        """Bytes this value keeps alive (strings shared with the error table count 0)."""
        own = sys.getsizeof(self) + sys.getsizeof(self.code)
        return own if self.message in _MEANINGS else own + sys.getsizeof(self.message)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a job came to: the result, the SIM's status if known, the error, the calls made."""

    result: Result
    sim_status: str | None
    error: ErrorInfo | None
    attempts: int

    @classmethod
    def succeeded(cls, sim_status: str, attempts: int) -> Outcome:
        return cls(Result.SUCCEEDED, sim_status, None, attempts)

    @classmethod
    def failed(cls, error: ErrorInfo, attempts: int, sim_status: str | None = None) -> Outcome:
        return cls(Result.FAILED, sim_status, error, attempts)

    @property
    def exhausted(self) -> bool:
        """Retries ran out: the event also goes to the dead-letter queue (operator guide,
        section 5)."""
        return self.error is not None and self.error.code == errors.RETRIES_EXHAUSTED

    def size(self) -> int:
        return sys.getsizeof(self) + (self.error.size() if self.error is not None else 0)


def superseded(newer_event_id: str) -> Outcome:
    """A job older than one already applied (or queued) for its SIM: not applied."""
    return Outcome.failed(ErrorInfo(
        errors.SUPERSEDED, None,
        f"not applied: a newer event for this SIM ({newer_event_id}) came first", False), 0)


_MEANINGS = frozenset(errors.JASPER_ERROR_MEANINGS.values())
_BY_TEXT = {m: m for m in errors.JASPER_ERROR_MEANINGS.values()}


def _shared(message: str) -> str:
    """The error table's own string for a documented meaning, so copies are not kept."""
    return _BY_TEXT.get(message, message)
