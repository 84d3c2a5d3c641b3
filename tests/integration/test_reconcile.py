"""``reconcile`` against the real broker and the simulator over real sockets (operator guide,
sections 7 and 13).

Two communicator types of 1,200 SIMs each (24 pages each) with every kind of mismatch,
linked areas sharing SIMs, a bad row and a row of a type not in the config. Most tests
run reconcile with no service consuming the work queues (direct calls); one runs the
service's ``OwnerCalls`` as the owning process, one the whole service beside a backlog.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import yaml
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from prometheus_client import CollectorRegistry

from jasper_consumer.app import Service
from jasper_consumer.cli import run_tool
from jasper_consumer.config import Settings, parse_settings
from jasper_consumer.metrics import Metrics
from jasper_consumer.simulator import Simulator
from jasper_consumer.tools import reconcile
from jasper_consumer.tools.reconcile import demo as demo_reconcile
from jasper_consumer.topology import TOKEN_HEADER, Names, declare, remove_topology

from .conftest import AMQP_URL, Broker, Owner, make_event, raw_config

NZ, AU = "M2MOne NZ", "M2MOne AU"
TYPES = ((NZ, "nz", 1), (AU, "au", 2))  # name, account, digit in its ICCIDs
KIND_ORDER = ("MONITORED_NOT_LIVE", "LIVE_NOT_MONITORED", "UNKNOWN_SIM", "INVALID_ICCID")
SIMS_PER_TYPE = 1200


def ic(digit: int, n: int) -> str:
    return f"896101850{digit}{n:010d}"


@dataclass
class Scenario:
    """SIMs per account, the client list, and what reconcile must report."""

    sims: dict[str, dict[str, str]] = field(default_factory=dict)  # account -> ICCID -> status
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    expected: list[dict[str, Any]] = field(default_factory=list)
    fixes: int = 0

    def add(self, iccid: str, kind: str, ct: str, status: str | None, client: str | None,
            fixable: bool = False) -> None:
        self.expected.append({"iccid": iccid, "kind": kind, "communicator_type": ct,
                              "sim_status": status, "client_id": client})
        self.fixes += fixable

    def ordered(self, *, untouchable_only: bool = False) -> list[dict[str, Any]]:
        types = [name for name, _, _ in TYPES]
        kept = [e for e in self.expected if not untouchable_only
                or e["kind"] in ("UNKNOWN_SIM", "INVALID_ICCID") or e["client_id"] is None]
        return sorted(kept, key=lambda e: (KIND_ORDER.index(e["kind"]),
                                           types.index(e["communicator_type"]), e["iccid"]))

    def csv(self) -> bytes:
        lines = ["Client No;Device Ref No;Communicator Type;Commissioned;Client Name"]
        lines += [f"{c};{r};{t};{yes};Client {c}" for c, r, t, yes in self.rows]
        return ("\ufeff" + "\r\n".join(lines) + "\r\n").encode()


def build() -> Scenario:
    """Per type: 1,200 SIMs, most agreeing, ten of each fixable kind, and the rest."""
    s = Scenario()
    for name, account, d in TYPES:
        other = 3 - d
        sims: dict[str, str] = {}
        for n in range(SIMS_PER_TYPE):
            i, client, r = ic(d, n), f"{d}{n:05d}", n % 10
            if n < 1000:  # agreeing
                if r <= 5:
                    sims[i] = "ACTIVATED"
                    s.rows.append((client, i, name, "Yes"))
                    if n % 50 == 0:  # a base with two linked areas, one decommissioned
                        s.rows += [(f"{client}-1", i, name, "No"),
                                   (f"{client}-2", i, name, "yes")]
                elif r <= 7:
                    sims[i] = "DEACTIVATED"
                    s.rows.append((client, i, name, "no"))
                    if n % 50 == 6:
                        s.rows.append((f"{client}-1", i, name, "false"))
                else:
                    sims[i] = "DEACTIVATED" if r == 8 else "INVENTORY"  # no client: fine
            elif n < 1010:  # MONITORED_NOT_LIVE
                sims[i] = {1005: "ACTIVATION_READY", 1006: "INVENTORY"}.get(n, "DEACTIVATED")
                if n < 1002:  # the base is decommissioned, a linked area is commissioned
                    s.rows += [(client, i, name, "0"), (f"{client}-1", i, name, "1")]
                    s.add(i, "MONITORED_NOT_LIVE", name, sims[i], f"{client}-1", True)
                else:
                    s.rows.append((client, i, name, "TRUE"))
                    s.add(i, "MONITORED_NOT_LIVE", name, sims[i], client, True)
            elif n < 1020:  # LIVE_NOT_MONITORED of clients that are all decommissioned
                sims[i] = "ACTIVATED"
                s.rows.append((client, i, name, "No"))
                if n < 1012:
                    s.rows.append((f"{client}-1", i, name, "No"))
                s.add(i, "LIVE_NOT_MONITORED", name, "ACTIVATED", client, True)
            elif n < 1025:  # LIVE_NOT_MONITORED of no client
                sims[i] = "ACTIVATED"
                s.add(i, "LIVE_NOT_MONITORED", name, "ACTIVATED", None)
            else:
                sims[i] = "DEACTIVATED"
        s.sims[account] = sims
        # UNKNOWN_SIM: an ICCID no account has, and one of the other type's account.
        s.rows += [(f"{d}90001", ic(d, 5000), name, "yes"), (f"{d}90002", ic(other, 1), name, "no")]
        s.add(ic(d, 5000), "UNKNOWN_SIM", name, None, f"{d}90001")
        s.add(ic(other, 1), "UNKNOWN_SIM", name, None, f"{d}90002")
        # INVALID_ICCID: a typo, and a commissioned client without a Device Ref No.
        s.rows += [(f"{d}90003", f"8961-0185-{d}X", name, "yes"), (f"{d}90004", "", name, "yes"),
                   (f"{d}90005", "", name, "no")]
        s.add(f"8961-0185-{d}X", "INVALID_ICCID", name, None, f"{d}90003")
        s.add("", "INVALID_ICCID", name, None, f"{d}90004")
    s.rows += [("99001", ic(1, 1), "Vodafone NZ", "yes"),  # a type not in the config
               ("99002", ic(1, 2), NZ, "sometimes")]  # a bad row
    return s


@dataclass
class Env:
    settings: Settings
    config: Path
    clients: Path
    sim: Simulator
    connection: AbstractRobustConnection
    channel: AbstractChannel
    services: list[Service] = field(default_factory=list)

    async def declare_topology(self) -> None:
        """The service's queues, without a service: fixes wait in <prefix>.events."""
        channel = await self.connection.channel()
        await declare(channel, self.settings)
        await channel.close()

    async def reconcile(self, *, fix: bool = False, yes: bool = False, fmt: str = "json",
                        confirm: reconcile.Confirm | None = None) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = await reconcile.run(
            self.settings, reconcile.Options(self.clients, format=fmt, fix=fix, yes=yes),
            out, err, confirm=confirm)
        return status, out.getvalue(), err.getvalue()

    async def start_service(self) -> Broker:
        service = Service(self.settings, Metrics(CollectorRegistry()), http_host="127.0.0.1")
        await service.start()
        self.services.append(service)
        broker = Broker(self.channel, self.settings)
        await broker.start_reading()
        return broker

    async def stop_services(self) -> None:
        while self.services:
            await self.services.pop().stop()


