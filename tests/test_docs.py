"""The README and the operator guide say what the code does: every config key, the broker
permissions the topology needs, the commands a platform team runs."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from jasper_consumer.config import (
    CommunicatorType,
    LaneSettings,
    RetrySettings,
    Settings,
    parse_settings,
)
from jasper_consumer.tools import mixin
from jasper_consumer.tools.mixin.alerts import alerts
from jasper_consumer.topology import Names

from .external import REPO
from .test_mixin import github_anchors

README = (REPO / "README.md").read_text()
GUIDE = (REPO / "docs" / "operator-guide.md").read_text()


def _section(markdown: str, heading: str, level: int = 2) -> str:
    """The text under the heading up to the next heading of that level or higher."""
    start = markdown.index(f"{'#' * level} {heading}\n")
    ends = [i for i in (markdown.find(f"\n{'#' * lv} ", start + 1) for lv in range(1, level + 1))
            if i != -1]
    return markdown[start : min(ends) if ends else None]


def _table_keys(text: str) -> set[str]:
    """The backquoted names in the first cell of each table row."""
    keys = set()
    for row in re.findall(r"^\|([^|\n]*)\|", text, flags=re.MULTILINE):
        keys |= set(re.findall(r"`([^`]+)`", row))
    return keys


def test_readme_config_table_lists_every_setting():
    """Each key of Settings, RetrySettings, LaneSettings and CommunicatorType has a row, and
    no row more."""
    documented = _table_keys(_section(README, "Configuration reference"))
    expected = (
        {name for name in Settings.model_fields
         if name not in ("retry", "lanes", "communicator_types")}
        | {f"retry.{name}" for name in RetrySettings.model_fields}
        | {f"lanes.{name}" for name in LaneSettings.model_fields}
        | {"communicator_types[]"}
        | set(CommunicatorType.model_fields)
    )

    assert documented == expected


def test_readme_says_make_test_restarts_the_local_broker():
    """README warns that `make test` stops and starts the local RabbitMQ's app."""
    text = _section(README, "The two commands")

    assert "stop_app" in text
    assert "start_app" in text


def _permissions() -> dict[str, re.Pattern[str]]:
    line = next(line for line in GUIDE.splitlines() if "rabbitmqctl set_permissions" in line)
    words = shlex.split(line.removeprefix("$ "))
    configure, write, read = words[-3:]
    return {"configure": re.compile(configure), "write": re.compile(write),
            "read": re.compile(read)}


@pytest.fixture
def names() -> tuple[Names, list[str], list[str]]:
    config = yaml.safe_load((REPO / "deploy" / "k8s" / "base" / "config.yaml").read_text())
    settings = parse_settings(config, {"AMQP_URL": "amqp://u:p@rabbitmq/"})
    assert settings.queue_prefix == "jasper-consumer", "the guide's example uses the default"
    n = Names.from_settings(settings)
    per_type = [name for ct in settings.communicator_types
                for name in (n.work_queue(ct), n.parked_queue(ct), n.calls_queue(ct))]
    direct = [n.direct_queue(ct) for ct in settings.communicator_types]  # tools: declared only
    return n, per_type, direct


def test_documented_permissions_cover_what_the_service_does(names):
    """The guide's permissions allow every declare, publish, bind and consume the service
    and its tools do: parked, calls, router-epoch and the tools' reply and direct queues
    included."""
    n, per_type, direct = names
    reply = n.reply_queue()
    queues = [n.events_queue, *per_type, n.history_queue, n.dead_queue, n.epoch_queue, reply,
              *direct]
    exchanges = [n.events_exchange, n.history_exchange, n.dead_exchange]
    needs = {
        "configure": [*queues, *exchanges],
        "write": [n.history_exchange, "amq.default", n.dead_exchange, n.events_exchange,
                  n.events_queue, n.history_queue, n.dead_queue, *per_type, n.epoch_queue,
                  reply],
        "read": [n.events_queue, *per_type, n.dead_queue, n.epoch_queue, reply, *exchanges],
    }
    patterns = _permissions()

    for permission, resources in needs.items():
        for resource in resources:
            assert patterns[permission].fullmatch(resource), (permission, resource)


def test_documented_permissions_keep_other_deployments_out():
    """The patterns match none of another prefix's queues, nor another application's."""
    for pattern in _permissions().values():
        for other in ("jasper-consumer-staging.events", "jasper-consumer-staging.dlx",
                      "other.events", "amq.rabbitmq.trace"):
            assert not pattern.fullmatch(other), (pattern.pattern, other)


def test_guide_shows_how_to_run_the_tools_in_the_cluster():
    """The Kubernetes section runs dead-letters in a pod and rotates a key through the Secret."""
    kubernetes = _section(GUIDE, "9. Running on Kubernetes")

    assert "kubectl -n patriot exec deploy/jasper-consumer -- jasper-consumer dead-letters list" \
        in kubernetes
    assert "jasper-consumer-api-keys" in _section(kubernetes, "Rotating an API key", 3)
    assert "KEDA" in _section(kubernetes, "Scaling: two replicas, no autoscaler", 3)


def test_readme_lists_every_alert():
    """The README's alert table has one row per generated alert."""
    names = {alert.name for alert in alerts(mixin.default_config())}

    assert _table_keys(_section(README, "Alerts", 3)) == names


def test_links_into_the_operator_guide_resolve():
    """Every link to a section of the operator guide names a heading it has."""
    anchors = github_anchors(GUIDE)
    links = re.findall(r"docs/operator-guide\.md#([\w-]+)", README)

    assert links
    assert set(links) <= anchors
