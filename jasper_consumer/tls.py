"""TLS for both ways out (RabbitMQ and Control Center): contexts, file checks, failures in words.

Certificates are always verified (operator guide, section 10). :func:`client_context`
builds the context from a CA bundle (the system's CAs when none is given) and an
optional client certificate; :func:`file_problems` says, before anything connects, what
is wrong with those files. :func:`verification_error` finds the certificate check that
failed inside whatever a client library raised (aiormq wraps it in its own error), and
:func:`verification_words` says what failed in an operator's words — unknown CA, another
host name, expired — for the caller to name the host and the setting to fix.
"""

from __future__ import annotations

import ssl
from pathlib import Path

# OpenSSL's X509_V_ERR_* codes, grouped by what an operator has to do about them.
_UNKNOWN_CA = frozenset({
    2,  # unable to get issuer certificate
    18,  # self-signed certificate
    19,  # self-signed certificate in certificate chain
    20,  # unable to get local issuer certificate
    21,  # unable to verify the first certificate
})
_NAME_MISMATCH = frozenset({62, 64})  # hostname mismatch, IP address mismatch
_EXPIRED = 10
_NOT_YET_VALID = 9
_REVOKED = 23


def client_context(cafile: str | Path | None = None, certfile: str | Path | None = None,
                   keyfile: str | Path | None = None) -> ssl.SSLContext:
    """A verifying client context: ``cafile`` (else the system's CAs), and a client
    certificate when ``certfile`` is given (its key in ``keyfile`` or in the same file).
    Raises ``OSError`` / ``ssl.SSLError`` for files that cannot be used."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(cafile) if cafile else None)
    if certfile:
        context.load_cert_chain(str(certfile), str(keyfile) if keyfile else None)
    return context


def file_problems(where: str, cafile: str | Path | None, certfile: str | Path | None = None,
                  keyfile: str | Path | None = None) -> list[str]:
    """One line per problem with these files (missing, unreadable, not PEM, key not for
    the certificate), each starting with ``where``; empty when they load."""
    problems = []
    for key, path in (("cafile", cafile), ("certfile", certfile), ("keyfile", keyfile)):
        if path and not Path(path).is_file():
            problems.append(f"{where}: {key} {str(path)!r} does not exist or is not a file")
    if problems:
        return problems
    if certfile:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
                str(certfile), str(keyfile) if keyfile else None)
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"{where}: certfile/keyfile cannot be used: {_reason(exc)}")
    if cafile:
        try:
            ssl.create_default_context(cafile=str(cafile))
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"{where}: cafile {str(cafile)!r} holds no usable CA certificate "
                            f"(PEM expected): {_reason(exc)}")
    return problems


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        reason = str(exc.reason).replace("_", " ").lower()
        if reason == "key values mismatch":
            return "the key is not the certificate's"
        return reason
    return exc.strerror or type(exc).__name__


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc``, what it wraps (aiohttp's ``certificate_error`` / ``os_error``), its causes
    and contexts, innermost last."""
    found: list[BaseException] = []
    todo = [exc]
    while todo:
        item = todo.pop(0)
        if item is None or any(item is f for f in found):
            continue
        found.append(item)
        todo += [getattr(item, "certificate_error", None), getattr(item, "os_error", None),
                 item.__cause__, item.__context__]
    return found


def verification_error(exc: BaseException | None) -> ssl.SSLCertVerificationError | None:
    """The failed certificate check inside ``exc`` (its causes and contexts), if any."""
    for item in _chain(exc):
        if isinstance(item, ssl.SSLCertVerificationError) and \
                getattr(item, "verify_code", None) is not None:
            return item
    return None


def ssl_error(exc: BaseException | None) -> ssl.SSLError | None:
    """Any other TLS failure inside ``exc`` (handshake refused, protocol), if any."""
    for item in _chain(exc):
        if isinstance(item, ssl.SSLError) and getattr(item, "reason", None):
            return item
    return None


def verification_words(err: ssl.SSLCertVerificationError, host: str) -> str:
    """What failed, in words: ``signed by an unknown CA (self-signed certificate in
    certificate chain)``, ``issued for another host name, not 'x'``, ``expired``."""
    detail = err.verify_message or "certificate verify failed"
    if err.verify_code in _UNKNOWN_CA:
        return f"signed by an unknown CA ({detail})"
    if err.verify_code in _NAME_MISMATCH:
        return f"issued for another host name, not {host!r}"
    if err.verify_code == _EXPIRED:
        return "expired"
    if err.verify_code == _NOT_YET_VALID:
        return "not valid yet (is this host's clock right?)"
    if err.verify_code == _REVOKED:
        return "revoked"
    return detail


_ALERTS = {
    "tlsv1 alert unknown ca": "{peer} does not trust the CA of our client certificate "
                              "(TLS alert: unknown CA)",
    "sslv3 alert bad certificate": "{peer} refused our client certificate (TLS alert: bad "
                                   "certificate)",
    "sslv3 alert certificate expired": "{peer} says our client certificate has expired",
    "tlsv13 alert certificate required": "{peer} requires a client certificate (certfile "
                                         "and keyfile)",
    "sslv3 alert handshake failure": "no TLS version or cipher in common with {peer} (TLS "
                                     "alert: handshake failure)",
    "wrong version number": "{peer} does not speak TLS on that port (wrong version number)",
}


def handshake_words(err: ssl.SSLError, peer: str = "the other end") -> str:
    """Another TLS failure in words: ``the broker does not trust the CA of our client
    certificate (TLS alert: unknown CA)``, ``... does not speak TLS on that port``."""
    reason = str(err.reason or type(err).__name__).replace("_", " ").lower()
    return _ALERTS.get(reason, reason).format(peer=peer)