@pytest.fixture
async def env(sim: Simulator, connection: AbstractRobustConnection,
              tmp_path: Path) -> AsyncIterator[Env]:
    """Two types on the simulator (2 calls at once, 50/s), a config file, the client list."""
    tag = f"jct-{uuid.uuid4().hex[:10]}"
    types = []
    for name, account, _ in TYPES:
        sim.add_account(account, f"{account}-key", max_in_flight=2, requests_per_second=50)
        types.append({"name": name, "server_address": sim.base_url, "username": account,
                      "api_key": f"{account}-key", "max_concurrency": 2,
                      "requests_per_second": 50})
    raw = raw_config(tag, types)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    channel = await connection.channel()
    made = Env(parse_settings(raw, {}), config, tmp_path / "clients.csv", sim, connection,
               channel)
    yield made
    await made.stop_services()
    await remove_topology(connection, made.settings)
    await channel.close()


def load(env: Env, scenario: Scenario) -> None:
    for account, sims in scenario.sims.items():
        env.sim.add_sims(sims, account=account)
    env.clients.write_bytes(scenario.csv())


async def test_report_of_two_accounts_of_1200_sims_is_exactly_right(env: Env) -> None:
    """Every kind, linked areas sharing SIMs, a bad row and a foreign type: the exact report."""
    scenario = build()
    load(env, scenario)

    status, out, err = await env.reconcile()

    assert status == 1, err
    assert json.loads(out) == scenario.ordered()
    assert [r.path for r in env.sim.requests] == ["/rws/api/v1/devices"] * len(env.sim.requests)
    assert 48 <= len(env.sim.requests) <= 48 + 2 * 2  # 24 pages each, at most a window more
    assert env.sim.violations == 0
    assert f"line {len(scenario.rows) + 1}: Commissioned is 'sometimes'" in err  # the last
    assert "skipped 1 row(s) of communicator types not in the config ('Vodafone NZ': 1)" in err
    assert "no service consumes" in err
    assert f"{NZ}: 1,200 SIM(s) in Control Center" in err
    assert "24 page(s)" in err


