"""Operating the service: what /metrics, /healthz, /readyz and the logs give operators.

* every ``jasper_`` metric the Grafana dashboard or the alert rules name is exported;
* the per-type series exist from start-up, so ``rate()`` sees the first event;
* the probes answer, and readiness notices a consumer that vanished;
* no secret (API keys, the AMQP password, their Basic-auth form) reaches any output:
  logs, /metrics, the probes, signals, dead letters — with the service run as operators
  run it, ``jasper-consumer run --config FILE``, in a subprocess.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
import yaml
from aio_pika.abc import AbstractRobustConnection
from prometheus_client.parser import text_string_to_metric_families

from jasper_consumer.config import parse_settings
from jasper_consumer.simulator import Simulator
from jasper_consumer.topology import DEAD_REASON_HEADER, Names, delete_all

from ..test_deploy import artefact_metric_names
from .conftest import RunService, iccid, make_event

BIN = Path(sys.executable).parent
CLIENT_ID = "100234"


async def poll(predicate: Callable[[], Awaitable[bool]], what: str, timeout: float) -> None:
    """Re-check ``predicate`` (every 50 ms) until it holds; fail naming ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def get(http: aiohttp.ClientSession, port: int | None, path: str) -> tuple[int, str]:
    async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
        return resp.status, await resp.text()


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


# -- metrics ---------------------------------------------------------------------------------


async def test_series_exist_before_the_first_event(run_service: RunService, http):
    """Right after start, each type's outcome counters exist at 0 and its queue is described."""
    service, broker = await run_service()
    _, text = await get(http, service.probes.port, "/metrics")
    exported = {(name, tuple(sorted(labels.items()))): value
                for name, labels, value in samples(text)}
    work_queue = broker.names.work_queue(service.settings.communicator_types[0])

    assert exported.get(("jasper_commands_total", (
        ("command", "activate"), ("communicator_type", "M2MOne NZ"),
        ("outcome", "failed")))) == 0, "Metrics.prepare(settings) is not called at start-up"
    assert exported.get(("jasper_queue_info", (
        ("communicator_type", "M2MOne NZ"), ("queue", work_queue), ("role", "work")))) == 1


async def test_dashboard_and_alert_metrics_are_exported(
    run_service: RunService, sim: Simulator, http
):
    """After successes, failures, a retry, dead letters and a paused type, /metrics holds
    every jasper_ metric the dashboard and the alerts use, and no ICCID or client id."""
    sim.add_account("au", "au-right-key", max_in_flight=1, requests_per_second=50)
    service, broker = await run_service(types=[
        {"name": "M2MOne NZ", "username": "nz", "api_key": "nz-key", "max_concurrency": 4,
         "requests_per_second": 200},
        {"name": "M2MOne AU", "username": "au", "api_key": "au-wrong-key",
         "requests_per_second": 50}])
    sim.set_fault(iccid(502), fail_times=1)
    sim.set_fault(iccid(503), always_fail=True, http_status=503, html=True)
    finals = [make_event(iccid(501)), make_event(iccid(502)), make_event(iccid(503)),
              make_event("89990000000000000001"), make_event("12")]
    paused = make_event(iccid(504), communicator_type="M2MOne AU")
    for event in [*finals, paused]:
        await broker.publish(event)
    await broker.publish(b"not json")

    signals = await broker.final_signals([e["event_id"] for e in finals])
    await broker.wait_for(lambda: any(s["event_id"] == paused["event_id"] for s in
                                      broker.signals), "the delayed signal of the paused type")
    await broker.wait_for(lambda: len(broker.dead) == 2, "two dead letters")
    _, text = await get(http, service.probes.port, "/metrics")
    exported = samples(text)

    assert [s["outcome"] for s in signals.values()] == \
        ["succeeded", "succeeded", "failed", "failed", "failed"]
    missing = artefact_metric_names() - {name for name, _, _ in exported}
    assert not missing, f"named in deploy/grafana or deploy/prometheus, not exported: {missing}"
    private = {CLIENT_ID, "89990000000000000001", *(iccid(n) for n in range(501, 505))}
    leaked = {(name, value) for name, labels, _ in exported for value in labels.values()
              if value in private}
    assert not leaked


# -- probes ----------------------------------------------------------------------------------


async def test_probes_report_alive_and_ready(run_service: RunService, http):
    """/healthz answers ok, /readyz answers ready, and jasper_ready says the same."""
    service, _ = await run_service()
    port = service.probes.port

    health = await get(http, port, "/healthz")
    ready = await get(http, port, "/readyz")
    _, text = await get(http, port, "/metrics")

    assert health[0] == 200
    assert json.loads(health[1]) == {"status": "ok"}
    assert ready[0] == 200
    assert json.loads(ready[1])["ready"] is True
    assert ("jasper_ready", {}, 1.0) in samples(text), "jasper_ready is not set"


