"""The operator tools against the real broker, the simulator and the running service.

The dead-letter tests read dead letters only through the tools: the test watches a
copy of each (an exclusive queue bound to ``<prefix>.dlx``), never ``<prefix>.dead``.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import yaml
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from prometheus_client import CollectorRegistry

from jasper_consumer.app import Service
from jasper_consumer.cli import run_tool
from jasper_consumer.config import Settings, parse_settings
from jasper_consumer.metrics import Metrics
from jasper_consumer.simulator import Simulator
from jasper_consumer.tools import demo, replay
from jasper_consumer.tools.deadletters import DeadLetter
from jasper_consumer.topology import remove_topology

from .conftest import AMQP_URL, Broker, Owner, iccid, make_event, raw_config


class ToolsBroker(Broker):
    """Reads signals, and a copy of each dead letter, leaving ``<prefix>.dead`` to the tools."""

    async def start_reading(self) -> None:
        history = await self.channel.get_queue(self.names.history_queue)
        await history.consume(self._on_signal, no_ack=True)
        watch = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        await watch.bind(self.names.dead_exchange, routing_key="")
        await watch.consume(self._on_dead, no_ack=True)

    async def dead_letter(self, body: bytes | dict[str, Any], headers: dict[str, Any], *,
                          message_id: str | None = None,
                          timestamp: datetime | None = None) -> None:
        """Put a message on the dead-letter exchange as the service or the broker would."""
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        exchange = await self.confirming.get_exchange(self.names.dead_exchange)
        await exchange.publish(
            aio_pika.Message(raw, headers=headers, message_id=message_id, timestamp=timestamp,
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key="")

    confirming: AbstractChannel


@dataclass
class Env:
    settings: Settings
    config: Path
    broker: ToolsBroker

    async def tool(self, *argv: str) -> tuple[int, str]:
        out = io.StringIO()
        head = 2 if argv[0] == "dead-letters" else 1  # --config belongs to the subcommand
        status = await run_tool([*argv[:head], "--config", str(self.config), *argv[head:]], out)
        return status, out.getvalue()

    async def listed(self) -> list[dict[str, Any]]:
        status, text = await self.tool("dead-letters", "list", "--json", "--limit", "1000")
        assert status == 0, text
        return [json.loads(line) for line in text.splitlines()]


MakeEnv = Callable[..., Awaitable[Env]]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
async def make_env(sim: Simulator, connection: AbstractRobustConnection,
                   tmp_path: Path) -> AsyncIterator[MakeEnv]:
    """A config file for the tools and, with ``service=True``, the service running on it."""
    tag = f"jct-{uuid.uuid4().hex[:10]}"
    channel = await connection.channel()
    confirming = await connection.channel(publisher_confirms=True)
    services: list[Service] = []
    made: list[Settings] = []

    async def make(types: list[dict[str, Any]] | None = None, *, service: bool = True,
                   **overrides: Any) -> Env:
        made_types: list[dict[str, Any]] = []
        for t in types or [{"name": "M2MOne NZ", "username": "nz", "api_key": "nz-key"}]:
            t.setdefault("server_address", sim.base_url)
            t.setdefault("requests_per_second", 100)
            if t["username"] not in sim.accounts:
                sim.add_account(t["username"], t["api_key"], max_in_flight=4,
                                requests_per_second=200)
            made_types.append(t)
        raw = raw_config(tag, made_types, **overrides)
        settings = parse_settings(raw, {})
        config = tmp_path / f"config-{uuid.uuid4().hex[:6]}.yaml"
        config.write_text(yaml.safe_dump(raw), encoding="utf-8")
        broker = ToolsBroker(channel, settings)
        broker.confirming = confirming
        if service:
            running = Service(settings, Metrics(CollectorRegistry()), http_host="127.0.0.1")
            await running.start()
            services.append(running)
            made.append(settings)
            await broker.start_reading()
        return Env(settings, config, broker)

    yield make

    for running in services:
        await running.stop()
    for settings in made[:1]:
        await remove_topology(connection, settings)
    await confirming.close()
    await channel.close()


# --- check-config --ping and sim-status ---------------------------------------------------


async def test_ping_says_per_type_what_is_wrong(make_env: MakeEnv, sim: Simulator) -> None:
    """check-config --ping prints OK or the problem for each type and fails if any fails."""
    sim.add_account("au", "right-key")
    env = await make_env([
        {"name": "M2MOne NZ", "username": "nz", "api_key": "nz-key"},
        {"name": "M2MOne AU", "username": "au", "api_key": "wrong-key"},
        {"name": "Offline", "username": "off", "api_key": "k",
         "server_address": f"http://127.0.0.1:{closed_port()}/rws/api/v1"},
    ], service=False)

    status, text = await env.tool("check-config", "--ping")

    lines = text.splitlines()
    assert status == 1
    assert lines[0].endswith("OK — 3 communicator type(s): 'M2MOne NZ', 'M2MOne AU', 'Offline'")
    assert lines[2].startswith("  M2MOne NZ: OK (Echo answered in ")
    assert lines[3] == ("  M2MOne AU: invalid credentials (10000001) — check the user name and "
                        "API key, and that this host's IP is allowed")
    assert lines[4].startswith("  Offline: Control Center unreachable: connection refused by "
                               "127.0.0.1:")
    assert lines[5] == "2 of 3 communicator type(s) failed Echo"
    assert [r.path for r in sim.requests] == ["/rws/api/v1/echo/jasper-consumer"] * 2


async def test_ping_passes_when_every_type_answers(make_env: MakeEnv) -> None:
    """check-config --ping exits 0 when Echo passes for every type."""
    env = await make_env(service=False)

    status, text = await env.tool("check-config", "--ping")

    assert status == 0, text
    assert "M2MOne NZ: OK" in text


async def test_sim_status_shows_a_table_or_json(make_env: MakeEnv, sim: Simulator) -> None:
    """sim-status prints the SIM's status and main fields, or Control Center's JSON."""
    sim.set_status(iccid(1), "ACTIVATED")
    env = await make_env(service=False)

    status, text = await env.tool("sim-status", "--communicator-type", "M2MOne NZ",
                                  "8961 0185 00" + iccid(1)[10:])
    json_status, json_text = await env.tool("sim-status", "--communicator-type", "M2MOne NZ",
                                            iccid(1), "--json")

    lines = text.splitlines()
    assert status == 0
    assert lines[0] == f"SIM {iccid(1)} via M2MOne NZ"
    assert lines[3].split() == ["ICCID", iccid(1)]
    assert "ACTIVATED — live: the SIM can connect and is billed" in lines[4]
    assert "Rate plan" in text
    assert "Date activated" in text
    assert json_status == 0
    assert json.loads(json_text)["status"] == "ACTIVATED"


async def test_sim_status_of_an_unknown_sim_fails_with_its_meaning(
    make_env: MakeEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown ICCID, a bad ICCID and an unknown type each fail with a clear message."""
    env = await make_env(service=False)

    unknown = await env.tool("sim-status", "--communicator-type", "M2MOne NZ",
                             "89990000000000000001")
    as_json = await env.tool("sim-status", "--communicator-type", "M2MOne NZ",
                             "89990000000000000001", "--json")
    bad = await env.tool("sim-status", "--communicator-type", "M2MOne NZ", "12")
    no_type = await env.tool("sim-status", "--communicator-type", "Nope", iccid(2))

    assert unknown == (1, "SIM 89990000000000000001 via M2MOne NZ: no such SIM (invalid ICCID) "
                          "(20000001) — check the Device Ref No against the SIM's ICCID in "
                          "Control Center, and that the SIM belongs to this communicator "
                          "type's account\n")
    assert as_json[0] == 1
    assert json.loads(as_json[1])["error"]["code"] == "20000001"
    assert bad == (1, "")
    assert no_type == (1, "")
    errors = capsys.readouterr().err
    assert "Device Ref No '12' is not an ICCID" in errors
    assert "communicator type 'Nope' is not configured (configured: 'M2MOne NZ')" in errors


