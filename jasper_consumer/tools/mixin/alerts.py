"""The alert rules: one list, each alert with its runbook section in the operator guide.

Every alert is about one deployment and carries its ``namespace`` and ``job`` (and the
communicator type, queue or pod where there is one), so a page says which environment it
is about; ``runbook_url`` points at the alert's own section of ``docs/operator-guide.md``
(the heading is the alert's name). To add an alert: append it to :func:`alerts`, write its
section in the guide, add a promtool case to ``deploy/prometheus/alerts.test.yaml`` where
it fires, and run ``make mixin``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .promql import MixinConfig, Series, all_deployments, by, indent, on

Severity = Literal["critical", "warning", "info"]

#: How a deployment is named in summaries: ``patriot/jasper-consumer``.
WHERE = "{{ $labels.namespace }}/{{ $labels.job }}"
#: Pods of a deployment, for kubectl in a description.
PODS = "kubectl -n {{ $labels.namespace }} get pods -l app.kubernetes.io/name=jasper-consumer"


@dataclass(frozen=True)
class Alert:
    name: str
    severity: Severity
    expr: str
    summary: str
    description: str
    for_: str | None = None

    def rule(self, config: MixinConfig) -> dict[str, Any]:
        """The Prometheus rule of this alert."""
        rule: dict[str, Any] = {"alert": self.name, "expr": self.expr}
        if self.for_:
            rule["for"] = self.for_
        rule["labels"] = {"severity": self.severity, **dict(config.alert_labels)}
        rule["annotations"] = {"summary": self.summary, "description": self.description,
                               "runbook_url": f"{config.runbook_base}#{self.name.lower()}"}
        return rule


def _rate_by_type(s: Series, fn: str, metric: str, window: str, *extra: str) -> str:
    return (f"sum {by('communicator_type')} "
            f"({fn}({s.jasper(metric, *extra)}[{window}]))")


def alerts(config: MixinConfig) -> list[Alert]:
    """Every alert, in the order the operator guide describes them."""
    s = all_deployments(config)
    rabbit = s.rabbitmq
    return [
        Alert(
            "JasperConsumerDown", "critical", for_="5m",
            expr=(f"group {by()} (max_over_time({s.jasper('up')}[1h]))\n"
                  f"unless {on()}\n"
                  f"({s.jasper('up')} == 1)"),
            summary=f"jasper-consumer {WHERE} is down",
            description=(
                "No replica of this deployment, scraped within the last hour, has been up for "
                "5 minutes. Its commission and decommission events wait in RabbitMQ and no SIM "
                f"changes status. Check the pods ({PODS}) and their logs."),
        ),
        Alert(
            "JasperConsumerNotScraped", "warning", for_="15m",
            expr=f"absent({s.jasper('up')})",
            summary="Prometheus scrapes no jasper-consumer at all",
            description=(
                "Prometheus has no target of jasper-consumer: the ServiceMonitor is not "
                "selected by this Prometheus (its release label), or no deployment runs."),
        ),
        Alert(
            "JasperNoStandby", "warning", for_="15m",
            expr=f"sum {by()} ({s.jasper('jasper_ready')}) == 1",
            summary=f"jasper-consumer {WHERE} has no standby replica",
            description=(
                "Only one replica has been ready for 15 minutes. It holds every queue's single "
                "active consumer; if it dies, events wait until Kubernetes replaces it instead "
                f"of a standby taking over at once. Check the other pods ({PODS})."),
        ),
        Alert(
            "JasperQueueWithoutConsumer", "critical", for_="5m",
            expr=s.per_queue(rabbit("rabbitmq_queue_consumers"), "events", "work",
                             keep=("queue", "communicator_type")) + " == 0",
            summary=f"Nobody consumes {{{{ $labels.queue }}}} ({WHERE})",
            description=(
                "The deployment runs but RabbitMQ has shown no consumer on queue "
                "{{ $labels.queue }} for 5 minutes: its events are not processed. /readyz of "
                "the pods says which consumer is missing; restart the pods."),
        ),
        Alert(
            "JasperQueueMetricsMissing", "warning", for_="15m",
            expr=(f"count {by()} (\n"
                  + indent(f"max {by('queue')} ({s.jasper('jasper_queue_info')})\n"
                           f"unless on (queue)\n"
                           f"max by (queue) ({rabbit('rabbitmq_queue_messages')})")
                  + "\n) > 0"),
            summary=(f"RabbitMQ's per-queue metrics are missing for {{{{ $value }}}} queues "
                     f"of {WHERE}"),
            description=(
                "Prometheus has no rabbitmq_queue_messages series for queues this deployment "
                "consumes (jasper_queue_info), so JasperQueueWithoutConsumer, "
                "JasperBacklogGrowing, JasperDeadLettersPresent and "
                "JasperNoSuccessWhileEventsWait cannot fire, and the dashboard's queue panels "
                "stay empty. Scrape RabbitMQ's /metrics/per-object endpoint (or set "
                "prometheus.return_per_object_metrics = true), and evaluate these rules where "
                "RabbitMQ's series are visible too (not confined to this namespace)."),
        ),
        Alert(
            "JasperBacklogGrowing", "warning", for_="15m",
            expr=(s.per_queue(rabbit("rabbitmq_queue_messages_ready"), "events", "work")
                  + " > 100\n"
                  f"and {on('queue')}\n"
                  + s.per_queue(f"deriv({rabbit('rabbitmq_queue_messages_ready')}[15m])",
                                "events", "work")
                  + " > 0"),
            summary=(f"Backlog of {{{{ $labels.queue }}}} keeps growing "
                     f"({{{{ $value | humanize }}}} ready, {WHERE})"),
            description=(
                "More than 100 messages are ready in {{ $labels.queue }} and the number has "
                "grown for 15 minutes: events arrive faster than the service applies them. A "
                "work queue is limited by its Jasper account (requests_per_second, "
                "max_concurrency), not by replicas. Check for a paused communicator type and "
                "for rate limiting first."),
        ),
        Alert(
            "JasperFailureRatioHigh", "warning", for_="10m",
            expr=("(\n"
                  + indent(_rate_by_type(s, "rate", "jasper_commands_total", "15m",
                                         'outcome="failed"')
                           + "\n/\n"
                           + _rate_by_type(s, "rate", "jasper_commands_total", "15m"))
                  + "\n) > 0.25\n"
                  f"and {on('communicator_type')}\n"
                  + _rate_by_type(s, "increase", "jasper_commands_total", "15m") + " >= 10"),
            summary=(f"{{{{ $value | humanizePercentage }}}} of {{{{ $labels.communicator_type "
                     f"}}}} commands fail ({WHERE})"),
            description=(
                "More than a quarter of the final outcomes for communicator type "
                "{{ $labels.communicator_type }} are failures. The failed signals in the "
                "clients' history carry the error code. "
                '{{ if eq $labels.communicator_type "unknown" }}These are events the router '
                "failed without an API call because they name a communicator type that is not "
                "configured (UNKNOWN_COMMUNICATOR_TYPE): the dashboard panel \"Events received "
                "and local failures\" (jasper_local_failures_total) shows them by code."
                "{{ else }}Failures without an API call (INVALID_ICCID, MISSING_ICCID) are in "
                "the dashboard panel \"Events received and local failures\"; Control Center's "
                "in \"API errors by code\" (20000001: unknown ICCID, RETRIES_EXHAUSTED: "
                "Control Center unreachable).{{ end }}"),
        ),
        Alert(
            "JasperInteractiveSlow", "warning", for_="10m",
            expr=("histogram_quantile(0.99,\n"
                  + indent(f"sum {by('communicator_type', 'le')} (rate("
                           + s.jasper("jasper_time_to_final_seconds_bucket",
                                      'lane="interactive"') + "[10m]))")
                  + "\n) > 60"),
            summary=(f"Commissions via {{{{ $labels.communicator_type }}}} take "
                     f"{{{{ $value | humanizeDuration }}}} (p99) to their final signal "
                     f"({WHERE})"),
            description=(
                "For 10 minutes, more than 1 in 100 interactive jobs of "
                "{{ $labels.communicator_type }} (commissions: a technician waits on site) "
                "took over a minute from reaching the service to their final signal. A paused "
                "type (JasperCommunicatorTypeDown) or rate limiting (JasperRateLimited) "
                "explains it; else Control Center is slow (dashboard: API request duration) "
                "or commissions arrive faster than the account's requests_per_second."),
        ),
        Alert(
            "JasperCommunicatorTypeDown", "critical", for_="5m",
            expr=(f"min {by('communicator_type')} "
                  f"({s.jasper('jasper_communicator_up')}) == 0"),
            summary=f"Communicator type {{{{ $labels.communicator_type }}}} is paused ({WHERE})",
            description=(
                "Control Center rejects the settings of {{ $labels.communicator_type }} "
                "(invalid credentials, API version or role) or answers only with errors: its "
                "events wait and each got a jasper.delayed signal. The logs name the error "
                "code. Fix the API key in the mounted Secret (no restart needed) or the "
                "config; the service probes with Echo and resumes by itself, oldest event "
                "first."),
        ),
        Alert(
            "JasperDeadLettersPresent", "warning", for_="10m",
            expr=s.per_queue(rabbit("rabbitmq_queue_messages"), "dead") + " > 0",
            summary=f"{{{{ $value }}}} messages in {{{{ $labels.queue }}}} ({WHERE})",
            description=(
                "{{ $labels.queue }} holds messages that could not be processed: unreadable "
                "messages (header x-jasper-error says why) and events whose retries ran out. "
                "List them with `jasper-consumer dead-letters list` and replay the events once "
                "Control Center is reachable with `jasper-consumer dead-letters replay`."),
        ),
        Alert(
            "JasperEventsDeadLettered", "warning",
            expr=(f"sum {by('reason')} "
                  f"(increase({s.jasper('jasper_dead_lettered_total')}[10m])) > 0"),
            summary=f"Messages dead-lettered ({{{{ $labels.reason }}}}, {WHERE})",
            description=(
                "The service sent messages to the dead-letter queue in the last 10 minutes, "
                "reason {{ $labels.reason }}: \"unreadable\" means a producer publishes "
                "messages that are not events; \"retries_exhausted\" means Control Center kept "
                "failing."),
        ),
        Alert(
            "JasperRateLimited", "warning",
            expr=(_rate_by_type(s, "increase", "jasper_api_errors_total", "10m",
                                'code="40000029"') + " > 0\nor\n"
                  + _rate_by_type(s, "increase", "jasper_retries_total", "10m",
                                  'reason="rate_limited"') + " > 0"),
            summary=(f"Control Center rate-limits {{{{ $labels.communicator_type }}}} "
                     f"({WHERE})"),
            description=(
                "Control Center answered \"rate limit exceeded\" (40000029 or HTTP 429) to "
                "{{ $labels.communicator_type }}. The service stays under requests_per_second "
                "and max_concurrency, so either they are set above the account's limit or "
                "another client uses the same Control Center account. Lower them in the "
                "config."),
        ),
        Alert(
            "JasperNoSuccessWhileEventsWait", "critical", for_="15m",
            expr=(s.per_queue(rabbit("rabbitmq_queue_messages"), "work", "parked",
                              keep=("communicator_type",)) + " > 0\n"
                  f"unless {on('communicator_type')}\n"
                  + _rate_by_type(s, "increase", "jasper_commands_total", "15m",
                                  'outcome="succeeded"') + " > 0"),
            summary=(f"{{{{ $labels.communicator_type }}}}: events wait, none succeeds "
                     f"({WHERE})"),
            description=(
                "Events for {{ $labels.communicator_type }} have been waiting in its work "
                "or parked queue for 15 minutes and not one command succeeded meanwhile. Look at "
                "JasperCommunicatorTypeDown, JasperRateLimited and the service logs."),
        ),
        Alert(
            "JasperBrokerDisconnected", "warning", for_="2m",
            expr=f"max {by('pod')} ({s.jasper('jasper_broker_connected')}) == 0",
            summary=f"{{{{ $labels.pod }}}} lost RabbitMQ ({WHERE})",
            description=(
                "A replica has been disconnected from RabbitMQ for 2 minutes; it keeps "
                "reconnecting with back-off (to the next node when amqp_url lists several). "
                "Nothing is lost: its unacknowledged messages return to their queues."),
        ),
        Alert(
            "JasperHistoryPublishFailures", "warning",
            expr=(f"sum {by()} "
                  f"(increase({s.jasper('jasper_history_publish_failures_total')}[10m])) > 0"),
            summary=f"RabbitMQ did not confirm result signals ({WHERE})",
            description=(
                "The broker refused or returned signals published to the history exchange (is "
                "the exchange there, is the history queue bound?). The events are redelivered "
                "and retried; the queue's delivery limit dead-letters them if this goes on."),
        ),
    ]


def rule_groups(config: MixinConfig) -> list[dict[str, Any]]:
    """The ``groups`` of a Prometheus rule file (and of the PrometheusRule)."""
    return [{"name": "jasper-consumer",
             "rules": [alert.rule(config) for alert in alerts(config)]}]
