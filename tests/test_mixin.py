"""The alert rules and the Grafana dashboard: generated from one source, current, valid PromQL,
and about one deployment at a time.

``promtool`` checks and unit-tests the rules (deploy/prometheus/alerts.test.yaml runs two
deployments side by side) and parses every dashboard query.
"""

from __future__ import annotations

import json
import re
import tomllib
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from jasper_consumer import __version__
from jasper_consumer.config import parse_settings
from jasper_consumer.metrics import Metrics
from jasper_consumer.tools import mixin

from .external import REPO, run, tool

RULES = REPO / mixin.RULES
ALERT_TESTS = RULES.parent / "alerts.test.yaml"
GUIDE = REPO / "docs" / "operator-guide.md"
BASE_CONFIG = REPO / "deploy" / "k8s" / "base" / "config.yaml"

REQUIRED_ALERTS = {
    "JasperConsumerDown", "JasperBacklogGrowing", "JasperQueueWithoutConsumer",
    "JasperFailureRatioHigh", "JasperCommunicatorTypeDown", "JasperDeadLettersPresent",
    "JasperRateLimited", "JasperNoSuccessWhileEventsWait", "JasperQueueMetricsMissing",
    "JasperInteractiveSlow",
}
#: Alerts about no deployment in particular (nothing is scraped at all).
GLOBAL_ALERTS = {"JasperConsumerNotScraped"}
SERVICE_SERIES = re.compile(r"\b(jasper_\w+|up)\b")


# -- generated, and current --------------------------------------------------------------------


def test_generated_files_are_current():
    """deploy/'s rules and dashboards are what `make mixin` writes from the generator."""
    assert mixin.stale(REPO, mixin.default_config()) == [], "run `make mixin`"


def test_check_mode_reports_a_stale_file(tmp_path, capsys):
    """`--check` exits 1 naming a hand-edited file, and 0 once the files are rewritten."""
    assert mixin.main(["--out", str(tmp_path)]) == 0
    (tmp_path / mixin.RULES).write_text("groups: []\n")

    assert mixin.main(["--out", str(tmp_path), "--check"]) == 1
    assert str(mixin.RULES) in capsys.readouterr().err
    assert mixin.main(["--out", str(tmp_path)]) == 0
    assert mixin.main(["--out", str(tmp_path), "--check"]) == 0


def test_selector_setting_reaches_every_rule_and_panel():
    """Another selector replaces the default in every rule and every dashboard query."""
    config = mixin.MixinConfig(selector='job="patriot-sims"')
    texts = mixin.render(config)

    assert mixin.default_config().selector not in "".join(texts.values())
    assert 'up{job="patriot-sims"}' in texts[mixin.RULES]
    assert 'job=\\"patriot-sims\\", namespace=\\"$namespace\\"' in texts[mixin.DASHBOARD_IMPORT]


# -- alert rules -------------------------------------------------------------------------------


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def _alerts() -> list[dict[str, Any]]:
    return [r for g in rule_groups() for r in g["rules"]]


def test_promtool_accepts_the_rules():
    """`promtool check rules` accepts alerts.yaml."""
    result = run(tool("promtool", "PROMTOOL"), "check", "rules", RULES)

    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_unit_tests():
    """With two deployments side by side, each alert fires for the one it is about only."""
    result = run(tool("promtool", "PROMTOOL"), "test", "rules", ALERT_TESTS)

    assert result.returncode == 0, result.stdout + result.stderr


def _expected() -> list[tuple[str, dict[str, Any]]]:
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    return [(case["alertname"], alert) for t in tests for case in t.get("alert_rule_test", [])
            for alert in case.get("exp_alerts") or []]


def test_every_alert_is_unit_tested_firing():
    """Each alert has a promtool case in which it fires."""
    assert {a["alert"] for a in _alerts()} <= {name for name, _ in _expected()}


def test_every_page_names_its_deployment():
    """Every expected alert carries namespace and job (a page says which environment)."""
    for name, alert in _expected():
        if name not in GLOBAL_ALERTS:
            assert {"namespace", "job"} <= set(alert["exp_labels"]), (name, alert)


def _operand(text: str, open_paren: int) -> str:
    """The text inside the parenthesis that opens at ``open_paren``."""
    depth = 0
    for i in range(open_paren, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_paren + 1 : i]
    raise ValueError(f"unbalanced: {text[open_paren:]}")


