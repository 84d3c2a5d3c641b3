"""The selector setting and the PromQL pieces the alert rules and the dashboard share.

Two kinds of series meet in every query:

* the service's own (``up`` and ``jasper_*``), picked by :attr:`MixinConfig.selector`;
  every aggregation keeps :attr:`MixinConfig.deployment_labels` (namespace, job), so one
  Prometheus can watch several deployments and each alert names the one it is about;
* RabbitMQ's per-queue series (``rabbitmq_queue_*``). Their ``namespace`` and ``job`` are
  the broker's, so they are tied to a deployment through ``jasper_queue_info{queue, role,
  communicator_type}``, which each replica exports for the queues it consumes, named from
  its configured ``queue_prefix``. No rule or panel spells a queue name: a deployment with
  another prefix (two deployments on one broker must have distinct ones) needs no change.
  The dead-letter and history queues, which the service does not consume, are derived from
  the events queue's name (``<prefix>.events`` -> ``<prefix>.dead``).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

#: Labels that say which deployment a series belongs to.
DEPLOYMENT_LABELS = ("namespace", "job")
#: Roles of the queues each replica reports in ``jasper_queue_info`` (metrics.py), and of
#: those named from the events queue, ``<prefix>.events`` -> ``<prefix>.<role>``. A queue
#: the service starts to report needs only its role here.
CONSUMED_ROLES = ("events", "work", "parked")
DERIVED_ROLES = ("dead", "history")
EVENTS_ROLE = 'role="events"'
#: A PromQL string literal: the regex that takes ``<prefix>`` out of ``<prefix>.events``.
EVENTS_NAME = '"(.+)\\\\.events"'


@dataclass(frozen=True)
class MixinConfig:
    """What a platform team may change; ``python -m jasper_consumer.tools.mixin --help``."""

    #: PromQL matchers that pick this service's series out of everything Prometheus scrapes.
    #: With Prometheus Operator the job is the Service's name: the default also matches the
    #: names a kustomize ``namePrefix``/``nameSuffix`` gives it (``staging-jasper-consumer``).
    selector: str = 'job=~".*jasper-consumer.*"'
    #: Matchers for RabbitMQ's per-queue series; empty takes them from any job.
    rabbitmq_selector: str = ""
    #: The operator guide; each alert's ``runbook_url`` is this plus ``#<alert name>``.
    runbook_base: str = "docs/operator-guide.md"
    #: Labels every alert carries besides its severity, for Alertmanager's routes.
    alert_labels: tuple[tuple[str, str], ...] = (("service", "jasper-consumer"),)
    #: uid and title of the Grafana dashboard.
    dashboard_uid: str = "jasper-consumer"
    dashboard_title: str = "jasper-consumer"


def matchers(*parts: str) -> str:
    """``{a, b}`` of the non-empty parts, or ``""`` when there are none."""
    kept = [p for p in parts if p]
    return "{" + ", ".join(kept) + "}" if kept else ""


def indent(text: str) -> str:
    """``text`` two spaces further in, for readable multi-line PromQL."""
    return textwrap.indent(text, "  ")


def by(*extra: str) -> str:
    """``by (namespace, job, …)``: the deployment labels, then ``extra``."""
    return f"by ({', '.join((*DEPLOYMENT_LABELS, *extra))})"


def on(*extra: str) -> str:
    """``on (namespace, job, …)``."""
    return f"on ({', '.join((*DEPLOYMENT_LABELS, *extra))})"


@dataclass(frozen=True)
class Series:
    """Selectors for one scope: every deployment (alerts) or the one picked on a dashboard."""

    service_selector: str
    rabbitmq_selector: str

    def jasper(self, metric: str, *extra: str) -> str:
        """``metric{<service selector>, extra…}``."""
        return metric + matchers(self.service_selector, *extra)

    def rabbitmq(self, metric: str) -> str:
        """``metric{<rabbitmq selector>}``."""
        return metric + matchers(self.rabbitmq_selector)

    def queues(self, *roles: str) -> str:
        """One series per (deployment, queue) of these roles, value 1, labelled ``queue``,
        ``role`` and (for work queues) ``communicator_type``: the roles the service reports
        in ``jasper_queue_info`` (:data:`CONSUMED_ROLES`) and those derived from the events
        queue's name (:data:`DERIVED_ROLES`)."""
        unknown = set(roles) - set(CONSUMED_ROLES) - set(DERIVED_ROLES)
        if unknown or not roles:
            raise ValueError(f"unknown queue roles: {sorted(unknown) or roles}")
        parts = []
        consumed = [r for r in CONSUMED_ROLES if r in roles]
        if consumed:
            role = ("" if consumed == list(CONSUMED_ROLES) else
                    f'role="{consumed[0]}"' if len(consumed) == 1 else
                    f'role=~"{"|".join(consumed)}"')
            keep = by("queue", "role", "communicator_type")
            parts.append(f"max {keep} ({self.jasper('jasper_queue_info', role)})")
        events = f"max {by('queue')} ({self.jasper('jasper_queue_info', EVENTS_ROLE)})"
        for derived in (r for r in DERIVED_ROLES if r in roles):
            renamed = f'label_replace({events}, "queue", "$1.{derived}", "queue", {EVENTS_NAME})'
            parts.append(f'label_replace({renamed}, "role", "{derived}", "", "")')
        return parts[0] if len(parts) == 1 else "(\n" + indent("\nor\n".join(parts)) + "\n)"

    def per_queue(self, rabbitmq_expr: str, *roles: str, keep: tuple[str, ...] = ("queue",)
                  ) -> str:
        """RabbitMQ's per-queue ``rabbitmq_expr`` for the deployment's queues of ``roles``,
        aggregated ``by (namespace, job, *keep)``. RabbitMQ reports a queue once per node
        that hosts it: ``max by (queue)`` takes one value."""
        joined = (f"{self.queues(*roles)}\n"
                  f"* on (queue) group_left ()\n"
                  f"max by (queue) ({rabbitmq_expr})")
        return f"max {by(*keep)} (\n{indent(joined)}\n)"


def all_deployments(config: MixinConfig) -> Series:
    """The scope of the alert rules: every deployment the selector matches."""
    return Series(config.selector, config.rabbitmq_selector)


def one_deployment(config: MixinConfig) -> Series:
    """The scope of the dashboard: the deployment its namespace and job variables pick."""
    return Series(f'{config.selector}, namespace="$namespace", job="$job"',
                  config.rabbitmq_selector)
