"""The Control Center client, split by concern:

* :mod:`.client` — :class:`JasperClient`: Basic auth, requests, retries, one per account;
* :mod:`.answers` — an HTTP answer or a network failure → an error (pure functions);
* :mod:`.limiter` — :class:`Limiter`: calls in flight and spacing of call starts.
"""

from .answers import (
    CallResult,
    backoff_waits,
    classify,
    parse_retry_after,
    retry_reason,
    retry_wait,
    transport_failure,
)
from .client import JasperClient
from .limiter import Limiter

__all__ = [
    "CallResult", "JasperClient", "Limiter", "backoff_waits", "classify", "parse_retry_after",
    "retry_reason", "retry_wait", "transport_failure",
]