async def test_table_and_csv_carry_the_same_report(env: Env) -> None:
    """The table and the CSV list the same ICCIDs in the same order as the JSON."""
    scenario = build()
    load(env, scenario)

    _, table, _ = await env.reconcile(fmt="table")
    _, csv_text, _ = await env.reconcile(fmt="csv")

    expected = scenario.ordered()
    assert [line.split(",")[0] for line in csv_text.splitlines()[1:]] == [
        e["iccid"] for e in expected]
    kinds = [line.split()[0] for line in table.splitlines()[2:]]
    assert kinds == [e["kind"] for e in expected]


async def test_fix_then_a_second_run_reports_only_what_fix_must_not_touch(env: Env) -> None:
    """--fix --yes publishes one event per fixable SIM; once applied, only the rest remain."""
    scenario = build()
    load(env, scenario)
    await env.declare_topology()

    status, _, err = await env.reconcile(fix=True, yes=True)
    assert status == 1, err
    assert f"published {scenario.fixes} event(s) with origin 'reconcile'" in err
    broker = await env.start_service()
    await broker.wait_for(
        lambda: len([s for s in broker.signals if s["outcome"] in ("succeeded", "failed")])
        >= scenario.fixes, f"{scenario.fixes} final signals", timeout=60)
    await env.stop_services()
    second_status, second, _ = await env.reconcile()

    assert {(s["outcome"], s["text"].endswith(" (reconcile)")) for s in broker.signals} == {
        ("succeeded", True)}
    assert len(broker.signals) == scenario.fixes
    assert second_status == 1
    assert json.loads(second) == scenario.ordered(untouchable_only=True)
    assert env.sim.violations == 0


async def test_fix_skips_a_sim_whose_status_changed_since_the_report(env: Env) -> None:
    """A SIM changed between the report and the answer gets no event; the others do."""
    scenario = build()
    load(env, scenario)
    await env.declare_topology()
    clicked = ic(1, 1003)  # MONITORED_NOT_LIVE: an operator commissions it meanwhile

    async def confirm(question: str) -> bool:
        env.sim.set_status(clicked, "ACTIVATED")
        return True

    status, _, err = await env.reconcile(fix=True, confirm=confirm)
    events = await drain_events(env, scenario.fixes - 1)

    assert status == 1
    assert f"published {scenario.fixes - 1} event(s)" in err
    assert f"skipped {clicked} ({NZ}): its status changed since the report, DEACTIVATED -> " \
           "ACTIVATED" in err
    assert clicked not in {e["device"]["ref_no"] for e in events}
    assert {(e["origin"], e["command"]) for e in events} == {
        ("reconcile", "activate"), ("reconcile", "deactivate")}


async def drain_events(env: Env, count: int) -> list[dict[str, Any]]:
    """The ``count`` events waiting in <prefix>.events (no service runs), consumed; fails if
    fewer arrive."""
    channel = await env.connection.channel()
    queue = await channel.get_queue(Names.from_settings(env.settings).events_queue)
    messages: list[AbstractIncomingMessage] = []
    arrived = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        messages.append(message)
        if len(messages) >= count:
            arrived.set()

    tag = await queue.consume(on_message, no_ack=True)
    try:
        async with asyncio.timeout(20):
            await arrived.wait()
    finally:
        await queue.cancel(tag)
        await channel.close()
    assert {m.delivery_mode for m in messages} == {aio_pika.DeliveryMode.PERSISTENT}
    events = [json.loads(m.body) for m in messages]
    assert [m.message_id for m in messages] == [e["event_id"] for e in events]
    return events