async def test_readiness_turns_false_when_a_consumer_vanishes(
    run_service: RunService, connection: AbstractRobustConnection, http
):
    """Deleting a work queue under the service cancels its consumer: /readyz says 503."""
    service, broker = await run_service(watchdog_interval_seconds=0.2)
    port = service.probes.port
    work_queue = broker.names.work_queue(service.settings.communicator_types[0])
    channel = await connection.channel()
    await channel.queue_delete(work_queue)
    await channel.close()

    async def unready() -> bool:
        return (await get(http, port, "/readyz"))[0] == 503

    await poll(unready, "/readyz to answer 503", timeout=10)
    _, text = await get(http, port, "/metrics")
    assert ("jasper_ready", {}, 0.0) in samples(text), "jasper_ready does not follow /readyz"


# -- secrets, as operators run it ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rabbitmqctl(*args: str) -> str:
    result = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, f"rabbitmqctl {args[0]}: {result.stderr or result.stdout}"
    return result.stdout


class _Process:
    """A child process whose stdout and stderr go to files."""

    def __init__(self, args: list[str], directory: Path, name: str) -> None:
        self.stdout_path = directory / f"{name}.stdout"
        self.stderr_path = directory / f"{name}.stderr"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.popen = subprocess.Popen(args, stdout=out, stderr=err)

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, then wait; SIGKILL (and None) if it does not exit in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
            return None

    def output(self) -> tuple[str, str]:
        return (self.stdout_path.read_text(errors="replace"),
                self.stderr_path.read_text(errors="replace"))


