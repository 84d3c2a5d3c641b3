"""Every Prometheus metric of the service, on one injected registry (README, Metrics).

Labels come only from closed sets: event codes, communicator type names from the
config, commands, outcomes, reasons. Never an ICCID, a client id or a secret.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import __version__
from .config import Settings
from .topology import Names

#: Closed label sets, pre-initialised by :meth:`Metrics.prepare` so that every series
#: exists (at 0) from start-up: ``rate()`` and ``increase()`` in alerts then see the first
#: event instead of a series that appears already at 1.
COMMANDS = ("activate", "deactivate")
OUTCOMES = ("succeeded", "failed")
RETRY_REASONS = ("rate_limited", "timeout", "unreachable", "server_error", "unexpected_response")
DEAD_LETTER_REASONS = ("unreadable", "invalid_job", "retries_exhausted")
STAGES = ("route", "apply")
PROBE_RESULTS = ("passed", "failed")

_API_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TO_FINAL_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                     1800.0, 3600.0, 4 * 3600.0)
LANES = ("interactive", "bulk")
_PROCESSING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                       60.0, 300.0)


class Metrics:
    """The service's metrics; pass a fresh ``CollectorRegistry`` in tests."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events_received = Counter(
            "jasper_events_received", "Events consumed from the events queue",
            ["event_code"], registry=r)
        self.commands = Counter(
            "jasper_commands", "Final outcomes of events that reached a communicator type",
            ["communicator_type", "command", "outcome"], registry=r)
        self.local_failures = Counter(
            "jasper_local_failures", "Events failed by the router without an API call",
            ["code"], registry=r)
        self.delayed = Counter(
            "jasper_delayed", "Interim delayed signals published",
            ["communicator_type"], registry=r)
        self.api_request_duration = Histogram(
            "jasper_api_request_duration_seconds", "Duration of Jasper API requests",
            ["communicator_type", "command"], buckets=_API_BUCKETS, registry=r)
        self.api_errors = Counter(
            "jasper_api_errors", "Jasper API calls that did not succeed, by error code",
            ["communicator_type", "code"], registry=r)
        self.retries = Counter(
            "jasper_retries", "Retries of Jasper API calls", ["communicator_type", "reason"],
            registry=r)
        self.coalesced = Counter(
            "jasper_coalesced", "Events served by an identical command already queued or in "
            "flight (no API call)", ["communicator_type"], registry=r)
        self.inflight = Gauge(
            "jasper_inflight_commands", "Jasper API calls in flight",
            ["communicator_type"], registry=r)
        self.dead_lettered = Counter(
            "jasper_dead_lettered", "Messages sent to the dead-letter queue", ["reason"],
            registry=r)
        self.event_processing = Histogram(
            "jasper_event_processing_seconds", "Time from receiving a message to acking it",
            ["stage"], buckets=_PROCESSING_BUCKETS, registry=r)
        self.time_to_final = Histogram(
            "jasper_time_to_final_seconds", "Time from the router receiving an event to its "
            "final signal being confirmed, per lane (interactive: a technician waits)",
            ["communicator_type", "lane"], buckets=_TO_FINAL_BUCKETS, registry=r)
        self.communicator_up = Gauge(
            "jasper_communicator_up", "1 while the communicator type is accepting calls",
            ["communicator_type"], registry=r)
        self.last_success = Gauge(
            "jasper_last_success_timestamp_seconds", "Unix time of the last successful command",
            ["communicator_type"], registry=r)
        self.history_publish_failures = Counter(
            "jasper_history_publish_failures", "Signals the broker did not confirm or returned",
            registry=r)
        self.broker_connected = Gauge(
            "jasper_broker_connected", "1 while connected to RabbitMQ", registry=r)
        self.ready = Gauge(
            "jasper_ready", "1 while /readyz answers ready (broker connected, every consumer "
            "registered, as the watchdog last saw it)", registry=r)
        self.echo_probes = Counter(
            "jasper_echo_probes", "Echo probes of a paused communicator type, by result",
            ["communicator_type", "result"], registry=r)
        self.parked = Gauge(
            "jasper_parked_jobs", "Jobs of the communicator type waiting in its parked queue "
            "(paused, or behind those held up by a pause), as the owning process counts them",
            ["communicator_type"], registry=r)
        self.queue_info = Gauge(
            "jasper_queue_info", "1 for each queue the service consumes or parks jobs in; "
            "joins RabbitMQ's per-queue metrics (label queue) to a communicator type",
            ["queue", "role", "communicator_type"], registry=r)
        self.build_info = Gauge(
            "jasper_build_info", "Always 1; the running version in a label", ["version"],
            registry=r)
        self.build_info.labels(__version__).set(1)
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, kept: a per-event lookup is a dict hit, not the
        client library's locked lookup (~1 µs each, several per event)."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def prepare(self, settings: Settings) -> None:
        """Create every label set of the configuration at 0 (see ``COMMANDS`` above) and
        the ``jasper_queue_info`` series. Call once at start-up, before consuming."""
        names = Names.from_settings(settings)
        for code in settings.commands:
            self.events_received.labels(str(code))
        for stage in STAGES:
            self.event_processing.labels(stage)
        for reason in DEAD_LETTER_REASONS:
            self.dead_lettered.labels(reason)
        self.queue_info.labels(names.events_queue, "events", "").set(1)
        for ct in settings.communicator_types:
            self.queue_info.labels(names.work_queue(ct), "work", ct.name).set(1)
            self.queue_info.labels(names.parked_queue(ct), "parked", ct.name).set(1)
            self.parked.labels(ct.name).set(0)
            for command in COMMANDS:
                self.api_request_duration.labels(ct.name, command)
                for outcome in OUTCOMES:
                    self.commands.labels(ct.name, command, outcome)
            for reason in RETRY_REASONS:
                self.retries.labels(ct.name, reason)
            for result in PROBE_RESULTS:
                self.echo_probes.labels(ct.name, result)
            self.delayed.labels(ct.name)
            for lane in LANES:
                self.time_to_final.labels(ct.name, lane)
            self.coalesced.labels(ct.name)
            self.inflight.labels(ct.name)