def aggregation_problems(expr: str) -> list[str]:
    """Aggregations and joins over the service's series that lose namespace or job.

    RabbitMQ's series are aggregated ``by (queue)`` and joined ``on (queue)`` to
    ``jasper_queue_info``, which brings the deployment's labels: that is the one exception.
    """
    problems = []
    aggregation = re.compile(r"\b(sum|min|max|avg|count|group|stddev|stdvar)\s*"
                             r"(?:(by|without)\s*\(([^)]*)\)\s*)?\(")
    for match in aggregation.finditer(expr):
        operand = _operand(expr, match.end() - 1)
        if not SERVICE_SERIES.search(operand):
            continue
        labels = {label.strip() for label in (match.group(3) or "").split(",")}
        if match.group(2) != "by" or not {"namespace", "job"} <= labels:
            problems.append(f"{match.group(0)}…")
    for match in re.finditer(r"\b(on|ignoring)\s*\(([^)]*)\)", expr):
        labels = {label.strip() for label in match.group(2).split(",")}
        rest = expr[match.end():]
        rabbit_join = labels == {"queue"} and re.match(
            r"\s*(group_left \(\)\s*)?max by \(queue\) \((deriv\()?rabbitmq_", rest)
        if match.group(1) == "ignoring" or not ({"namespace", "job"} <= labels or rabbit_join):
            problems.append(match.group(0))
    return problems


def test_every_aggregation_keeps_namespace_and_job():
    """No rule aggregates or joins the service's series without namespace and job."""
    for alert in _alerts():
        assert aggregation_problems(alert["expr"]) == [], alert["alert"]


def test_aggregation_check_catches_a_dropped_namespace():
    """The check itself flags the rule that made alerts blind to deployments."""
    assert aggregation_problems('sum by (communicator_type) (rate(jasper_commands_total[5m]))')
    assert aggregation_problems("x unless on (communicator_type) jasper_up{}")
    assert not aggregation_problems('max by (queue) (rabbitmq_queue_messages)')


def _exprs() -> list[str]:
    return [a["expr"] for a in _alerts()] + _dashboard_exprs(_dashboard("import"))


def test_no_rule_or_panel_spells_a_queue_name():
    """Queues are found through jasper_queue_info, so any queue_prefix works unchanged."""
    for expr in _exprs():
        assert not re.search(r"\bqueue\s*(=|=~|!=)\s*\"", expr), expr
        if "rabbitmq_" in expr:
            assert "jasper_queue_info" in expr, expr


def test_alerts_tell_what_to_do():
    """The required alerts exist, each with a severity, a summary, a description, a runbook."""
    alerts = _alerts()
    names = [a["alert"] for a in alerts]

    assert set(names) >= REQUIRED_ALERTS
    assert len(names) == len(set(names))
    for alert in alerts:
        assert alert["labels"]["severity"] in ("critical", "warning", "info"), alert["alert"]
        assert set(alert["annotations"]) == {"summary", "description", "runbook_url"}
        if alert["alert"] not in GLOBAL_ALERTS:
            assert "$labels.namespace" in alert["annotations"]["summary"], alert["alert"]


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub (and Gitea, GitLab) give the headings of a Markdown text."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def _mixin_settings() -> dict[str, Any]:
    table: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text())
    for key in mixin.SETTINGS_TABLE:
        table = table[key]
    return table


def test_runbook_urls_point_at_sections_of_the_operator_guide():
    """Each runbook_url is the documented setting (pyproject.toml, runbook_base) at the
    guide's heading named after the alert."""
    base = _mixin_settings()["runbook_base"]
    anchors = github_anchors(GUIDE.read_text())

    assert base.endswith("docs/operator-guide.md")
    for alert in _alerts():
        url, _, anchor = alert["annotations"]["runbook_url"].partition("#")
        assert url == base
        assert anchor == alert["alert"].lower()
        assert anchor in anchors, f"docs/operator-guide.md has no heading {alert['alert']}"