@pytest.fixture
def amqp_user() -> Any:
    """A RabbitMQ user with a distinctive password, deleted afterwards."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not available to create a user with a known password")
    user = f"jct-leak-{uuid.uuid4().hex[:8]}"
    password = f"pw{uuid.uuid4().hex}"
    _rabbitmqctl("add_user", user, password)
    try:
        _rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        yield user, password
    finally:
        _rabbitmqctl("delete_user", user)


async def test_no_secret_reaches_any_output(tmp_path: Path, amqp_user, http,
                                            connection: AbstractRobustConnection):
    """Run with known keys and a known AMQP password through successes, failures, a retry,
    retries running out, a rejected key, an unreadable message, a lost broker connection
    and SIGTERM: none of the secrets (nor their Basic-auth form) appears in stdout, stderr,
    /metrics, /healthz, /readyz, the signals or the dead letters; every log line is JSON
    and each event's outcome is one line with its id, client, type, command, outcome,
    error code, attempts and duration."""
    user, password = amqp_user
    nz_key = f"nzkey{uuid.uuid4().hex}"
    au_wrong_key = f"auwrong{uuid.uuid4().hex}"
    au_right_key = f"auright{uuid.uuid4().hex}"
    secrets = {
        "AMQP password": password,
        "NZ API key": nz_key,
        "AU API key (rejected)": au_wrong_key,
        "NZ Basic auth": base64.b64encode(f"nz-user:{nz_key}".encode()).decode(),
        "AU Basic auth": base64.b64encode(f"au-user:{au_wrong_key}".encode()).decode(),
    }
    tag = f"jct-{uuid.uuid4().hex[:10]}"
    sim_port, http_port = _free_port(), _free_port()
    key_file = tmp_path / "nz-api-key"
    key_file.write_text(f"  {nz_key}\n")
    raw: dict[str, Any] = {
        "amqp_url": f"amqp://{user}:{password}@127.0.0.1:5672/",
        "events_exchange": f"{tag}.events", "history_exchange": f"{tag}.history",
        "queue_prefix": tag, "http_port": http_port, "shutdown_grace_seconds": 3,
        "watchdog_interval_seconds": 0.5,
        "retry": {"max_attempts": 2, "initial_delay_seconds": 0.01, "max_delay_seconds": 0.05,
                  "max_elapsed_seconds": 5},
        "communicator_types": [
            {"name": "M2MOne NZ", "server_address": f"http://127.0.0.1:{sim_port}/rws/api/v1",
             "username": "nz-user", "api_key_file": str(key_file), "max_concurrency": 2,
             "requests_per_second": 100, "request_timeout_seconds": 2},
            {"name": "M2MOne AU", "server_address": f"http://127.0.0.1:{sim_port}/rws/api/v1",
             "username": "au-user", "api_key": au_wrong_key, "requests_per_second": 100,
             "request_timeout_seconds": 2},
        ],
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    settings = parse_settings(raw, {})
    names = Names.from_settings(settings)

    simulator = _Process([str(BIN / "jasper-consumer"), "simulator", "--port", str(sim_port),
                          "--account", f"nz-user:{nz_key}:2:100",
                          "--account", f"au-user:{au_right_key}:1:100"], tmp_path, "simulator")
    service: _Process | None = None
    channel = await connection.channel()
    try:
        async def sim_up() -> bool:
            try:
                return (await get(http, sim_port, "/_sim/stats"))[0] == 200
            except aiohttp.ClientError:
                return False

        await poll(sim_up, "the simulator", timeout=15)
        for iccid_, fault in ((iccid(602), {"fail_times": 1}),
                              (iccid(603), {"always_fail": True, "http_status": 503})):
            async with http.put(f"http://127.0.0.1:{sim_port}/_sim/faults/{iccid_}",
                                json=fault) as resp:
                assert resp.status == 200

        service = _Process([str(BIN / "jasper-consumer"), "run", "--config", str(config)],
                           tmp_path, "service")

        async def ready() -> bool:
            assert service is not None
            assert service.popen.poll() is None, f"service exited: {service.output()[1]}"
            try:
                return (await get(http, http_port, "/readyz"))[0] == 200
            except aiohttp.ClientError:
                return False

        await poll(ready, "the service to be ready", timeout=20)

        history: list[aio_pika.abc.AbstractIncomingMessage] = []
        dead: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def on_signal(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            history.append(message)

        async def on_dead(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            dead.append(message)

        await (await channel.get_queue(names.history_queue)).consume(on_signal, no_ack=True)
        await (await channel.get_queue(names.dead_queue)).consume(on_dead, no_ack=True)
        exchange = await channel.get_exchange(settings.events_exchange)

        async def publish(body: dict[str, Any] | bytes) -> None:
            raw_body = body if isinstance(body, bytes) else json.dumps(body).encode()
            await exchange.publish(aio_pika.Message(raw_body, content_type="application/json"),
                                   routing_key="event.65516")

        def outcomes(event_id: str) -> list[str]:
            return [json.loads(m.body)["outcome"] for m in history
                    if m.correlation_id == event_id]

        finals = [make_event(iccid(601)), make_event(iccid(602)), make_event(iccid(603)),
                  make_event("89990000000000000002"), make_event("12")]
        paused = make_event(iccid(604), communicator_type="M2MOne AU")
        for event in [*finals, paused]:
            await publish(event)
        await publish(b"not json")

        async def settled() -> bool:
            return (all({"succeeded", "failed"} & set(outcomes(e["event_id"])) for e in finals)
                    and "delayed" in outcomes(paused["event_id"]) and len(dead) == 2)

        await poll(settled, "final signals, the delayed signal and two dead letters", 20)

        # The broker drops the service's connection: it reconnects, and logs about it.
        _rabbitmqctl("close_all_user_connections", user, "jasper-consumer leak test")
        after = make_event(iccid(605))
        published: list[str] = []

        async def works_again() -> bool:
            if not await ready():
                return False
            if not published:
                published.append(after["event_id"])
                await publish(after)
            return "succeeded" in outcomes(after["event_id"])

        await poll(works_again, "an event to succeed after the reconnect", timeout=30)

        pages = [(await get(http, http_port, path))[1]
                 for path in ("/metrics", "/healthz", "/readyz")]
        exit_code = service.stop(timeout=20)
        stdout, stderr = service.output()
        outputs = {
            "stdout": stdout, "stderr": stderr, "/metrics": pages[0], "/healthz": pages[1],
            "/readyz": pages[2],
            "signals": "\n".join(repr((m.body, m.headers)) for m in history),
            "dead letters": "\n".join(repr((m.body, m.headers)) for m in dead),
        }

        assert exit_code == 0, f"SIGTERM: exit code {exit_code}\n{stderr[-2000:]}"
        leaks = [(what, where) for what, secret in secrets.items()
                 for where, text in outputs.items() if secret in text]
        assert not leaks, f"secrets found: {leaks}"
        assert "reconnect" in stderr.lower(), "the lost connection was not logged"

        lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
        assert all({"ts", "level", "msg"} <= line.keys() for line in lines)
        outcome_keys = {"event_id", "client_id", "communicator_type", "command", "outcome",
                        "error_code", "attempts", "duration_ms"}
        for event in [*finals, after]:
            mine = [line for line in lines if line.get("event_id") == event["event_id"]
                    and line.get("outcome") in ("succeeded", "failed")]
            assert len(mine) == 1, (event["event_id"], mine)
            assert outcome_keys <= mine[0].keys(), outcome_keys - mine[0].keys()
            assert mine[0]["client_id"] == CLIENT_ID
        delayed = [line for line in lines if line.get("event_id") == paused["event_id"]]
        assert [line["outcome"] for line in delayed] == ["delayed"]
        assert {m.headers[DEAD_REASON_HEADER] for m in dead} >= {"RETRIES_EXHAUSTED"}
    finally:
        if service is not None:
            service.stop(timeout=10)
        simulator.stop(timeout=10)
        await delete_all(channel, settings)
        await channel.exchange_delete(settings.events_exchange)
        await channel.exchange_delete(settings.history_exchange)
        await channel.close()

