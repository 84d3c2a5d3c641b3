"""The status page rendered from fixed facts: every state, escaping, and the two routes."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
from prometheus_client import CollectorRegistry

from jasper_consumer import errors
from jasper_consumer.probes import ProbeServer
from jasper_consumer.status import (
    OTHER_WORDS,
    OUTAGE_WORDS,
    PAUSE_WORDS,
    Failure,
    StatusReport,
    assemble,
)
from jasper_consumer.statuspage import CSP, render, routes

from .test_status import ME, NOW, T0, owner_facts, paused_facts, report, two_types

SCHEMA = Path(__file__).resolve().parent.parent / "docs" / "schemas" / "status.schema.json"


def page(nz: dict[str, Any] | None = None, au: dict[str, Any] | None = None, *,
         au_heard: bool = True, connected: bool = True) -> StatusReport:
    """Two types owned by pod-a (pod-b stands by); ``au_heard=False``: AU has no owner."""
    owned = [owner_facts("M2MOne NZ", **(nz or {}))]
    if au_heard:
        owned.append(owner_facts("M2MOne AU", **(au or {})))
    heard = [(report("pod-a", 1, owned), 1.0), (report("pod-b", 7, []), 0.3)]
    return assemble(two_types(), heard, me=ME, no_owner_s={"M2MOne AU": 25.0},
                    broker_connected=connected, refresh_s=5, ttl_s=10, now_s=T0)


class Elements(HTMLParser):
    """Every element's tag, attributes and the page's text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def section(self, name: str) -> dict[str, str | None]:
        return next(a for t, a in self.tags if t == "section" and a.get("data-type") == name)


def text_of(html: str) -> str:
    return " ".join(" ".join(Elements(html).text).split())


def test_a_running_type_shows_its_owner_limits_backlog_and_latency():
    """Owner and standby, calls/s against the limit, in flight against max_concurrency,
    waiting per lane, the oldest job's age and p50/p99 per lane."""
    html = render(page())
    text = text_of(html)

    assert Elements(html).section("M2MOne NZ")["data-state"] == "running"
    assert "M2MOne NZ RUNNING" in text
    assert "Owner pod-a pid 1 (facts 1 s old)" in text
    assert "Standbys pod-b pid 7" in text
    assert "Calls per second 0.8 now, limit 2" in text
    assert "Calls in flight 1 of max_concurrency 1" in text
    assert "Waiting interactive 3 · bulk 0 · parked 0 (1 taken by the owner)" in text
    assert "Oldest waiting job 4 s" in text
    assert "interactive: p50 0.40 s, p99 1.20 s (40 jobs)" in text
    assert "bulk: none" in text
    assert "2 communicator type(s): 2 running" in text
    assert "No failures since the owner took the type over." in text


@pytest.mark.parametrize(("code", "http_status", "message", "words"), [
    ("10000001", 401, "Invalid credentials (also: caller IP outside the allowed range)",
     PAUSE_WORDS["10000001"]),
    (errors.UNAUTHORIZED, 401, "Control Center refused the credentials",
     PAUSE_WORDS[errors.UNAUTHORIZED]),
    ("10000024", 400, "Invalid API version", PAUSE_WORDS["10000024"]),
    ("10000030", 400, "Role has no access to this API function", PAUSE_WORDS["10000030"]),
    (errors.JASPER_UNREACHABLE, None, "connection refused by restapi1.jasper.com",
     OUTAGE_WORDS),
    ("TLS_UNTRUSTED", None, "the server's certificate is not trusted", OTHER_WORDS),
])
def test_a_paused_type_says_why_since_when_and_the_next_probe(code, http_status, message,
                                                             words):
    """For every pause reason: PAUSED in words, the operator's words, Control Center's own
    message and code, since when, and when the next probe runs."""
    html = render(page(au={"paused": paused_facts(code, message, http_status),
                           "parked": 12, "oldest_waiting_age_s": 125.0,
                           "oldest_waiting_at_least": True}))
    text = text_of(html)
    status = f", HTTP {http_status}" if http_status is not None else ""

    assert Elements(html).section("M2MOne AU")["data-state"] == "paused"
    assert "M2MOne AU PAUSED" in text
    assert "PAUSED: M2MOne AU" in text  # in the summary line at the top, too
    assert " ".join(words.split()) in text
    assert f"Control Center said: {message} ({code}{status})" in text
    assert "Paused since 2027-01-15 07:57:55 UTC (2 min 5 s) · next probe in 12 s" in text
    assert "parked 12" in text
    assert "Oldest waiting job at least 2 min 5 s (parked)" in text
    assert "<title>jasper-consumer jc: 1 paused</title>" in html


