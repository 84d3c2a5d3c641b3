"""URLs that may hold a secret (``amqp_url``, a proxy's credentials): what is wrong with
one in words that never show it, redaction that is safe for any string, the TLS files an
``amqps://`` URL names, and the proxy the environment gives a Control Center address
(``HTTPS_PROXY`` / ``NO_PROXY``, read as curl and Python read them). Pure functions.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from urllib.parse import parse_qs, urlsplit

_TLS_QUERY_KEYS = ("cafile", "capath", "cadata", "certfile", "keyfile")


def _authority_end(rest: str) -> int:
    """Where the authority of ``rest`` (a URL after ``scheme://``) ends: at the first
    ``/``, ``?`` or ``#``."""
    ends = [i for i in (rest.find(c) for c in "/?#") if i >= 0]
    return min(ends, default=len(rest))


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``; safe for any string.

    A password holding an unencoded ``/``, ``?`` or ``#`` (which config validation
    refuses) would end the authority early, so when an ``@`` follows one of those,
    everything up to the last ``@`` is hidden.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url if "@" not in url else "<URL hidden: it may hold a password>"
    end = _authority_end(rest)
    at = rest.rfind("@", 0, end) if "@" not in rest[end:] else rest.rfind("@")
    if at < 0:
        return url
    userinfo = rest[:at]
    if at < end and ":" not in userinfo:
        return url  # a user name alone
    user = userinfo.split(":", 1)[0]
    shown = f"{user}:***@" if at < end and user else "***@"
    return f"{scheme}://{shown}{rest[at + 1:]}"


def _url_problem(url: str, schemes: tuple[str, ...], what: str) -> str | None:
    """What is wrong with a URL that may hold a password, in words that never show it."""
    scheme, sep, rest = url.partition("://")
    if scheme not in schemes or not sep:
        return f"must be {what}"
    if "@" in rest[_authority_end(rest):]:
        return ("has an '@' after the host: a user name or password holding '/', '?' or '#' "
                "must have them percent-encoded (%2F, %3F, %23), and so must an '@' in the "
                "path or query (%40); the value is not shown")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "has a port that is not a number from 1 to 65535"
    if not parts.hostname:
        return f"must be {what}"
    if port == 0:
        return "has a port that is not a number from 1 to 65535"
    return None


def amqp_url_problem(url: str) -> str | None:
    """What is wrong with one node's ``amqp_url`` (never showing it), or None."""
    problem = _url_problem(url, ("amqp", "amqps"), "an amqp:// or amqps:// URL with a host")
    if problem is not None:
        return problem
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)
    if query.get("no_verify_ssl", ["0"]) != ["0"]:
        return ("has no_verify_ssl, which is not allowed: the broker's certificate is always "
                "verified (name its CA with cafile)")
    given = [k for k in _TLS_QUERY_KEYS if k in query]
    if given and parts.scheme == "amqp":
        return (f"has {', '.join(given)} with amqp://, which is plain text: use amqps:// "
                "(port 5671 by default)")
    if "keyfile" in query and "certfile" not in query:
        return "has keyfile without certfile: name the client certificate with certfile"
    return None


def amqp_tls_files(url: str) -> tuple[str | None, str | None, str | None]:
    """``(cafile, certfile, keyfile)`` of an ``amqps://`` URL's query (None where absent)."""
    query = parse_qs(urlsplit(url).query)

    def one(key: str) -> str | None:
        return query[key][0] if key in query else None

    return one("cafile"), one("certfile"), one("keyfile")


def node_name(url: str) -> str:
    """``host:port`` of an AMQP URL (the default port filled in), for messages."""
    try:
        parts = urlsplit(url)
        port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
        return f"{parts.hostname}:{port}"
    except ValueError:
        return redact_url(url)


def proxy_problem(url: str) -> str | None:
    """What is wrong with a proxy URL (never showing it), or None."""
    problem = _url_problem(url, ("http",), "an http://host:port URL (HTTP CONNECT proxy)")
    if problem is None and urlsplit(url).path not in ("", "/"):
        problem = "must be an http://host:port URL, without a path"
    return problem


def env_proxy(server_address: str, env: Mapping[str, str]) -> tuple[str, str] | None:
    """``(proxy URL, variable)`` the environment gives for ``server_address``, as curl and
    Python read it: ``https_proxy`` / ``HTTPS_PROXY`` (``http_proxy`` / ``HTTP_PROXY`` for
    an ``http://`` address), unless ``no_proxy`` / ``NO_PROXY`` lists the host."""
    parts = urlsplit(server_address)
    names = [f"{parts.scheme}_proxy", f"{parts.scheme.upper()}_PROXY"]
    found = next(((env[n], n) for n in names if env.get(n, "").strip()), None)
    if found is None:
        return None
    no_proxy = env.get("no_proxy") or env.get("NO_PROXY") or ""
    if _bypassed(parts.hostname or "", no_proxy):
        return None
    value = found[0].strip()
    return (value if "://" in value else f"http://{value}"), found[1]


def _bypassed(host: str, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` lists ``host``: ``*``, the host, a parent domain (``.example.com``
    or ``example.com``), or a network holding its address (``10.0.0.0/8``)."""
    host = host.lower().strip("[]")
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        try:
            if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                return True
            continue
        except ValueError:
            pass
        name = entry.rsplit(":", 1)[0] if entry.count(":") == 1 else entry  # host:port
        name = name.lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False