def test_every_alert_carries_the_routing_labels_set_in_one_place():
    """alert_labels of pyproject.toml reach every alert, and the promtool cases expect them."""
    labels = _mixin_settings()["alert_labels"]

    assert labels
    for alert in _alerts():
        assert alert["labels"].items() >= labels.items(), alert["alert"]
    for name, expected in _expected():
        assert expected["exp_labels"].items() >= labels.items(), name


def test_settings_come_from_pyproject(tmp_path):
    """runbook_base and alert_labels of [tool.jasper-consumer.mixin] reach the rules; an
    unknown key is an error that names it."""
    (tmp_path / "pyproject.toml").write_text(
        '[tool.jasper-consumer.mixin]\n'
        'runbook_base = "https://gitlab.example/p/j/-/blob/main/docs/operator-guide.md"\n'
        'alert_labels = {team = "noc"}\n')
    config = mixin.default_config(tmp_path)
    text = mixin.render(config)[mixin.RULES]

    assert "runbook_url: https://gitlab.example/p/j/-/blob/main/docs/operator-guide.md#" in text
    assert "team: noc" in text
    (tmp_path / "pyproject.toml").write_text('[tool.jasper-consumer.mixin]\nrunbok_base = "x"\n')
    with pytest.raises(ValueError, match="runbok_base"):
        mixin.default_config(tmp_path)


# -- dashboard ---------------------------------------------------------------------------------

REQUIRED_DASHBOARD_METRICS = {
    "jasper_commands_total", "jasper_api_errors_total",
    "jasper_api_request_duration_seconds_bucket", "rabbitmq_queue_messages_ready",
    "jasper_inflight_commands", "jasper_retries_total", "jasper_delayed_total",
    "jasper_dead_lettered_total", "jasper_communicator_up",
}
#: Values for the dashboard's variables when its queries are checked as PromQL.
_VARIABLES = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h",
              "namespace": "patriot", "job": "jasper-consumer", "communicator_type": ".*"}
_FORMS = {"import": mixin.DASHBOARD_IMPORT, "sidecar": mixin.DASHBOARD_SIDECAR}


def _dashboard(form: str) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads((REPO / _FORMS[form]).read_text())
    return dashboard


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels += panel.get("panels", [])
    return panels


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]


def _substitute(expr: str) -> str:
    """Fill in the dashboard's variables; a KeyError names an undefined one. ``$1`` (a
    label_replace group) is no variable: Grafana leaves it, and so does this."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return match.group(0) if name.isdigit() else _VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


@pytest.mark.parametrize("form", _FORMS)
def test_dashboard_is_well_formed(form):
    """Unique uid and panel ids, panels on the 24-column grid without overlap, datasource."""
    dashboard = _dashboard(form)
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    cells: set[tuple[int, int]] = set()

    assert dashboard["uid"]
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] < grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(grid["x"] + dx, grid["y"] + dy)
                for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])


def test_dashboard_picks_datasource_namespace_and_job():
    """The variables are the data source, then namespace and job, each chained to the last."""
    variables = {v["name"]: v for v in _dashboard("sidecar")["templating"]["list"]}

    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "namespace" in variables["namespace"]["query"]["query"]
    assert 'namespace="$namespace"' in variables["job"]["query"]["query"]
    for name in ("namespace", "job", "communicator_type"):
        assert variables[name]["datasource"]["uid"] == "${datasource}"


def test_every_panel_query_is_about_the_chosen_deployment():
    """Each selector of the service's series names $namespace and $job."""
    for expr in _dashboard_exprs(_dashboard("sidecar")):
        for match in re.finditer(r"\b(?:jasper_\w+|up)\{([^}]*)\}", expr):
            assert 'namespace="$namespace"' in match.group(1), expr
            assert 'job="$job"' in match.group(1), expr


