"""The README and the operator guide say what the code does: every config key, the broker
permissions the topology needs, the commands a platform team runs."""

from __future__ import annotations

import argparse
import asyncio
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from jasper_consumer.cli import build_parser
from jasper_consumer.config import (
    CommunicatorType,
    LaneSettings,
    RetrySettings,
    Settings,
    parse_settings,
)
from jasper_consumer.metrics import Metrics
from jasper_consumer.probes import ProbeServer
from jasper_consumer.status import TypeStatus
from jasper_consumer.tools import mixin
from jasper_consumer.tools.mixin.alerts import alerts
from jasper_consumer.tools.mixin.dashboard import rows
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
                for name in (n.work_queue(ct), n.bulk_queue(ct), n.parked_queue(ct),
                             n.owner_queue(ct), n.hold_queue(ct), n.calls_queue(ct))]
    direct = [n.direct_queue(ct) for ct in settings.communicator_types]  # tools: declared only
    return n, per_type, direct


def test_documented_permissions_cover_what_the_service_does(names):
    """The guide's permissions allow every declare, publish, bind and consume the service
    and its tools do: parked, calls, router-epoch, the tools' reply and direct queues and the
    status page's exchange and queues included."""
    n, per_type, direct = names
    reply, status = n.reply_queue(), n.status_queue()
    queues = [n.events_queue, *per_type, n.history_queue, n.dead_queue, n.epoch_queue, reply,
              status, *direct]
    exchanges = [n.events_exchange, n.history_exchange, n.dead_exchange, n.status_exchange]
    needs = {
        "configure": [*queues, *exchanges],
        "write": [n.history_exchange, "amq.default", n.dead_exchange, n.events_exchange,
                  n.events_queue, n.history_queue, n.dead_queue, *per_type, n.epoch_queue,
                  reply, n.status_exchange, status],
        "read": [n.events_queue, *per_type, n.dead_queue, n.epoch_queue, reply, status,
                 *exchanges],
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


# -- the repository stands on its own: references resolve, nothing cites outside it ---------

#: Files whose text this repository's docs and tooling own. The package (but for the mixin)
#: and docs/schemas (generated from the package's models) cite the guide through the
#: package's docstrings, which are checked by test_package_references_to_the_guide_resolve.
OWN_FILES = sorted({
    *REPO.glob("*.md"), *(REPO / "docs").glob("*.md"), REPO / "docs" / "asyncapi.yaml",
    REPO / "Makefile", REPO / "pyproject.toml", *(REPO / "config").glob("*"),
    *(p for p in (REPO / "deploy").rglob("*") if p.is_file()),
    *(REPO / "tests").rglob("*.py"), *(REPO / "bench").glob("*.py"),
    *(REPO / "jasper_consumer" / "tools" / "mixin").glob("*.py"),
    *(REPO / ".ci").glob("*"), *(REPO / "scripts").glob("*"),
} - {REPO / "tests" / "test_docs.py"})  # this file holds wrong references on purpose
PACKAGE_FILES = sorted((REPO / "jasper_consumer").rglob("*.py"))
#: "section 5", "sections 9 to 12", "sections 3 and 6", "§10": the numbers, and a title that
#: may follow ("section 9, Reading a paused type").
SECTION_REF = re.compile(
    r"(?:[Ss]ections?\s+|§\s?)(\d+)(?:\s+(?:to|and)\s+(\d+))?(?:,\s+([A-Z][^.;:,)\n`\"]*))?")
GUIDE_REF = re.compile(r"(?:operator[ -]guide|guide's)[^.\n]{0,12}?(?:,\s*)?(?=[Ss]ections?\s|§)",
                       re.IGNORECASE)
#: What a clone does not have: the product spec beside the checkout.
OUTSIDE = re.compile(r"\bSP" + r"EC\b|shared/SP" + r"EC\.md")


def guide_sections() -> dict[int, tuple[str, list[str]]]:
    """Number -> (title, sub-titles) of the guide's numbered sections: its ``###`` headings
    and the bold lead-ins that open a paragraph (``**TLS.**``)."""
    sections: dict[int, tuple[str, list[str]]] = {}
    current = None
    for match in re.finditer(r"^(?:(#{2,3}) (.+)|\*\*([^*]+?)\.\*\*)", GUIDE, re.MULTILINE):
        level, title = match.group(1), match.group(2) or match.group(3)
        numbered = re.match(r"(\d+)\. (.+)", title)
        if level == "##":
            current = int(numbered.group(1)) if numbered else None
            if numbered:
                sections[int(numbered.group(1))] = (numbered.group(2), [])
        elif current is not None:
            sections[current][1].append(title)
    return sections


def title_problems(text: str) -> list[str]:
    """References by title, ``operator guide, "Scaling"``, to headings the guide lacks."""
    titles = re.findall(r"^#{2,6} (?:\d+\. )?(.+)$", GUIDE, flags=re.MULTILINE)
    return [f"{match.group(0)!r}: the guide has no heading {match.group(1)!r}"
            for match in re.finditer(r'(?:operator[ -]guide(?:\.md)?),?\s+"([^"]+)"', text)
            if not any(t.startswith(match.group(1)) for t in titles)]


def reference_problems(text: str, *, every: bool) -> list[str]:
    """References to sections of the guide that do not resolve. ``every``: each "section N"
    counts (the guide itself); else only those right after "operator guide"."""
    sections = guide_sections()
    problems = []
    starts = None if every else {m.end() for m in GUIDE_REF.finditer(text)}
    for match in SECTION_REF.finditer(text):
        if starts is not None and match.start() not in starts:
            continue
        first, last, title = match.group(1), match.group(2), match.group(3)
        for number in {int(first), int(last or first)}:
            if number not in sections:
                problems.append(f"{match.group(0)!r}: the guide has no section {number}")
        if title and int(first) in sections and not last:
            name, subs = sections[int(first)]
            words = " ".join(title.split())
            if not any(t.startswith(words) for t in (name, *subs)):
                problems.append(f"{match.group(0)!r}: section {first} has no heading "
                                f"{words!r}")
    return problems


def test_guide_sections_are_numbered_in_order():
    """The guide's numbered headings run 1, 2, 3, … with none lost or repeated."""
    numbers = [int(n) for n in re.findall(r"^## (\d+)\. ", GUIDE, flags=re.MULTILINE)]

    assert numbers == list(range(1, len(numbers) + 1))


def test_every_section_reference_in_the_guide_resolves():
    """Each "section N" / "§N" of the guide names a section it has, and a title after it
    names a heading of that section."""
    assert reference_problems(GUIDE, every=True) == []


@pytest.mark.parametrize("path", OWN_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_references_to_the_guide_resolve(path):
    """"operator guide, section N", "operator guide §N" and 'operator guide, "Title"'
    elsewhere resolve too."""
    text = path.read_text(errors="replace")

    assert reference_problems(text, every=False) + title_problems(text) == []


def test_package_references_to_the_guide_resolve():
    """The package's docstrings cite the guide's sections by number and title: they exist."""
    problems = {str(p.relative_to(REPO)): reference_problems(p.read_text(), every=False)
                for p in PACKAGE_FILES}

    assert {path: found for path, found in problems.items() if found} == {}


def test_reference_check_catches_a_wrong_number_and_a_wrong_title():
    """The check itself flags what the guide once had: a section that is not there, and a
    title under the wrong number."""
    last = max(guide_sections())

    assert reference_problems(f"see section {last + 1}.", every=True)
    assert reference_problems("the dashboard (section 8, Reading a paused type)", every=True)
    assert not reference_problems("(section 9, Reading a paused type off the dashboard)",
                                  every=True)
    assert reference_problems(f"operator guide, section {last + 1}", every=False)
    assert not reference_problems(f"a section {last + 1} of something else", every=False)
    assert title_problems('see the operator guide, "No such heading"')
    assert not title_problems('docs/operator-guide.md, "Scaling"')


@pytest.mark.parametrize("path", OWN_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_nothing_cites_what_a_clone_does_not_have(path):
    """No file cites the product spec beside the checkout: the guide and
    docs/asyncapi.yaml carry the contract."""
    text = path.read_text(errors="replace")

    assert [m.group(0) for m in OUTSIDE.finditer(text)] == []


@pytest.mark.parametrize("path", [*OWN_FILES, *PACKAGE_FILES],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_into_the_guide_resolves(path):
    """Each link to docs/operator-guide.md#<anchor> names a heading the guide has."""
    anchors = github_anchors(GUIDE)
    links = re.findall(r"operator-guide\.md#([\w-]+)", path.read_text(errors="replace"))

    assert set(links) - anchors == set()


# -- the README says what the code has --------------------------------------------------------


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """Every long option of a parser and of its sub-commands, at any depth."""
    options = {o for action in parser._actions for o in action.option_strings
               if o.startswith("--") and o != "--help"}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                options |= _options(sub)
    return options


def test_readme_documents_every_command_line_option():
    """Each option of jasper-consumer and of the mixin generator appears in the README's
    commands table (or, for the mixin, beside it)."""
    commands = _section(README, "Commands")
    mixin_text = commands + _section(README, "Dashboard and alerts, from one source", 3)

    assert {o for o in _options(build_parser()) if f"`{o}" not in commands and
            f" {o} " not in commands and f"[{o}" not in commands} == set()
    assert {o for o in _options(mixin.build_parser(mixin.default_config()))
            if o not in mixin_text} == set()


def _metric_rows() -> dict[str, set[str]]:
    """Metric name -> label names, from the README's metrics table."""
    rows = {}
    for name, labels in re.findall(r"^\| `(jasper_\w+)(?:\{([\w,]*)\})?` \|",
                                   _section(README, "Metrics", 3), flags=re.MULTILINE):
        rows[name] = set(filter(None, labels.split(",")))
    return rows


def test_readme_metrics_table_lists_every_metric_with_its_labels():
    """One row per metric the service defines, named as Prometheus exports it, with its
    labels; no row more."""
    metrics = Metrics(CollectorRegistry())
    defined = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            name = metric._name + ("_total" if metric._type == "counter" else "")
            defined[name] = set(metric._labelnames)

    assert _metric_rows() == defined


def test_readme_names_every_label_value_outside_the_config():
    """The values a label takes besides the configured names are in the README: the
    router's "unknown" type and command, "other" event codes, the "search" calls."""
    table = _section(README, "Metrics", 3)

    for value in ("`unknown`", "`other`", "`search`", "`interactive`", "`bulk`"):
        assert value in table, value


# -- the guide's commands work as written -----------------------------------------------------


def _guide_command(start: str) -> str:
    """The console command of the guide that starts with ``start`` (its continuation lines
    joined), without the ``$ ``."""
    for block in re.findall(r"```console\n(.*?)```", GUIDE, flags=re.DOTALL):
        for command in re.split(r"^\$ ", block, flags=re.MULTILINE):
            if command.startswith(start):
                return command.strip()
    raise AssertionError(f"no command starting {start!r} in the guide")


async def test_readyz_runbook_command_prints_the_reason_of_a_503():
    """The JasperQueueWithoutConsumer runbook's command prints the status and the body of
    /readyz also when it answers 503 (urlopen raises on it)."""
    command = _guide_command("kubectl -n patriot exec deploy/jasper-consumer -- python -c")
    script = shlex.split(command)[-1]
    server = ProbeServer(CollectorRegistry(), lambda: (False, "no consumer on x.events"))
    await server.start("127.0.0.1", 0)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script.replace(":8080/", f":{server.port}/"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        await server.stop()

    assert process.returncode == 0, err.decode()
    assert out.decode().startswith("503 ")
    assert "no consumer on x.events" in out.decode()


def test_guide_creates_everything_the_production_pods_mount_before_the_first_apply():
    """Every Secret and ConfigMap the production overlay's pods use but the overlay does not
    create is created in section 9 (else the pods wait in ContainerCreating)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl absent: install kubectl >= 1.27 (kustomize v5) to render deploy/k8s")
    rendered = subprocess.run([kubectl, "kustomize", str(REPO / "deploy/k8s/overlays/production")],
                              capture_output=True, text=True, timeout=120, check=True).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    created = {(d["kind"], d["metadata"]["name"]) for d in docs}
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    used = {("Secret", v["secret"]["secretName"]) for v in pod["volumes"] if "secret" in v}
    used |= {("ConfigMap", v["configMap"]["name"]) for v in pod["volumes"] if "configMap" in v}
    used |= {("Secret", e["valueFrom"]["secretKeyRef"]["name"])
             for c in pod["containers"] for e in c.get("env", [])
             if "secretKeyRef" in e.get("valueFrom", {})}
    kubernetes = _section(GUIDE, "9. Running on Kubernetes")
    commands = {("Secret" if kind == "secret generic" else "ConfigMap", name)
                for kind, name in re.findall(r"kubectl -n \S+ create (secret generic|configmap) "
                                             r"([\w-]+)", kubernetes)}

    assert used - created
    assert used - created <= commands


def test_runbooks_name_dashboard_panels_that_exist():
    """A panel a runbook sends the reader to (in bold) is a panel of the dashboard, or a
    field of the status page that section 14 explains."""
    runbooks = _section(GUIDE, "11. Alerts: runbooks")
    runbooks = runbooks[runbooks.index("\n### "):]
    named = {" ".join(b.split()) for b in re.findall(r"\*\*(.+?)\*\*", runbooks, re.DOTALL)}
    panels = {title for _, _, row in rows(mixin.default_config()) for title in
              (p.title for p in row)}
    page = " ".join(_section(GUIDE, "14. The status page").split())

    assert named
    assert {name for name in named - panels if name not in page} == set()


def test_the_status_page_section_explains_every_field():
    """Section 12 names every field a communicator type has in /status.json."""
    text = _section(GUIDE, "14. The status page")

    missing = [f for f in TypeStatus.model_fields if f != "name" and f"`{f}" not in text]
    assert missing == []