def test_a_type_without_owner_says_for_how_long():
    """No owner heard within the TTL: NO OWNER, for how long, what waits in its queue."""
    html = render(page(au_heard=False))
    text = text_of(html)

    assert Elements(html).section("M2MOne AU")["data-state"] == "no_owner"
    assert "M2MOne AU NO OWNER" in text
    assert "No owner for 25 s" in text
    assert "Waiting 7 in the work queue · parked 1" in text
    assert "Standbys pod-a pid 1, pod-b pid 7" in text
    assert "NO OWNER: M2MOne AU" in text


def test_a_growing_backlog_stands_out_in_words():
    """A growing backlog: a BACKLOG GROWING badge, the total, and the row marked."""
    html = render(page(nz={"backlog_growing": True, "backlog": 480,
                           "waiting": {"interactive": 30, "bulk": 450}}))
    text = text_of(html)

    assert "M2MOne NZ RUNNING BACKLOG GROWING" in text
    assert "480 in all, growing" in text
    assert "BACKLOG GROWING: M2MOne NZ" in text
    assert ("tr", {"class": "warn"}) in Elements(html).tags


def test_the_last_failures_are_listed_with_their_meaning():
    """Time, client, ICCID, code and meaning of each failure, newest first."""
    failures = [Failure(at=NOW, client_id="100234", iccid="89610185002345678901",
                        code="20000001", message="Resource not found - invalid ICCID")]
    text = text_of(render(page(nz={"failures": failures})))

    assert ("Time Client ICCID Code Meaning 08:00:00 100234 89610185002345678901 20000001 "
            "Resource not found - invalid ICCID") in text


def test_a_page_without_the_broker_says_so():
    """Not connected: a banner says only this process's facts are shown."""
    assert "Not connected to RabbitMQ" in text_of(render(page(connected=False)))
    assert "Not connected to RabbitMQ" not in text_of(render(page()))


def test_client_ids_and_error_texts_render_as_text():
    """A client id ``<script>`` and markup in an error text or a type name are shown as
    text: no element comes from them."""
    evil = '<script>alert("x")</script>'
    failures = [Failure(at=NOW, client_id=evil, iccid="<b>1</b>", code="<i>C</i>",
                        message='<img src=x onerror="alert(1)">')]
    html = render(page(nz={"failures": failures},
                       au={"paused": paused_facts("10000001", "<iframe src=//x>")}))
    elements = Elements(html)
    text = " ".join(elements.text)

    assert {tag for tag, _ in elements.tags} <= {
        "html", "head", "meta", "link", "title", "style", "body", "header", "h1", "span", "p",
        "main", "section", "h2", "div", "table", "tr", "th", "td", "h3", "thead", "tbody",
        "strong", "footer", "a", "br"}
    assert evil in text
    assert '<img src=x onerror="alert(1)">' in text
    assert "<iframe src=//x>" in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html


def test_the_page_fetches_nothing_and_reloads_itself():
    """No script, no external resource, an empty icon; a meta refresh."""
    elements = Elements(render(page()))

    assert ("meta", {"http-equiv": "refresh", "content": "5"}) in elements.tags
    assert not any(tag == "script" for tag, _ in elements.tags)
    links = [a.get("href") for t, a in elements.tags if t in ("link", "a")]
    assert links == ["data:,", "status.json"]


async def test_the_routes_serve_the_page_and_json_matching_the_schema():
    """GET / is HTML with a CSP that allows no script; GET /status.json validates against
    docs/schemas/status.schema.json and holds the same facts."""
    facts = page(au={"paused": paused_facts("10000001", "Invalid credentials")})
    server = ProbeServer(CollectorRegistry(), lambda: (True, "ok"), routes(lambda: facts))
    await server.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.port}") as http:
            async with http.get("/") as resp:
                html = await resp.text()
                assert resp.headers["Content-Security-Policy"] == CSP
                assert resp.content_type == "text/html"
            async with http.get("/status.json") as resp:
                data = await resp.json()
            async with http.get("/healthz") as resp:
                assert resp.status == 200
    finally:
        await server.stop()

    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator
                               .FORMAT_CHECKER).validate(data)
    assert StatusReport.model_validate(data) == facts
    assert "M2MOne AU PAUSED" in text_of(html)
    assert [t["state"] for t in data["communicator_types"]] == ["running", "paused"]
