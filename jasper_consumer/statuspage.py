"""``GET /`` and ``GET /status.json`` on ``http_port``: the status page (operator guide,
"Status page").

The page is plain HTML rendered on the server from a :class:`~.status.StatusReport`: no
script, nothing fetched from anywhere (styles inline, no icon), so it works in a closed
network; it reloads itself every few seconds. Every value from outside the code (type
names, client ids, ICCIDs, error texts, host names) is HTML-escaped, and the page is
served with a Content-Security-Policy that allows no script at all. A paused type, a type
without an owner and a growing backlog are told in words as well as in colour.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from datetime import datetime

from aiohttp import web

from .status import Failure, LaneLatency, StatusReport, TypeStatus

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; " \
      "form-action 'none'; frame-ancestors 'none'"

_STYLE = """
body{font:15px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
 margin:0;background:#f4f5f7;color:#1d1f23}
header{background:#1d2b3a;color:#fff;padding:12px 20px}
header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#cdd6e0;font-size:13px}
.alarm{background:#b00020;color:#fff;padding:8px 20px;font-weight:600}
.summary{padding:10px 20px;font-size:16px}
main{display:flex;flex-wrap:wrap;gap:16px;padding:0 20px 20px}
section.type{background:#fff;border:1px solid #c9ced6;border-top:8px solid #2e7d32;
 border-radius:6px;padding:12px 16px;flex:1 1 560px;max-width:760px}
section.paused{border-color:#b00020;border-top-width:8px;background:#fff7f7}
section.no_owner{border-top-color:#8a5a00;background:#fffaf0}
h2{margin:0 0 8px;font-size:19px}
.badge{display:inline-block;font-size:13px;font-weight:700;padding:2px 8px;border-radius:4px;
 margin-left:6px;vertical-align:2px;color:#fff;background:#2e7d32}
.badge.paused{background:#b00020}.badge.no_owner{background:#8a5a00}
.badge.growing{background:#e65100}
.why{border-left:4px solid #b00020;padding:4px 10px;margin:8px 0;background:#fff}
.no_owner .why{border-left-color:#8a5a00}
.why p{margin:4px 0}.words{font-weight:600}
table{border-collapse:collapse;width:100%;margin:6px 0}
th,td{text-align:left;padding:3px 8px 3px 0;vertical-align:top}
table.facts th{width:190px;color:#4a5563;font-weight:600}
tr.warn td{color:#b33c00;font-weight:700}
table.failures{font-size:13px}
table.failures th{border-bottom:1px solid #c9ced6}
table.failures td{border-bottom:1px solid #eceef1}
table.failures td.nw{white-space:nowrap}
h3{font-size:15px;margin:12px 0 2px}
.muted{color:#5f6b7a}.mono{font-family:ui-monospace,"DejaVu Sans Mono",monospace}
footer{padding:0 20px 20px;font-size:13px;color:#4a5563}
"""


def e(value: object) -> str:
    """HTML-escape anything shown on the page."""
    return html.escape(str(value), quote=True)


def duration(seconds: float | None) -> str:
    """``12 s``, ``3 min 2 s``, ``2 h 5 min`` (``-`` when unknown)."""
    if seconds is None:
        return "-"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def clock(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S UTC")


def render(report: StatusReport) -> str:
    """The whole page."""
    now = report.generated_at
    types = report.communicator_types
    paused = [t.name for t in types if t.state == "paused"]
    no_owner = [t.name for t in types if t.state == "no_owner"]
    growing = [t.name for t in types if t.backlog_growing]
    title = "all running" if not (paused or no_owner) else ", ".join(
        ([f"{len(paused)} paused"] if paused else [])
        + ([f"{len(no_owner)} without owner"] if no_owner else []))
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{report.refresh_seconds}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>jasper-consumer {e(report.queue_prefix)}: {e(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<header>",
        f"<h1>jasper-consumer <span class=\"mono\">{e(report.queue_prefix)}</span></h1>",
        f"<p>Served by {e(report.served_by.host)} pid {report.served_by.pid} at "
        f"{e(clock(now))}. Reloads every {report.refresh_seconds} s; an owner's facts are "
        f"at most {report.facts_ttl_seconds:.0f} s old, else the type shows no owner.</p>",
        "</header>",
    ]
    if not report.broker_connected:
        parts.append('<div class="alarm">Not connected to RabbitMQ: this page shows only '
                     "what this process knows, and no other process's facts.</div>")
    summary = [f"{len(types)} communicator type(s): {len(types) - len(paused) - len(no_owner)}"
               " running"]
    if paused:
        summary.append(f"<strong>PAUSED: {e(', '.join(paused))}</strong>")
    if no_owner:
        summary.append(f"<strong>NO OWNER: {e(', '.join(no_owner))}</strong>")
    if growing:
        summary.append(f"<strong>BACKLOG GROWING: {e(', '.join(growing))}</strong>")
    dead = "unknown" if report.dead_letters is None else str(report.dead_letters)
    summary.append(f"dead letters: {e(dead)}")
    parts.append(f'<p class="summary">{" · ".join(summary)}</p>')
    parts.append("<main>")
    parts += [_type(t, now) for t in types]
    parts.append("</main>")
    parts.append(_footer(report))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


_BADGE = {"running": "RUNNING", "paused": "PAUSED", "no_owner": "NO OWNER"}


def _type(t: TypeStatus, now: datetime) -> str:
    badges = f'<span class="badge {t.state}">{_BADGE[t.state]}</span>'
    if t.backlog_growing:
        badges += '<span class="badge growing">BACKLOG GROWING</span>'
    out = [f'<section class="type {t.state}" data-type="{e(t.name)}" data-state="{t.state}">',
           f"<h2>{e(t.name)} {badges}</h2>"]
    if t.pause is not None:
        p = t.pause
        said = f"{p.code}" + (f", HTTP {p.http_status}" if p.http_status is not None else "")
        since = "" if p.since is None else (
            f"Paused since {e(clock(p.since))} ({duration((now - p.since).total_seconds())})")
        probe = "" if p.next_probe_at is None else (
            " · next probe " + ("now" if p.next_probe_at <= now else
                                f"in {duration((p.next_probe_at - now).total_seconds())}"))
        out += ['<div class="why">',
                f'<p class="words">{e(p.words)}</p>',
                f"<p>Control Center said: {e(p.message)} ({e(said)})</p>",
                f"<p>{since}{probe}</p>" if since or probe else "",
                "<p class=\"muted\">Its events wait, in order, each with one delayed signal; "
                "none is lost and nothing needs to be clicked again.</p>",
                "</div>"]
    if t.state == "no_owner":
        out += ['<div class="why">',
                f'<p class="words">No owner for {duration(t.no_owner_for_s)}: no running '
                "process has reported that it consumes this type's work queue.</p>",
                "<p class=\"muted\">Events wait in RabbitMQ (none is lost). If this lasts "
                "more than a few seconds, check that the service runs (operator guide, "
                "JasperConsumerDown) and that its work queue has a consumer.</p>",
                "</div>"]
    rows: list[tuple[str, str, bool]] = []
    owner = "-" if t.owner is None else (
        f"{e(t.owner.host)} pid {t.owner.pid} <span class=\"muted\">(facts "
        f"{duration(t.facts_age_s)} old)</span>")
    rows.append(("Owner", owner, False))
    standbys = ", ".join(f"{e(s.host)} pid {s.pid}" for s in t.standbys) or "none"
    rows.append(("Standbys", standbys, False))
    if t.calls_per_second is not None:
        rows.append(("Calls per second", f"{t.calls_per_second:g} now, limit "
                     f"{t.requests_per_second:g}", False))
    if t.in_flight is not None:
        rows.append(("Calls in flight", f"{t.in_flight} of max_concurrency "
                     f"{t.max_concurrency}", False))
    rows.append(("Waiting", _waiting(t), t.backlog_growing))
    if t.oldest_waiting_age_s is not None or t.state != "no_owner":
        oldest = duration(t.oldest_waiting_age_s)
        if t.oldest_waiting_at_least:
            oldest = f"at least {oldest} (parked)"
        rows.append(("Oldest waiting job", oldest, False))
    if t.time_to_final is not None:
        rows.append(("Publish → final signal (10 min)", _latency(t.time_to_final), False))
    if t.dead_lettered_10m is not None:
        rows.append(("Dead-lettered (10 min)", str(t.dead_lettered_10m),
                     t.dead_lettered_10m > 0))
    out.append('<table class="facts">')
    for head, value, warn in rows:
        out.append(f'<tr{" class=warn" if warn else ""}><th>{e(head)}</th><td>{value}</td></tr>')
    out.append("</table>")
    out.append(_failures(t.failures, t.state))
    out.append("</section>")
    return "\n".join(x for x in out if x)


def _waiting(t: TypeStatus) -> str:
    parked = "" if t.parked is None else f" · parked {t.parked}"
    if t.waiting is None:  # no owner: only what the queues hold
        work = t.queued.work
        return ("-" if work is None else f"{work.ready} in the work queue") + parked
    text = f"interactive {t.waiting.interactive} · bulk {t.waiting.bulk}{parked}"
    if t.held is not None and (t.held.interactive or t.held.bulk):
        text += (f' <span class="muted">({t.held.interactive + t.held.bulk} taken by the '
                 "owner)</span>")
    if t.backlog_growing:
        text += f" · <strong>{t.backlog} in all, growing</strong> (more than 30 s ago)"
    return text


def _latency(lanes: LaneLatency) -> str:
    out = []
    for name, lat in (("interactive", lanes.interactive), ("bulk", lanes.bulk)):
        if lat.count == 0:
            out.append(f"{name}: none")
        else:
            out.append(f"{name}: p50 {lat.p50_s:.2f} s, p99 {lat.p99_s:.2f} s "
                       f"({lat.count} jobs)")
    return "<br>".join(out)


def _failures(failures: list[Failure], state: str) -> str:
    if state == "no_owner":
        return ""
    if not failures:
        return '<p class="muted">No failures since the owner took the type over.</p>'
    rows = ["<h3>Last failures</h3>", '<table class="failures"><thead><tr><th>Time</th>'
            "<th>Client</th><th>ICCID</th><th>Code</th><th>Meaning</th></tr></thead><tbody>"]
    for f in failures:
        rows.append(f'<tr><td class="nw">{e(f.at.strftime("%H:%M:%S"))}</td>'
                    f'<td class="nw">{e(f.client_id)}</td>'
                    f'<td class="nw mono">{e(f.iccid or "-")}</td><td class="nw">{e(f.code)}</td>'
                    f"<td>{e(f.message)}</td></tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _footer(report: StatusReport) -> str:
    procs = "; ".join(
        f"{e(p.host)} pid {p.pid} (v{e(p.version)}, owns "
        f"{e(', '.join(p.owns)) if p.owns else 'nothing'}, heard {duration(p.last_heard_s)} ago)"
        for p in report.processes) or "none heard"
    return (f"<footer><p>Processes: {procs}.</p>"
            '<p>The same facts for scripts: <a href="status.json">status.json</a>. '
            "What each field means: operator guide, section Status page.</p></footer>")


def routes(snapshot: Callable[[], StatusReport]) -> list[web.RouteDef]:
    """``/`` (the page) and ``/status.json`` (its facts), from ``snapshot()``."""

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=render(snapshot()), content_type="text/html",
                            headers={"Cache-Control": "no-store",
                                     "Content-Security-Policy": CSP})

    async def as_json(_: web.Request) -> web.Response:
        return web.Response(text=snapshot().model_dump_json(indent=2),
                            content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    return [web.get("/", page), web.get("/status.json", as_json)]
