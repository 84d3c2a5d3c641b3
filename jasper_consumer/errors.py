"""Every way processing can go wrong, and what happens to the message then.

::

    JasperConsumerError
    ├── ConfigError(ValueError)          start-up stops; one line per problem
    ├── HandBack                         not forwarded now (the router keeps order) → nack
    │                                    (a failure is rejected: it counts as a delivery)
    ├── TypePaused                       the communicator type is paused → the job is parked
    ├── PublishFailed                    the broker did not confirm a publish → the input
    │                                    message stays unacked (published again, or returned)
    ├── UnreadableMessage(ValueError)    not an event at all → dead-letter queue
    ├── NotAJob(ValueError)              a parked message that is no job any more → dead-letter
    ├── EventRejected(ValueError)        an event that cannot succeed → failure signal, no API call
    │   └── events.Rejected              … with what could be read of it, for the signal
    ├── ToolError                        an operator tool cannot do its job → it exits 2
    ├── BrokerUnavailable(ConnectionError)  no RabbitMQ node could be reached → a tool stops;
    │   │                                   the service keeps trying
    │   └── BrokerUntrusted              a node's TLS certificate does not verify → start-up stops
    │                                    (exit 2); once running, retried and shown in /readyz
    └── JasperError                      Control Center (or the way to it) said no
        ├── JasperRejected               the change was refused; retrying cannot help → fail
        ├── JasperRetryable              transient (5xx, rate limit, network) → back off, retry
        │   └── JasperUnreachable        no HTTP answer at all (refused, reset, DNS, timeout)
        ├── RetriesExhausted             the retry budget ran out → fail, copy to dead letters
        └── CommunicatorMisconfigured    the communicator type's settings are wrong → pause the type
            ├── CertificateNotTrusted    Control Center's (or a TLS-inspecting proxy's) certificate
            │                            does not verify (unknown CA, host name, expired) → pause
            └── ProxyRefused             the forward proxy refused the way out (407, 403) → pause

A ``JasperError`` carries what a failure signal needs: ``code``, ``http_status``,
``message`` (the documented meaning, for an operator) and ``retryable``. Errors are
control flow only: once caught they become a small frozen value
(:class:`~jasper_consumer.outcomes.Outcome`, :class:`~jasper_consumer.outcomes.ErrorInfo`)
and are never stored.
"""

from __future__ import annotations

from typing import Any, ClassVar

# Jasper error code -> documented meaning (operator guide, section 5).
JASPER_ERROR_MEANINGS: dict[str, str] = {
    "10000001": "Invalid credentials (also: caller IP outside the allowed range)",
    "10000005": "Invalid status",
    "10000008": "Role has no access to operator and customer custom fields",
    "10000009": "Role has no access to account custom fields",
    "10000010": "Role has no access to customer custom field",
    "10000011": "One or more required fields are missing",
    "10000012": "Invalid date format",
    "10000015": "Invalid customer",
    "10000023": "Request JSON is not well formed",
    "10000024": "Invalid API version",
    "10000025": "Invalid device ID",
    "10000026": "Invalid modem ID",
    "10000028": "Invalid request: unrecognised parameters",
    "10000029": "SIM may not be moved back to a pre-activation status",
    "10000030": "Role has no access to this API function",
    "10000031": "Invalid zone",
    "20000001": "Resource not found - invalid ICCID",
    "30000001": "Unknown server error",
    "40000029": "Rate limit exceeded",
}

# Codes that say the communicator type's settings are wrong, not the event.
PAUSE_CODES: frozenset[str] = frozenset({"10000001", "10000024", "10000030"})
# Jasper codes worth retrying after a back-off.
RETRYABLE_CODES: frozenset[str] = frozenset({"30000001", "40000029"})
# HTTP statuses that are transient whatever the body says.
RETRYABLE_HTTP: frozenset[int] = frozenset({429, 500, 502, 503, 504})

# The service's own error codes (docs/asyncapi.yaml).
INVALID_EVENT = "INVALID_EVENT"
MISSING_ICCID = "MISSING_ICCID"
INVALID_ICCID = "INVALID_ICCID"
UNKNOWN_COMMUNICATOR_TYPE = "UNKNOWN_COMMUNICATOR_TYPE"
UNKNOWN_EVENT_CODE = "UNKNOWN_EVENT_CODE"
JASPER_UNREACHABLE = "JASPER_UNREACHABLE"
RETRIES_EXHAUSTED = "RETRIES_EXHAUSTED"
UNEXPECTED_RESPONSE = "UNEXPECTED_RESPONSE"
UNAUTHORIZED = "UNAUTHORIZED"
SUPERSEDED = "SUPERSEDED"
CERTIFICATE_NOT_TRUSTED = "CERTIFICATE_NOT_TRUSTED"
PROXY_REFUSED = "PROXY_REFUSED"