def test_dashboard_queries_parse_as_promql(tmp_path):
    """promtool parses every dashboard query (as recording rules, variables filled in)."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": _substitute(expr)}
        for i, expr in enumerate(_dashboard_exprs(_dashboard("import")))]}]}
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules))

    result = run(tool("promtool", "PROMTOOL"), "check", "rules", path)

    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_shows_what_operators_watch():
    """Rate, errors, duration per type; backlog, in-flight; retries, delays, dead letters; up."""
    assert metric_names("\n".join(_dashboard_exprs(_dashboard("import")))) >= \
        REQUIRED_DASHBOARD_METRICS


def test_import_form_asks_for_the_datasource():
    """Grafana's export format: __inputs asks for Prometheus, __requires names what it needs."""
    dashboard = _dashboard("import")
    text = (REPO / mixin.DASHBOARD_IMPORT).read_text()
    (ds_input,) = dashboard["__inputs"]
    required = {(r["type"], r["id"]) for r in dashboard["__requires"]}
    panel_types = {p["type"] for p in _panels(dashboard) if p["type"] != "row"}

    assert (ds_input["type"], ds_input["pluginId"]) == ("datasource", "prometheus")
    assert "${" + ds_input["name"] + "}" in text, "the input must be used"
    assert {("grafana", "grafana"), ("datasource", "prometheus")} <= required
    assert {("panel", kind) for kind in panel_types} <= required
    assert dashboard["id"] is None


def test_sidecar_form_uses_the_datasource_variable():
    """The sidecar does not resolve __inputs: its form has none, only ${datasource}."""
    dashboard = _dashboard("sidecar")
    text = (REPO / mixin.DASHBOARD_SIDECAR).read_text()

    assert "__inputs" not in dashboard
    assert "__requires" not in dashboard
    assert "${DS_" not in text


def test_both_forms_show_the_same_panels():
    """One source: the two forms have the same panels, queries and variables."""
    ours, theirs = _dashboard("import"), _dashboard("sidecar")

    assert ours["panels"] == theirs["panels"]
    assert [v["name"] for v in ours["templating"]["list"]] == \
        [v["name"] for v in theirs["templating"]["list"]]


# -- metric names shared by the artefacts and the service --------------------------------------

_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "unless",
                 "and", "or", "bool", "offset"}


def metric_names(text: str, prefixes: tuple[str, ...] = ("jasper_", "rabbitmq_")) -> set[str]:
    """The metric names (sample names) that PromQL ``text`` refers to."""
    words = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b", text)) - _PROMQL_WORDS
    return {w for w in words if w.startswith(prefixes)}


def artefact_metric_names() -> set[str]:
    """Every service metric (``jasper_…``) named by the dashboard or the alert rules."""
    return metric_names("\n".join(_exprs()), ("jasper_",))


def defined_sample_names(registry: CollectorRegistry) -> set[str]:
    """The sample names a registry's metrics can export, labelled children or not."""
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("_count", "_sum", "_created", ""), "info": ("_info",)}
    return {family.name + s for family in registry.collect()
            for s in suffixes.get(family.type, ("",))}


ALLOWED_LABELS = {"event_code", "communicator_type", "command", "outcome", "code", "reason",
                  "stage", "result", "queue", "role", "version", "le", "lane"}


def test_artefacts_name_only_metrics_the_service_defines():
    """Each jasper_ metric in the dashboard and the alerts is defined in metrics.py."""
    defined = defined_sample_names(Metrics(CollectorRegistry()).registry)

    assert artefact_metric_names() - defined == set()


def test_metric_labels_come_from_closed_sets():
    """No metric has a label that could carry an ICCID, a client id or a secret."""
    metrics = Metrics(CollectorRegistry())
    labels = {name for metric in vars(metrics).values()
              for name in getattr(metric, "_labelnames", ())}

    assert labels <= ALLOWED_LABELS


def test_prepare_creates_every_series_the_rules_join_on():
    """After prepare(), the per-type series exist at 0 and jasper_queue_info names the queues."""
    metrics = Metrics(CollectorRegistry())
    settings = parse_settings(yaml.safe_load(BASE_CONFIG.read_text()),
                              {"AMQP_URL": "amqp://u:p@rabbitmq/"})
    metrics.prepare(settings)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in metrics.registry.collect() for s in family.samples}
    first = settings.communicator_types[0]

    key = ("jasper_commands_total", (("command", "activate"), ("communicator_type", first.name),
                                     ("outcome", "failed")))
    assert samples[key] == 0
    assert samples[("jasper_queue_info", (("communicator_type", first.name), ("queue",
                    f"{settings.queue_prefix}.work.{first.slug}"), ("role", "work")))] == 1
    assert samples[("jasper_queue_info", (("communicator_type", ""), ("queue",
                    f"{settings.queue_prefix}.events"), ("role", "events")))] == 1
    assert samples[("jasper_build_info", (("version", __version__),))] == 1