async def test_sim_status_never_calls_directly_when_the_broker_does_not_answer(
    make_env: MakeEnv, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broker that does not answer cannot say whether a service owns the type: sim-status
    fails, saying so, and makes no call of its own (a service may own the type)."""
    sim.set_status(iccid(1), "ACTIVATED")
    env = await make_env(service=False,
                         amqp_url=f"amqp://guest:guest@127.0.0.1:{closed_port()}/")

    status, text = await env.tool("sim-status", "--communicator-type", "M2MOne NZ", iccid(1))

    assert (status, text) == (1, "")
    assert "cannot connect: RabbitMQ at 127.0.0.1" in capsys.readouterr().err
    assert sim.requests == []


async def test_ping_and_sim_status_go_through_the_owning_process(
    make_env: MakeEnv, sim: Simulator, connection: AbstractRobustConnection
) -> None:
    """With a service process owning the type, check-config --ping's Echo and sim-status's
    Get Device Details are made by that process, never by the tool."""
    sim.set_status(iccid(1), "ACTIVATED")
    env = await make_env(service=False)
    owner = Owner(connection, env.settings)
    await owner.start()
    try:
        ping_status, ping = await env.tool("check-config", "--ping")
        status, text = await env.tool("sim-status", "--communicator-type", "M2MOne NZ",
                                      iccid(1), "--json")
    finally:
        await owner.stop()

    assert owner.served == [{"op": "echo"}, {"op": "get_device", "iccid": iccid(1)}]
    assert len(sim.requests) == len(owner.served)
    assert ping_status == 0, ping
    assert "M2MOne NZ: OK (Echo answered in " in ping
    assert "made by the service process that owns it, with its settings)" in ping
    assert (status, json.loads(text)["status"]) == (0, "ACTIVATED")


# --- dead-letters list --------------------------------------------------------------------


async def test_list_shows_what_the_service_dead_lettered(make_env: MakeEnv,
                                                          sim: Simulator) -> None:
    """Unreadable input and an exhausted event are listed with reason, client and event."""
    env = await make_env()
    broker = env.broker
    await broker.publish(b"not json", message_id="m-1")
    await broker.wait_for(lambda: len(broker.dead) == 1, "the unreadable message")
    sim.set_fault(iccid(3), always_fail=True, http_status=503, html=True)
    event = make_event(iccid(3))
    await broker.publish(event)
    await broker.wait_for(lambda: len(broker.dead) == 2, "the exhausted event's copy")

    status, text = await env.tool("dead-letters", "list")

    lines = text.splitlines()
    assert status == 0
    assert lines[0] == f"{env.settings.queue_prefix}.dead: 2 dead letter(s)"
    first, second = lines[3].split(), lines[4].split()
    assert first[0] == "1"
    assert "body is not JSON" in lines[3]
    assert first[-2:] == ["m-1", "no"]
    assert second[0] == "2"
    assert "RETRIES_EXHAUSTED (last error UNEXPECTED_RESPONSE)" in lines[4]
    assert second[-3:] == ["100234", event["event_id"], "yes"]
    assert lines[5] == "showing 2 of 2"


async def test_list_loses_and_reorders_nothing(make_env: MakeEnv) -> None:
    """Listing (whole, filtered, limited) twice leaves every dead letter in place, in order."""
    env = await make_env()
    count = 300  # enough for the broker to shuffle returns that are not handed back one by one
    start = datetime.now(UTC) - timedelta(hours=6)
    for n in range(count):
        reason = "RETRIES_EXHAUSTED" if n % 3 else "body is not JSON"
        await env.broker.dead_letter(make_event(iccid(1000 + n), client_id=f"c{n}"),
                                     {"x-jasper-error": reason},
                                     timestamp=start + timedelta(minutes=n))
    await env.broker.wait_for(lambda: len(env.broker.dead) == count, f"{count} dead letters")

    before = await env.listed()
    _, limited = await env.tool("dead-letters", "list", "--limit", "3")
    _, filtered = await env.tool("dead-letters", "list", "--reason", "not json", "--json",
                                 "--limit", "4")
    after = await env.listed()

    clients = [d["client_id"] for d in before]
    assert clients == [f"c{n}" for n in range(count)]
    assert [d["client_id"] for d in after] == clients
    assert [d["position"] for d in after] == list(range(1, count + 1))
    assert [json.loads(line)["client_id"] for line in filtered.splitlines()] == \
        ["c0", "c3", "c6", "c9"]
    assert f"showing 3 of {count} (--limit 3; raise it to see more)" in limited
    assert before[0]["age_seconds"] >= 6 * 3600 - 60


async def test_list_of_an_empty_queue_and_a_missing_one(
    make_env: MakeEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty queue says so; a prefix the service never used is a clear error."""
    env = await make_env()
    missing = await make_env(service=False, queue_prefix=f"jct-none-{uuid.uuid4().hex[:6]}")

    assert await env.tool("dead-letters", "list") == \
        (0, f"{env.settings.queue_prefix}.dead is empty\n")
    assert await missing.tool("dead-letters", "list") == (1, "")
    assert "has the service run with queue_prefix" in capsys.readouterr().err


# --- dead-letters replay ------------------------------------------------------------------


async def test_replay_requeues_events_and_skips_the_rest(make_env: MakeEnv,
                                                         sim: Simulator) -> None:
    """After the outage, replay gets the exhausted event done and leaves unreadable input."""
    env = await make_env()
    broker = env.broker
    sim.set_fault(iccid(4), always_fail=True, http_status=500)
    event = make_event(iccid(4))
    await broker.publish(event)
    await broker.wait_for(lambda: len(broker.dead) == 1, "the exhausted event's copy")
    await broker.publish(b"\xff\xfe", message_id="m-2")
    await broker.wait_for(lambda: len(broker.dead) == 2, "the unreadable message")
    sim.clear_faults()

    status, text = await env.tool("dead-letters", "replay")
    await broker.wait_for(
        lambda: [s["outcome"] for s in broker.final(event["event_id"])] == ["failed",
                                                                            "succeeded"],
        "the replayed event's success")

    assert status == 0
    lines = text.splitlines()
    assert lines[-4] == "replay: 2/2  replayed 1  skipped 1"
    assert lines[-3] == (f"replayed 1 of 2 dead letter(s) to {env.settings.events_exchange} "
                         "(event.65516)")
    assert lines[-2].startswith("skipped 1 that are not events")
    assert lines[-1] == f"left in {env.settings.queue_prefix}.dead: 1"
    assert sim.status(iccid(4)) == "ACTIVATED"
    assert [d["event_id"] for d in await env.listed()] == ["m-2"]


async def test_replay_honours_reason_and_limit(make_env: MakeEnv) -> None:
    """--reason picks by reason, --limit stops after N; the rest stays, in order."""
    env = await make_env()
    events = [make_event(iccid(200 + n), client_id=f"c{n}") for n in range(100)]
    for n, event in enumerate(events):
        reason = "something else" if n == 1 else "RETRIES_EXHAUSTED"
        await env.broker.dead_letter(event, {"x-jasper-error": reason},
                                     message_id=event["event_id"])
    await env.broker.wait_for(lambda: len(env.broker.dead) == 100, "100 dead letters")

    status, text = await env.tool("dead-letters", "replay", "--reason", "retries",
                                  "--limit", "2")
    replayed = [events[0]["event_id"], events[2]["event_id"]]
    await env.broker.final_signals(replayed)

    assert status == 0
    assert "replayed 2 of 100 dead letter(s)" in text
    assert "skipped 1 not matching --reason 'retries'" in text
    assert "skipped 97 beyond --limit 2" in text
    assert [d["client_id"] for d in await env.listed()] == \
        ["c1"] + [f"c{n}" for n in range(3, 100)]
    assert {s["event_id"] for s in env.broker.signals} == set(replayed)


async def test_stopped_replay_hands_the_rest_back_in_order(make_env: MakeEnv) -> None:
    """A replay stopped (first Ctrl-C) after two events leaves the rest queued, in order."""
    env = await make_env()
    events = [make_event(iccid(300 + n)) for n in range(40)]
    for event in events:
        await env.broker.dead_letter(event, {"x-jasper-error": "RETRIES_EXHAUSTED"},
                                     message_id=event["event_id"])
    await env.broker.wait_for(lambda: len(env.broker.dead) == 40, "40 dead letters")
    stop = asyncio.Event()

    def stop_after_two(letter: DeadLetter) -> None:
        if summary.replayed == 2:
            stop.set()

    summary = replay.ReplaySummary("dead", "events")
    await replay.replay(env.settings, summary=summary, on_replayed=stop_after_two, stop=stop)

    ids = [e["event_id"] for e in events]
    await env.broker.final_signals(ids[:2])
    assert (summary.interrupted, summary.replayed, summary.not_reached) == (True, 2, 38)
    assert [d["event_id"] for d in await env.listed()] == ids[2:]
    assert {s["event_id"] for s in env.broker.signals} == set(ids[:2])


async def test_aborted_replay_loses_nothing(make_env: MakeEnv) -> None:
    """A replay aborted at once (second Ctrl-C) leaves each dead letter replayed or queued."""
    env = await make_env()
    events = [make_event(iccid(400 + n)) for n in range(40)]
    for n, event in enumerate(events):
        body: dict[str, Any] | bytes = event if n % 4 else b"unreadable"
        await env.broker.dead_letter(body, {"x-jasper-error": "RETRIES_EXHAUSTED"},
                                     message_id=event["event_id"])
    await env.broker.wait_for(lambda: len(env.broker.dead) == 40, "40 dead letters")
    summary = replay.ReplaySummary("dead", "events")

    def abort_after_ten(letter: DeadLetter) -> None:
        if summary.replayed == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await replay.replay(env.settings, summary=summary, on_replayed=abort_after_ten)

    replayed = {e["event_id"] for n, e in enumerate(events[:14]) if n % 4}  # 10 readable
    await env.broker.final_signals(sorted(replayed))
    left = [d["event_id"] for d in await env.listed()]
    assert (summary.interrupted, summary.replayed) == (True, 10)
    assert sorted(left) == sorted(e["event_id"] for e in events if e["event_id"] not in replayed)
    assert {s["event_id"] for s in env.broker.signals} == replayed


async def test_replay_leaves_what_the_broker_cannot_route(make_env: MakeEnv) -> None:
    """An event whose code nothing is bound to stays dead-lettered; the run fails."""
    env = await make_env()
    stray = make_event(iccid(5), code=65999)
    await env.broker.dead_letter(stray, {"x-jasper-error": "RETRIES_EXHAUSTED"})
    await env.broker.wait_for(lambda: len(env.broker.dead) == 1, "the dead letter")

    status, text = await env.tool("dead-letters", "replay")

    assert status == 1
    assert "skipped 1 the broker could not route" in text
    assert [d["event_id"] for d in await env.listed()] == [stray["event_id"]]


async def test_replay_turns_a_dead_work_item_back_into_its_event(
    make_env: MakeEnv, sim: Simulator
) -> None:
    """A job the broker dead-lettered from a work queue is replayed as its event."""
    sim.set_status(iccid(6), "ACTIVATED")
    env = await make_env()
    event_id = str(uuid.uuid4())
    job = {"event_id": event_id, "event_code": 65517, "client_id": "100234",
           "command": "deactivate", "iccid": iccid(6), "communicator_type": "M2MOne NZ",
           "occurred_at": None}
    death = {"reason": "delivery_limit", "queue": f"{env.settings.queue_prefix}.work.m2mone-nz",
             "count": 1, "exchange": "", "routing-keys": ["x"],
             "time": datetime.now(UTC).replace(microsecond=0)}
    await env.broker.dead_letter(job, {"x-death": [death]}, message_id=event_id)
    await env.broker.wait_for(lambda: len(env.broker.dead) == 1, "the dead letter")

    listed = await env.listed()
    status, _ = await env.tool("dead-letters", "replay")
    signal = await env.broker.signal_for(event_id)

    assert listed[0]["reason"] == f"delivery limit in {env.settings.queue_prefix}.work.m2mone-nz"
    assert listed[0]["replayable"] is True
    assert status == 0
    assert (signal["outcome"], signal["command"]) == ("succeeded", "deactivate")
    assert sim.status(iccid(6)) == "DEACTIVATED"


# --- the demo -----------------------------------------------------------------------------


async def test_demo_plays_every_scenario() -> None:
    """The demo's five scenarios end as described, and its table shows each signal."""
    out = io.StringIO()

    problems, signals = await demo.run_demo(out, AMQP_URL)

    assert problems == []
    assert [(s["outcome"], (s["error"] or {}).get("code")) for s in signals] == [
        ("succeeded", None), ("succeeded", None), ("failed", "20000001"),
        ("failed", "MISSING_ICCID"), ("delayed", "10000001"), ("succeeded", None)]
    table = out.getvalue().split("Signals in the client history")[1].splitlines()
    assert table[1].split() == ["EVENT", "CLIENT", "ICCID", "OUTCOME", "CODE", "TEXT"]
    assert len(table) == 3 + len(signals)