class JasperConsumerError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(JasperConsumerError, ValueError):
    """The configuration cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class HandBack(JasperConsumerError):
    """The router does not forward this event now (an earlier one for its SIM was handed
    back): nack it so it stays behind that one."""


class TypePaused(JasperConsumerError):
    """The communicator type is paused (operator guide, section 5): the job is parked with its
    delayed signal and applied after the resume. ``error`` is the pause's ``ErrorInfo``."""

    def __init__(self, error: Any) -> None:
        self.error = error
        self.attempts = 0  # calls made for the job before the pause stopped it
        super().__init__(f"paused: {getattr(error, 'code', error)}")


class PublishFailed(JasperConsumerError):
    """The broker did not confirm a publish; the input message must not be acked."""


class NotAJob(JasperConsumerError, ValueError):
    """A parked message that cannot be read back as a job (dead-lettered)."""


class ToolError(JasperConsumerError):
    """An operator tool cannot do its job (broker unreachable, queue missing, ...)."""


class UnreadableMessage(JasperConsumerError, ValueError):
    """The message is not an event at all; it goes to the dead-letter queue."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class EventRejected(JasperConsumerError, ValueError):
    """The event can never succeed; it gets a failure signal without an API call."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class BrokerUnavailable(JasperConsumerError, ConnectionError):
    """No RabbitMQ node of ``amqp_url`` could be reached; the message says, per node, why
    in words (never the password)."""


class BrokerUntrusted(BrokerUnavailable):
    """A RabbitMQ node's TLS certificate does not verify against ``cafile`` (unknown CA,
    another host name, expired): a setting to fix, not an outage, so start-up stops."""


class JasperError(JasperConsumerError):
    """Control Center, or the way to it, did not do what was asked."""

    retryable: ClassVar[bool] = False
    pauses_type: ClassVar[bool] = False

    def __init__(self, code: str, message: str, http_status: int | None = None) -> None:
        self.code = code
        self.message = message
        self.http_status = http_status
        self.attempts = 0  # API calls made for the event when this was raised; set by the client
        super().__init__(f"{code} (HTTP {http_status}): {message}")

    def as_dict(self) -> dict[str, Any]:
        """The ``error`` object of a signal."""
        return {
            "code": self.code,
            "http_status": self.http_status,
            "message": self.message,
            "retryable": self.retryable,
        }


class JasperRejected(JasperError):
    """Control Center refused the change; retrying cannot help."""


class JasperRetryable(JasperError):
    """A transient failure: back off and try again while the budget lasts."""

    retryable = True

    def __init__(
        self,
        code: str,
        message: str,
        http_status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(code, message, http_status)
        self.retry_after_s = retry_after_s


class JasperUnreachable(JasperRetryable):
    """No HTTP answer came: connection refused or reset, DNS failure, timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(JASPER_UNREACHABLE, message, None)


class RetriesExhausted(JasperError):
    """Every retry of a transient failure failed; carries the last error's code and text."""

    retryable = True

    def __init__(self, last: JasperError, attempts: int, elapsed_s: float) -> None:
        super().__init__(
            RETRIES_EXHAUSTED,
            f"gave up after {attempts} attempts in {elapsed_s:.1f} s; last error: "
            f"{last.message} ({last.code})",
            last.http_status,
        )
        self.attempts = attempts
        self.cause = last.code  # the last error's code (the dead-letter copy's header)


class CommunicatorMisconfigured(JasperError):
    """The communicator type's settings are wrong (credentials, API version, role): pause it."""

    retryable = True
    pauses_type = True


class CertificateNotTrusted(CommunicatorMisconfigured):
    """The TLS certificate Control Center's address presented does not verify (an unknown
    CA, e.g. a TLS-inspecting proxy's, another host name, expired): pause the type until
    ``ca_file`` trusts it. ``message`` starts with "certificate not trusted"."""

    def __init__(self, message: str) -> None:
        super().__init__(CERTIFICATE_NOT_TRUSTED, message, None)


class ProxyRefused(CommunicatorMisconfigured):
    """The forward proxy refused to take the call out (407: credentials missing or wrong;
    403: not allowed to that host): pause the type until the proxy settings are fixed."""

    def __init__(self, message: str, http_status: int | None) -> None:
        super().__init__(PROXY_REFUSED, message, http_status)
