"""Control Center's answers and network failures as errors, and the back-off between
tries (operator guide, sections 13 and 5). Pure functions: no I/O, no state.

A certificate that does not verify (:class:`~jasper_consumer.errors.CertificateNotTrusted`)
and a forward proxy that refuses the way out (:class:`~jasper_consumer.errors.ProxyRefused`:
407, 403) are settings to fix, so they pause the type in an operator's words; a proxy that
cannot reach Control Center, or cannot be reached, is an outage like any other."""

from __future__ import annotations

import json
import re
import ssl
import time
from collections.abc import Callable, Generator
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import backoff

from .. import errors, tls
from ..errors import (
    JASPER_ERROR_MEANINGS,
    PAUSE_CODES,
    RETRYABLE_CODES,
    RETRYABLE_HTTP,
    CertificateNotTrusted,
    CommunicatorMisconfigured,
    JasperError,
    JasperRejected,
    JasperRetryable,
    JasperUnreachable,
    ProxyRefused,
)

MAX_BODY_BYTES = 64 * 1024  # read no more of any answer than this
_MAX_API_MESSAGE = 200  # characters of an unknown error's errorMessage kept for operators
_TIMED_OUT = "timed out"
#: Codes that say the SIM already has the status asked for: success (operator guide, section 13).
ALREADY_IN_STATUS_CODES: frozenset[str] = frozenset({"10030000"})
_ALREADY = re.compile(r"\balready\b", re.IGNORECASE)
_OWN_CODES = frozenset({errors.JASPER_UNREACHABLE, errors.UNEXPECTED_RESPONSE, errors.UNAUTHORIZED,
                        errors.CERTIFICATE_NOT_TRUSTED, errors.PROXY_REFUSED})


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), or None."""
    if value is None or not (value := value.strip()):
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def api_error(body: bytes) -> tuple[str | None, str]:
    """``(errorCode, errorMessage)`` from a Jasper error body; code None if it has none."""
    data = parse_json(body)
    if not isinstance(data, dict):
        return None, ""
    code = data.get("errorCode")
    message = data.get("errorMessage")
    code_s = str(code).strip() if isinstance(code, str | int) and str(code).strip() else None
    message_s = " ".join(message.split()) if isinstance(message, str) else ""
    return code_s, message_s


def _truncate(text: str, limit: int = _MAX_API_MESSAGE) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe(body: bytes, content_type: str) -> str:
    if not body:
        return "empty body"
    return f"{content_type or 'no content type'}, {len(body)} bytes"


def classify(
    http_status: int, body: bytes, content_type: str, retry_after_header: str | None = None
) -> JasperError:
    """The error an answer that is not a success stands for (operator guide, sections 13
    and 5)."""
    code, api_message = api_error(body)
    retry_after = parse_retry_after(retry_after_header)
    if code is not None:
        message = JASPER_ERROR_MEANINGS.get(code) or _truncate(
            api_message or f"Control Center error {code}")
        if code in PAUSE_CODES:
            return CommunicatorMisconfigured(code, message, http_status)
        if code in RETRYABLE_CODES or http_status in RETRYABLE_HTTP:
            return JasperRetryable(code, message, http_status, retry_after)
        return JasperRejected(code, message, http_status)
    if http_status == 401:
        message = f"Control Center refused the credentials (HTTP {http_status})"
        detail = _truncate(api_message) if api_message else _describe(body, content_type)
        return CommunicatorMisconfigured(errors.UNAUTHORIZED, f"{message}: {detail}", http_status)
    message = f"unexpected HTTP {http_status} answer ({_describe(body, content_type)})"
    if http_status in RETRYABLE_HTTP or http_status >= 500 or 200 <= http_status < 300:
        # 2xx: an idempotent PUT can be repeated until Control Center answers properly.
        return JasperRetryable(errors.UNEXPECTED_RESPONSE, message, http_status, retry_after)
    return JasperRejected(errors.UNEXPECTED_RESPONSE, message, http_status)


def transport_failure(exc: BaseException, host: str, timeout_s: float,
                      proxy: str | None = None, proxy_credentials: bool = False,
                      proxy_setting: str = "proxy") -> JasperError:
    """A failure with no answer from Control Center, in words, built only from safe fields.

    ``proxy`` is the forward proxy in use, as it may be shown (no credentials), set in
    ``proxy_setting`` (the key, or the environment variable it came from)."""
    if isinstance(exc, aiohttp.ClientHttpProxyError):  # the proxy answered CONNECT with no
        return proxy_refused(exc.status, proxy or "the proxy", host, proxy_credentials,
                             proxy_setting)
    if isinstance(exc, TimeoutError):  # also aiohttp's ServerTimeoutError
        return JasperUnreachable(f"{_TIMED_OUT} after {timeout_s:.1f} s waiting for {host}")
    cert = tls.verification_error(exc)
    if cert is not None:
        return certificate_not_trusted(cert, host, proxy)
    if isinstance(exc, aiohttp.ClientSSLError):
        handshake = tls.ssl_error(exc)
        words = f": {tls.handshake_words(handshake)}" if handshake is not None else ""
        return JasperUnreachable(f"TLS handshake with {host} failed{words}")
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        reason = ("connection refused" if isinstance(exc.os_error, ConnectionRefusedError)
                  else exc.os_error.strerror or type(exc.os_error).__name__)
        return JasperUnreachable(f"cannot connect to the proxy {proxy or exc.host}: {reason}")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return JasperUnreachable(f"cannot resolve host name {host} (DNS lookup failed)")
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return JasperUnreachable(f"connection refused by {exc.host}:{exc.port}")
        reason = exc.os_error.strerror or type(exc.os_error).__name__
        return JasperUnreachable(f"cannot connect to {exc.host}:{exc.port}: {reason}")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return JasperUnreachable(f"{host} closed the connection without answering")
    if isinstance(exc, ConnectionResetError):
        return JasperUnreachable(f"connection reset by {host}")
    if isinstance(exc, ConnectionRefusedError):
        return JasperUnreachable(f"connection refused by {host}")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return JasperUnreachable(f"the answer from {host} was cut off")
    if isinstance(exc, OSError) and exc.strerror:
        return JasperUnreachable(f"network error talking to {host}: {exc.strerror}")
    return JasperUnreachable(f"request to {host} failed ({type(exc).__name__})")


def certificate_not_trusted(cert: ssl.SSLCertVerificationError, host: str,
                            proxy: str | None) -> CertificateNotTrusted:
    """A certificate check that failed, in words."""
    words = tls.verification_words(cert, host)
    if words.startswith("signed by an unknown CA"):
        advice = ("set ca_file to the CA that signed it (where a proxy inspects TLS, its CA"
                  f"{': the proxy is ' + proxy if proxy else ''})")
    elif words.startswith("issued for another host name"):
        advice = "use a host name the certificate is for in server_address"
    elif words == "expired":
        advice = "it must be renewed where it is served (or this host's clock is wrong)"
    else:
        advice = "check the certificate where it is served"
    return CertificateNotTrusted(
        f"certificate not trusted: the TLS certificate {host} presented is {words}; {advice}")


def proxy_refused(http_status: int, proxy: str, host: str, with_credentials: bool,
                  setting: str = "proxy") -> JasperError:
    """The forward proxy's refusal to take a call to ``host`` out, in words: 407 (401 from
    some proxies for wrong credentials) and 403 pause the type (settings to fix); anything
    else is an outage on the way."""
    if http_status in (401, 407):
        asks = ("refused the proxy credentials" if with_credentials
                else "asks for credentials, and none are set")
        phrase = "Proxy Authentication Required" if http_status == 407 else "Unauthorized"
        return ProxyRefused(
            f"proxy refused: {proxy} {asks} (HTTP {http_status} {phrase}); set them in "
            f"{setting} as http://user:password@host:port", http_status)
    if http_status == 403:
        return ProxyRefused(
            f"proxy refused: {proxy} does not allow connections to {host} (HTTP 403 "
            "Forbidden); ask for the host and port to be allowed", http_status)
    return JasperUnreachable(
        f"the proxy {proxy} could not reach {host} (it answered HTTP {http_status})")


def retry_reason(err: JasperError) -> str:
    """The ``reason`` label of ``jasper_retries_total`` (a closed set)."""
    if err.code == "40000029" or err.http_status == 429:
        return "rate_limited"
    if isinstance(err, JasperUnreachable):
        return "timeout" if err.message.startswith(_TIMED_OUT) else "unreachable"
    if err.code in RETRYABLE_CODES or (err.http_status or 0) >= 500:
        return "server_error"
    return "unexpected_response"


def code_label(code: str) -> str:
    """Error codes as a metric label: Jasper's 8-digit codes and our own, else ``OTHER``."""
    return code if code in _OWN_CODES or re.fullmatch(r"\d{8}", code) else "OTHER"