async def test_with_an_owner_the_calls_go_through_it(env: Env) -> None:
    """With an owning process, every call goes through its calls queue after one wake token."""
    scenario = build()
    load(env, scenario)
    owner = Owner(env.connection, env.settings)
    await owner.start()
    try:
        status, out, err = await env.reconcile(fix=True, yes=True)
    finally:
        await owner.stop()
    served, tokens = owner.served, owner.tokens
    events = await drain_events(env, scenario.fixes)

    assert status == 1, err
    assert json.loads(out) == scenario.ordered()
    assert err.count("the service process that owns it makes the calls") == 2
    assert [(m.headers[TOKEN_HEADER], m.body) for m in tokens] == [("wake", b"{}")] * 2
    assert {m.delivery_mode for m in tokens} == {aio_pika.DeliveryMode.PERSISTENT}
    pages = [c for c in served if c["op"] == "search_devices"]
    reads = [c for c in served if c["op"] == "get_device"]
    assert 48 <= len(pages) <= 48 + 2 * 2
    assert len(reads) == len(events) == scenario.fixes
    assert len(env.sim.requests) == len(served)


@pytest.fixture
async def slow(sim: Simulator, connection: AbstractRobustConnection,
               tmp_path: Path) -> AsyncIterator[Env]:
    """One type on an account of one call at a time and 5 a second, its 1,000 SIMs (20
    pages, 4 s) all agreeing with the client list."""
    tag = f"jct-{uuid.uuid4().hex[:10]}"
    sim.add_account("nz", "nz-key", max_in_flight=1, requests_per_second=5)
    sim.add_sims({ic(1, n): "ACTIVATED" for n in range(1000)}, account="nz")
    raw = raw_config(tag, [{"name": NZ, "server_address": sim.base_url, "username": "nz",
                            "api_key": "nz-key", "max_concurrency": 1,
                            "requests_per_second": 5, "request_timeout_seconds": 1}])
    clients = tmp_path / "clients.csv"
    clients.write_text("client_id,ref_no,communicator_type,commissioned\n"
                       + "".join(f"c{n},{ic(1, n)},{NZ},yes\n" for n in range(1000)),
                       encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    channel = await connection.channel()
    made = Env(parse_settings(raw, {}), config, clients, sim, connection, channel)
    yield made
    await made.stop_services()
    await remove_topology(connection, made.settings)
    await channel.close()


async def until(condition: Callable[[], bool], timeout_s: float = 20) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 (the simulator tells no one)
            await asyncio.sleep(0.01)


async def test_a_service_that_starts_during_a_reconcile_makes_its_next_calls(
    slow: Env,
) -> None:
    """Whether a service owns the type is asked before every call, not once per run: a
    service that starts while reconcile calls Control Center itself makes every call
    after that (at most the one under way is still made by reconcile)."""
    owner = Owner(slow.connection, slow.settings)
    run = asyncio.create_task(slow.reconcile())
    await until(lambda: len(slow.sim.requests) >= 2)
    await owner.start()
    before = len(slow.sim.requests)
    try:
        status, out, err = await run
    finally:
        await owner.stop()

    assert (status, json.loads(out)) == (0, []), err
    assert "no service consumes" in err
    assert "a service now owns it: M2MOne NZ: the service process that owns it" in err
    direct = len(slow.sim.requests) - len(owner.served)
    assert before <= direct <= before + 1
    assert len(owner.served) >= 20 - direct
    assert {c["op"] for c in owner.served} == {"search_devices"}


async def test_a_reconcile_and_a_service_that_starts_meanwhile_keep_the_limits(
    slow: Env,
) -> None:
    """A reconcile under way when the service starts, with a backlog waiting for it, and
    the service never together call the account more than its limits allow."""
    await slow.declare_topology()
    backlog = Broker(slow.channel, slow.settings)
    for n in range(10):
        await backlog.publish(make_event(ic(1, n), communicator_type=NZ, client_id=f"c{n}"))
    run = asyncio.create_task(slow.reconcile())
    await until(lambda: len(slow.sim.requests) >= 2)
    broker = await slow.start_service()
    async with asyncio.timeout(60):
        status, out, err = await run
    await broker.wait_for(lambda: len(broker.signals) >= 10, "the backlog's signals")

    assert slow.sim.violations == 0
    assert (status, json.loads(out)) == (0, []), err
    assert "a service now owns it" in err


async def test_two_reconciles_without_a_service_do_not_both_call_the_account(
    slow: Env,
) -> None:
    """With no service running, a second tool that would call the account itself beside a
    first one is refused, saying why (ACCOUNT_IN_USE); the first keeps the limits."""
    first = asyncio.create_task(slow.reconcile())
    await until(lambda: len(slow.sim.requests) >= 1)
    second_status, _, second_err = await slow.reconcile()
    status, out, err = await first

    assert (status, json.loads(out)) == (0, []), err
    assert second_status == 2
    assert ("another operator tool is calling M2MOne NZ's account directly (no service "
            "runs)") in second_err
    assert "(ACCOUNT_IN_USE)" in second_err
    assert slow.sim.violations == 0


async def test_the_cli_runs_reconcile_and_exits_0_when_all_agree(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """jasper-consumer reconcile prints the summary on stderr and exits 0 when all agree."""
    env.sim.add_sims({ic(1, 1): "ACTIVATED", ic(2, 1): "DEACTIVATED"}, account="nz")
    env.clients.write_text(
        f"client_id,ref_no,communicator_type,commissioned\n1,{ic(1, 1)},{NZ},yes\n",
        encoding="utf-8")
    out = io.StringIO()

    status = await run_tool(["reconcile", "--config", str(env.config), "--clients",
                             str(env.clients), "--communicator-type", NZ], out)

    assert status == 0
    assert out.getvalue() == "Nothing to report: every SIM agrees with the client list.\n"
    err = capsys.readouterr().err
    assert "Every SIM agrees with the client list." in err
    assert "nz-key" not in err + out.getvalue()


async def test_a_reconcile_and_a_backlog_together_keep_the_accounts_limits(
    sim: Simulator, connection: AbstractRobustConnection, tmp_path: Path
) -> None:
    """A reconcile of 500 SIMs beside a 5/s backlog breaks no limit and ends within 60 s."""
    tag = f"jct-{uuid.uuid4().hex[:10]}"
    sim.add_account("nz", "nz-key", max_in_flight=1, requests_per_second=5)
    sims = {ic(1, n): "ACTIVATED" for n in range(500)}
    sim.add_sims(sims, account="nz")
    raw = raw_config(tag, [{"name": NZ, "server_address": sim.base_url, "username": "nz",
                            "api_key": "nz-key", "max_concurrency": 1,
                            "requests_per_second": 5}])
    settings = parse_settings(raw, {})
    clients = tmp_path / "clients.csv"
    clients.write_text("client_id,ref_no,communicator_type,commissioned\n"
                       + "".join(f"c{n},{ic(1, n)},{NZ},yes\n" for n in range(500)),
                       encoding="utf-8")
    service = Service(settings, Metrics(CollectorRegistry()), http_host="127.0.0.1")
    await service.start()
    channel = await connection.channel()
    try:
        broker = Broker(channel, settings)
        for n in range(400):  # a backlog of 80 s at 5/s, of SIMs that stay in agreement
            await broker.publish(make_event(ic(1, n), communicator_type=NZ, client_id=f"c{n}"))
        started = time.monotonic()
        out, err = io.StringIO(), io.StringIO()
        async with asyncio.timeout(90):
            status = await reconcile.run(settings, reconcile.Options(clients, format="json"),
                                         out, err)
        elapsed = time.monotonic() - started
    finally:
        await service.stop()
        await remove_topology(connection, settings)
        await channel.close()

    assert (status, json.loads(out.getvalue())) == (0, []), err.getvalue()
    assert "the service process that owns it makes the calls" in err.getvalue()
    print(f"reconcile of 500 SIMs beside a 400-event backlog at 5/s: {elapsed:.1f} s, "
          f"{sim.violations} violations")
    assert elapsed < 60
    assert sim.violations == 0


async def test_demo_reconcile_ends_with_only_what_fix_must_not_touch() -> None:
    """make demo-reconcile: its report, fix and second report end as its docstring says."""
    out = io.StringIO()

    problems = await demo_reconcile.run_demo(out, AMQP_URL)

    assert problems == []
    text = out.getvalue()
    assert text.count("$ jasper-consumer reconcile") == 3
    assert "published 2 event(s) with origin 'reconcile'" in text
