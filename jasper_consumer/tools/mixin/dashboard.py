"""The Grafana dashboard: one deployment at a time, picked by its namespace and job.

:func:`dashboard` builds it once; :func:`for_import` and :func:`for_sidecar` ship it in
the two forms Grafana takes:

* **import** (``deploy/grafana/``): Grafana's export format. ``__inputs`` asks for the
  Prometheus data source on import, ``__requires`` names the Grafana version and plugins;
* **sidecar** (a ConfigMap of the monitoring component): the sidecar does not resolve
  ``__inputs``, so the data source is the dashboard's ``datasource`` variable, which
  starts on Grafana's default Prometheus.

Either way every panel queries ``${datasource}``, so a viewer can switch between
Prometheus servers. Panels are laid out in rows of equal-width panels by :func:`_layout`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from .promql import MixinConfig, Series, one_deployment

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
INPUT = "DS_PROMETHEUS"
#: The oldest Grafana that knows schemaVersion 39.
GRAFANA_VERSION = "10.4.0"
PANEL_NAMES = {"stat": "Stat", "timeseries": "Time series"}


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: list[Query]
    kind: str = "timeseries"
    unit: str = "short"
    #: (value from which, colour), lowest first; the first value is None.
    steps: list[tuple[float | None, str]] = field(default_factory=list)
    mappings: dict[str, tuple[str, str]] = field(default_factory=dict)

    def to_json(self, panel_id: int, grid: dict[str, int]) -> dict[str, Any]:
        targets = [{"datasource": DATASOURCE, "expr": q.expr, "legendFormat": q.legend,
                    "refId": chr(ord("A") + i), "range": True}
                   for i, q in enumerate(self.queries)]
        base = {"type": self.kind, "id": panel_id, "title": self.title,
                "description": self.description, "datasource": DATASOURCE, "gridPos": grid}
        if self.kind == "stat":
            defaults: dict[str, Any] = {
                "unit": self.unit,
                "mappings": [{"type": "value", "options": {
                    value: {"text": text, "color": colour, "index": i}
                    for i, (value, (text, colour)) in enumerate(self.mappings.items())}}]
                if self.mappings else [],
                "thresholds": {"mode": "absolute", "steps": [
                    {"color": colour, "value": value} for value, colour in self.steps]}}
            options: dict[str, Any] = {
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "colorMode": "background", "graphMode": "none", "textMode": "auto",
                "orientation": "auto", "justifyMode": "auto"}
        else:
            defaults = {"unit": self.unit, "min": 0, "custom": {
                "drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                "showPoints": "never", "spanNulls": False}}
            options = {"legend": {"displayMode": "list", "placement": "bottom",
                                  "showLegend": True},
                       "tooltip": {"mode": "multi", "sort": "desc"}}
        return {**base, "fieldConfig": {"defaults": defaults, "overrides": []},
                "options": options, "targets": targets}


def _rate(s: Series, fn: str, metric: str, group: str, *extra: str) -> str:
    selector = s.jasper(metric, *extra)
    return f"sum by ({group}) ({fn}({selector}[$__rate_interval]))"


def _quantile(q: float, s: Series, metric: str, group: str, *extra: str) -> str:
    return f"histogram_quantile({q}, {_rate(s, 'rate', metric, 'le, ' + group, *extra)})"


def rows(config: MixinConfig) -> list[tuple[str, int, list[Panel]]]:
    """(row title, panel height, panels) from top to bottom."""
    s = one_deployment(config)
    ct = 'communicator_type=~"$communicator_type"'
    rabbit = s.rabbitmq
    waiting = s.per_queue(rabbit("rabbitmq_queue_messages"), "events", "work", "parked")
    dead = s.per_queue(rabbit("rabbitmq_queue_messages"), "dead")
    return [
        ("Overview", 4, [
            Panel("Communicator types",
                  "UP while the type accepts calls; PAUSED while Control Center rejects its "
                  "settings or answers only errors (its events wait, each got a delayed "
                  "signal). Lowest over the replicas.",
                  [Query(f"min by (communicator_type) "
                         f"({s.jasper('jasper_communicator_up', ct)})",
                         "{{communicator_type}}")],
                  kind="stat", steps=[(None, "red"), (1, "green")],
                  mappings={"0": ("PAUSED", "red"), "1": ("UP", "green")}),
            Panel("Ready replicas",
                  "Replicas whose /readyz answers ready (broker connected, every consumer "
                  "registered). One is active per queue, the others are standbys.",
                  [Query(f"sum({s.jasper('jasper_ready')})", "ready")],
                  kind="stat", steps=[(None, "red"), (1, "orange"), (2, "green")]),
            Panel("Broker connections", "Replicas connected to RabbitMQ.",
                  [Query(f"sum({s.jasper('jasper_broker_connected')})", "connected")],
                  kind="stat", steps=[(None, "red"), (1, "green")]),
            Panel("Events waiting",
                  "Messages in the events and work queues (ready and unacknowledged), from "
                  "RabbitMQ.",
                  [Query(f"sum({waiting})", "waiting")],
                  kind="stat", steps=[(None, "green"), (100, "orange"), (1000, "red")]),
            Panel("Dead letters",
                  "Messages in <prefix>.dead: unreadable messages and events whose retries "
                  "ran out. `jasper-consumer dead-letters list` shows them.",
                  [Query(f"sum({dead})", "dead letters")],
                  kind="stat", steps=[(None, "green"), (1, "red")]),
            Panel("Since last success", "Time since the last command that succeeded, per type.",
                  [Query(f"time() - max by (communicator_type) "
                         f"({s.jasper('jasper_last_success_timestamp_seconds', ct)})",
                         "{{communicator_type}}")],
                  kind="stat", unit="s", steps=[(None, "green")]),
        ]),
        ("Time to final signal, per lane", 8, [
            Panel("Time to live, interactive",
                  "From the router receiving a commission (an interactive job: a technician "
                  "waits on site) to its final signal being confirmed, per type: p50 and p99. "
                  "Alert JasperInteractiveSlow: p99 above a minute for 10 minutes.",
                  [Query(_quantile(q, s, "jasper_time_to_final_seconds_bucket",
                                   "communicator_type", ct, 'lane="interactive"'),
                         f"{{{{communicator_type}}}} p{p}") for q, p in ((0.5, 50), (0.99, 99))],
                  unit="s"),
            Panel("Time to final signal, bulk",
                  "The same for bulk jobs (decommissions, reconcile's and replay's events), "
                  "which take the calls interactive jobs leave: minutes behind a backlog are "
                  "normal.",
                  [Query(_quantile(q, s, "jasper_time_to_final_seconds_bucket",
                                   "communicator_type", ct, 'lane="bulk"'),
                         f"{{{{communicator_type}}}} p{p}") for q, p in ((0.5, 50), (0.99, 99))],
                  unit="s"),
        ]),
        ("Per communicator type: rate, errors, duration", 8, [
            Panel("Commands by outcome",
                  "Final outcomes per second (succeeded, failed). Delayed events are counted "
                  "separately, below.",
                  [Query(_rate(s, "rate", "jasper_commands_total", "communicator_type, outcome",
                               ct), "{{communicator_type}} {{outcome}}")], unit="ops"),
            Panel("Failure ratio", "Failed final outcomes / all final outcomes.",
                  [Query(_rate(s, "rate", "jasper_commands_total", "communicator_type", ct,
                               'outcome="failed"') + " / "
                         + _rate(s, "rate", "jasper_commands_total", "communicator_type", ct),
                         "{{communicator_type}}")], unit="percentunit"),
            Panel("API errors by code",
                  "Control Center answers that were not a success, by error code (20000001 "
                  "unknown ICCID, 10000001 invalid credentials, 40000029 rate limit, "
                  "JASPER_UNREACHABLE, UNEXPECTED_RESPONSE).",
                  [Query(_rate(s, "rate", "jasper_api_errors_total", "communicator_type, code",
                               ct), "{{communicator_type}} {{code}}")], unit="ops"),
            Panel("API request duration",
                  "Duration of Control Center calls (activate, deactivate, echo probes): p50, "
                  "p95, p99.",
                  [Query(_quantile(q, s, "jasper_api_request_duration_seconds_bucket",
                                   "communicator_type", ct), f"{{{{communicator_type}}}} p{p}")
                   for q, p in ((0.5, 50), (0.95, 95), (0.99, 99))], unit="s"),
            Panel("Event processing time p95",
                  "Receive to ack, per stage: route (events queue) and apply (work queues; "
                  "includes waiting for the account's limits and retries).",
                  [Query(_quantile(0.95, s, "jasper_event_processing_seconds_bucket", "stage"),
                         "{{stage}} p95")], unit="s"),
            Panel("Events received and local failures",
                  "Events consumed by event code, and events failed without an API call "
                  "(INVALID_ICCID, MISSING_ICCID, UNKNOWN_COMMUNICATOR_TYPE, ...): the "
                  "failures of communicator_type \"unknown\" are all here.",
                  [Query(_rate(s, "rate", "jasper_events_received_total", "event_code"),
                         "received {{event_code}}"),
                   Query(_rate(s, "rate", "jasper_local_failures_total", "code"),
                         "failed {{code}}")], unit="ops"),
        ]),
        ("Backlog and in-flight", 8, [
            Panel("Backlog (ready messages)",
                  "Messages ready in each queue of the deployment, from RabbitMQ's per-queue "
                  "metrics.",
                  [Query(s.per_queue(rabbit("rabbitmq_queue_messages_ready"),
                                     "events", "work", "parked", "dead", "history"),
                         "{{queue}}")]),
            Panel("Unacknowledged messages",
                  "Delivered to a replica and not yet acknowledged: being processed. A "
                  "paused type's events wait in its parked queue instead (Backlog).",
                  [Query(s.per_queue(rabbit("rabbitmq_queue_messages_unacked"),
                                     "events", "work"), "{{queue}}")]),
            Panel("In-flight API calls and consumers",
                  "Control Center calls in flight per type (at most max_concurrency), and "
                  "consumers per queue (a queue has one active consumer; the others wait).",
                  [Query(f"sum by (communicator_type) "
                         f"({s.jasper('jasper_inflight_commands', ct)})",
                         "in flight {{communicator_type}}"),
                   Query(s.per_queue(rabbit("rabbitmq_queue_consumers"), "events", "work"),
                         "consumers {{queue}}")]),
        ]),
        ("Retries, delays, dead letters", 8, [
            Panel("Retries by reason",
                  "Retried Control Center calls (rate_limited, timeout, unreachable, "
                  "server_error, unexpected_response).",
                  [Query(_rate(s, "increase", "jasper_retries_total",
                               "communicator_type, reason", ct),
                         "{{communicator_type}} {{reason}}")]),
            Panel("Delayed, coalesced, echo probes",
                  "Delayed signals (the type is paused), events served by an identical call "
                  "already queued (no API call), and Echo probes of a paused type by result.",
                  [Query(_rate(s, "increase", "jasper_delayed_total", "communicator_type", ct),
                         "delayed {{communicator_type}}"),
                   Query(_rate(s, "increase", "jasper_coalesced_total", "communicator_type",
                               ct), "coalesced {{communicator_type}}"),
                   Query(_rate(s, "increase", "jasper_echo_probes_total",
                               "communicator_type, result", ct),
                         "probe {{result}} {{communicator_type}}")]),
            Panel("Dead letters", "Messages sent to <prefix>.dead by reason, and the queue's "
                  "depth.",
                  [Query(_rate(s, "increase", "jasper_dead_lettered_total", "reason"),
                         "{{reason}}"),
                   Query(f"sum({dead})", "in the queue")]),
        ]),
        ("Service", 6, [
            Panel("Communicator up",
                  "1 while the type accepts calls, 0 while paused; lowest over the replicas.",
                  [Query(f"min by (communicator_type) "
                         f"({s.jasper('jasper_communicator_up', ct)})",
                         "{{communicator_type}}")]),
            Panel("Replicas: broker and readiness", "Per replica: connected to RabbitMQ, ready.",
                  [Query(f"sum by (pod) ({s.jasper('jasper_broker_connected')})",
                         "connected {{pod}}"),
                   Query(f"sum by (pod) ({s.jasper('jasper_ready')})", "ready {{pod}}")]),
            Panel("History publish failures",
                  "Signals RabbitMQ did not confirm (the event is redelivered), and the "
                  "running versions.",
                  [Query(f"sum(increase("
                         f"{s.jasper('jasper_history_publish_failures_total')}"
                         f"[$__rate_interval]))", "unconfirmed signals"),
                   Query(f"count by (version) ({s.jasper('jasper_build_info')})",
                         "replicas on {{version}}")]),
        ]),
    ]


def _layout(config: MixinConfig) -> list[dict[str, Any]]:
    """Each row header, then its panels side by side, sharing the 24 columns equally."""
    panels: list[dict[str, Any]] = []
    y = 0
    for title, height, row in rows(config):
        panels.append({"type": "row", "id": len(panels) + 1, "title": title,
                       "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        y += 1
        widths = _widths(len(row))
        x = 0
        for panel, width in zip(row, widths, strict=True):
            grid = {"h": height, "w": width, "x": x, "y": y}
            panels.append(panel.to_json(len(panels) + 1, grid))
            x += width
        y += height
    return panels


def _widths(count: int) -> list[int]:
    """``count`` widths that fill 24 columns; a stat row of six gets 6, 3, 3, 4, 4, 4."""
    if count == 6:
        return [6, 3, 3, 4, 4, 4]
    if 24 % count:
        raise ValueError(f"a row of {count} panels does not fill 24 columns: use 1-4, 6, 8")
    return [24 // count] * count


def _variables(config: MixinConfig) -> list[dict[str, Any]]:
    def query(name: str, label: str, expr: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
                "definition": expr, "query": {"query": expr, "refId": f"{name}-query"},
                "refresh": 2, "sort": 1, "hide": 0, "regex": "", "options": [],
                "current": {}, "includeAll": False, "multi": False, **extra}

    selector = config.selector
    return [
        {"name": "datasource", "label": "Data source", "type": "datasource",
         "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "",
         "options": [], "includeAll": False, "multi": False},
        query("namespace", "Namespace", f"label_values(jasper_build_info{{{selector}}}, "
                                        f"namespace)"),
        query("job", "Job", f'label_values(jasper_build_info{{{selector}, '
                            f'namespace="$namespace"}}, job)'),
        query("communicator_type", "Communicator type",
              f'label_values(jasper_communicator_up{{{selector}, namespace="$namespace", '
              f'job="$job"}}, communicator_type)',
              includeAll=True, multi=True, allValue=".*",
              current={"selected": True, "text": ["All"], "value": ["$__all"]}),
    ]


def dashboard(config: MixinConfig) -> dict[str, Any]:
    """The dashboard as Grafana keeps it, with ``${datasource}`` everywhere."""
    return {
        "uid": config.dashboard_uid,
        "title": config.dashboard_title,
        "description": "Patriot commission/decommission events to SIM status in Cisco Jasper "
                       "Control Center, for one deployment (namespace, job): per communicator "
                       "type rate, errors and duration; queues; retries, delays and dead "
                       "letters.",
        "tags": ["jasper-consumer", "patriot", "rabbitmq"],
        "timezone": "", "editable": True, "graphTooltip": 1, "refresh": "30s",
        "schemaVersion": 39, "version": 1, "time": {"from": "now-6h", "to": "now"},
        "timepicker": {}, "links": [],
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": _variables(config)},
        "panels": _layout(config),
    }


def for_sidecar(config: MixinConfig) -> dict[str, Any]:
    """For Grafana's dashboard sidecar: the ``datasource`` variable starts on the default."""
    return dashboard(config)


def for_import(config: MixinConfig) -> dict[str, Any]:
    """Grafana's export format: ``__inputs`` asks for the data source the variable starts on."""
    board = copy.deepcopy(dashboard(config))
    for variable in board["templating"]["list"]:
        if variable["type"] == "datasource":
            variable["current"] = {"selected": False, "text": "Prometheus",
                                   "value": f"${{{INPUT}}}"}
    panel_types = sorted({p["type"] for p in board["panels"] if p["type"] != "row"})
    return {
        "__inputs": [{"name": INPUT, "label": "Prometheus",
                      "description": "The Prometheus that scrapes jasper-consumer and "
                                     "RabbitMQ", "type": "datasource",
                      "pluginId": "prometheus", "pluginName": "Prometheus"}],
        "__elements": {},
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana",
             "version": GRAFANA_VERSION},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            *({"type": "panel", "id": kind, "name": PANEL_NAMES[kind], "version": ""}
              for kind in panel_types),
        ],
        "id": None,
        **board,
    }