def retry_wait(jittered_s: float, retry_after_s: float | None, max_delay_s: float) -> float:
    """The back-off wait: the jittered delay, raised to ``Retry-After`` (capped at max delay)."""
    if retry_after_s is None:
        return jittered_s
    return max(jittered_s, min(retry_after_s, max_delay_s))


def backoff_waits(
    factor: float, max_value: float, jitter: Callable[[float], float] = backoff.full_jitter
) -> Generator[float, Any, None]:
    """``backoff.expo`` with full jitter, honouring the ``Retry-After`` of the error sent in.

    Jitter is applied here, not by ``backoff``, so that it cannot cut below Retry-After.
    """
    expo = backoff.expo(factor=factor, max_value=max_value)
    next(expo)  # prime, as backoff does with send(None)
    err = yield 0.0  # backoff primes us with send(None)
    while True:
        retry_after = err.retry_after_s if isinstance(err, JasperRetryable) else None
        err = yield retry_wait(jitter(next(expo)), retry_after, max_value)


def already_in_status(code: str, message: str) -> bool:
    """Whether an error answer means "the SIM already has that status" (success).

    Decided by the code (:data:`ALREADY_IN_STATUS_CODES`). Fallback, for a code this service
    does not know at all (not in operator guide, section 5's table): an ``errorMessage`` with
    the word "already". A documented code is never turned into success by its message.
    """
    if code in ALREADY_IN_STATUS_CODES:
        return True
    return code not in JASPER_ERROR_MEANINGS and bool(_ALREADY.search(message))
