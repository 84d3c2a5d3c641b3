"""Carrying out the plan's faults, and healing every one of them.

Each fault kind is one method: it injects, waits the planned duration, heals, and
records what it did as an :class:`~.invariants.Injected` (with the target it resolved at
run time: "the owner of Type B" is the process that called that account last). A fault
whose target is not there (every other replica already away, say) is recorded as skipped
with the reason. :meth:`Injector.heal_all` puts everything back — proxies, accounts, the
consumer timeout, stopped nodes — and says what it could not.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from tests.reliability.conftest import Simulator, caller_pid, reached, wait_until

from . import brokers
from .invariants import Injected
from .replicas import Replica
from .schedule import TYPES, Fault

SIGTERM_BOUND_S = 10 + 15  # the replicas' shutdown grace, plus a margin for a loaded host


class Injector:
    def __init__(self, broker: brokers.Broker, sim: Simulator, replicas: list[Replica],
                 http: aiohttp.ClientSession, prefix: str,
                 say: Callable[[str], None], started: float) -> None:
        self.broker = broker
        self.sim = sim
        self.replicas = replicas
        self.http = http
        self.prefix = prefix
        self.say = say
        self.started = started
        self.injected: list[Injected] = []
        self.sigterms: list[tuple[int, int, int | None]] = []
        self.not_ready: list[str] = []  # restarts that did not get ready in time
        self.keys = {tp.account: f"k{tp.account}" for tp in TYPES}
        self._timeout_lowered = False

    # -- running the plan ------------------------------------------------------------

    async def run(self, fault: Fault) -> None:
        await wait_until(reached(self.started + fault.at_s), f"the time of {fault.kind}",
                         fault.at_s + 60, 0.05)
        try:
            await getattr(self, fault.kind)(fault)
        except Exception as exc:  # recorded, and the soak goes on
            self._skip(fault, f"failed: {type(exc).__name__}: {exc}")

    def _record(self, kind: str, start: float, target: str, end: float | None = None) -> None:
        done = Injected(kind, start, time.monotonic() if end is None else end, target)
        self.injected.append(done)
        self.say(f"+{start - self.started:6.1f}s {kind:18} {target} "
                 f"({done.end - done.start:.1f} s)")

    def _skip(self, fault: Fault, why: str) -> None:
        now = time.monotonic()
        self.injected.append(Injected(fault.kind, now, now, fault.describe(), skipped=why))
        self.say(f"+{now - self.started:6.1f}s {fault.kind:18} skipped: {why}")

    async def _hold(self, seconds: float) -> None:
        await wait_until(reached(time.monotonic() + seconds), "the end of the fault",
                         seconds + 30, 0.05)

    async def owner_of(self, type_name: str) -> Replica | None:
        """The replica that called the type's account last (in the last 10 s)."""
        account = next(tp.account for tp in TYPES if tp.name == type_name)
        records = await self.sim._req("GET", f"/requests?since={time.monotonic() - 10}")
        for record in reversed(records):
            if record["account"] == account:
                pid = caller_pid(record["user_agent"])
                return next((r for r in self.replicas if r.pid == pid), None)
        return None

    async def _pick(self, fault: Fault, *, away: bool) -> Replica | None:
        """The fault's replica: the owner it names if free, else the planned one, else any
        free one; None if none is free, or (``away``) if it would leave none running."""
        up = [r for r in self.replicas if r.alive and not r.busy]
        if away and len([r for r in self.replicas if r.alive and not r.busy]) <= 1:
            return None
        candidates: list[Replica | None] = []
        if fault.owner_of:
            candidates.append(await self.owner_of(fault.owner_of))
        if fault.replica is not None:
            candidates.append(self.replicas[fault.replica])
        candidates += up
        return next((r for r in candidates if r is not None and r in up), None)

    async def _restart(self, replica: Replica, after_s: float) -> None:
        await self._hold(after_s)
        await restart(replica, self.http, self.not_ready, self.started)



    # -- replica faults --------------------------------------------------------------

    async def kill9(self, fault: Fault) -> None:
        replica = await self._pick(fault, away=True)
        if replica is None:
            return self._skip(fault, "no other replica running")
        replica.busy = True
        pid = replica.pid
        replica.kill9()
        now = time.monotonic()
        self._record("kill9", now, f"replica {replica.index} pid {pid}", now)
        await replica.wait_exit()
        await self._restart(replica, fault.duration_s)

    async def sigterm(self, fault: Fault) -> None:
        replica = await self._pick(fault, away=True)
        if replica is None:
            return self._skip(fault, "no other replica running")
        replica.busy = True
        pid = replica.pid
        assert pid is not None
        start = time.monotonic()
        code = await replica.sigterm(SIGTERM_BOUND_S)
        self.sigterms.append((replica.index, pid, code))
        self._record("sigterm", start, f"replica {replica.index} pid {pid} exit {code}")
        await self._restart(replica, fault.duration_s)

    async def _partition(self, fault: Fault, mode: str) -> None:
        replica = await self._pick(fault, away=mode == "blackhole")
        if replica is None:
            return self._skip(fault, "no other replica running")
        replica.busy = True
        start = time.monotonic()
        try:
            for proxy in replica.proxies:
                proxy.set_mode(mode)
            await self._hold(fault.duration_s)
        finally:
            for proxy in replica.proxies:
                proxy.set_mode("pass")
            replica.busy = False
        self._record(mode, start, f"replica {replica.index} pid {replica.pid}")

    async def blackhole(self, fault: Fault) -> None:
        await self._partition(fault, "blackhole")

    async def reset(self, fault: Fault) -> None:
        await self._partition(fault, "reset")

    async def close_connections(self, fault: Fault) -> None:
        ports: set[int] | None = None
        target = "every replica"
        if fault.replica is not None:
            replica = await self._pick(fault, away=False)
            if replica is None:
                return self._skip(fault, "no replica free")
            ports = set().union(*(p.upstream_ports() for p in replica.proxies))
            target = f"replica {replica.index} pid {replica.pid}"
        start = time.monotonic()
        closed = await brokers.close_connections(self.broker, self.prefix, ports)
        self._record("close_connections", start, f"{target}: {closed} closed")

    # -- broker faults ---------------------------------------------------------------

    async def stop_app(self, fault: Fault) -> None:
        index = self.broker.stoppable[(fault.node or 0) % len(self.broker.stoppable)]
        start = time.monotonic()
        node = await brokers.stop_app(self.broker, index)
        try:
            await self._hold(fault.duration_s)
        finally:
            await brokers.start_app(node)
        self._record("stop_app", start, node.label)

    async def consumer_timeout(self, fault: Fault) -> None:
        account = fault.account or "a"
        start = time.monotonic()
        self._timeout_lowered = True
        try:
            await brokers.lower_consumer_timeout(self.broker, int(fault.params["timeout_ms"]))
            # new channels take the low timeout: make the replicas open new ones
            await brokers.close_connections(self.broker, self.prefix, None)
            await self.sim.account(account, latency_s=float(fault.params["latency_s"]))
            await self._hold(fault.duration_s)
        finally:
            await self.sim.account(account, latency_s=0.0)
            await brokers.restore_consumer_timeout(self.broker)
            self._timeout_lowered = False
            # and channels with the restored timeout again
            await brokers.close_connections(self.broker, self.prefix, None)
        self._record("consumer_timeout", start,
                     f"{fault.params['timeout_ms']} ms, account {account} slow")

    # -- account faults --------------------------------------------------------------

    async def _account(self, fault: Fault, on: dict[str, Any], off: dict[str, Any],
                       what: str) -> None:
        account = fault.account or "a"
        start = time.monotonic()
        try:
            await self.sim.account(account, **on)
            await self._hold(fault.duration_s)
        finally:
            await self.sim.account(account, **off)
        self._record(fault.kind, start, f"account {account}: {what}")

    async def api_5xx_storm(self, fault: Fault) -> None:
        p = fault.params
        await self._account(
            fault, {"fail_every": p["fail_every"], "fail_http_status": p["http_status"],
                    "fail_code": p["code"], "fail_html": p["html"]},
            {"fail_every": 0}, f"every {p['fail_every']}. call {p['http_status']}")

    async def rate_limited(self, fault: Fault) -> None:
        every = fault.params["fail_every"]
        await self._account(
            fault, {"fail_every": every, "fail_http_status": 429, "fail_code": "40000029",
                    "fail_html": False},
            {"fail_every": 0}, f"every {every}. call 429 40000029")

    async def api_hang(self, fault: Fault) -> None:
        await self._account(fault, {"latency_s": fault.params["latency_s"]},
                            {"latency_s": 0.0}, f"calls held {fault.params['latency_s']} s")

    async def wrong_key(self, fault: Fault) -> None:
        account = fault.account or "a"
        await self._account(fault, {"api_key": f"rotated-{account}"},
                            {"api_key": self.keys[account]}, "key rejected, then fixed")

    async def account_down(self, fault: Fault) -> None:
        mode = fault.params["mode"]
        await self._account(fault, {"down": mode}, {"down": None}, f"down ({mode}), then up")

    async def poison(self, fault: Fault) -> None:
        now = time.monotonic()  # the publisher sends the message itself, at this time
        self._record("poison", now, str(fault.params["message"]), now)

    # -- healing ---------------------------------------------------------------------

    async def heal_all(self) -> list[str]:
        """Every fault undone; what could not be restored, in words (empty: all was)."""
        problems: list[str] = []
        for replica in self.replicas:
            for proxy in replica.proxies:
                proxy.set_mode("pass")
        for tp in TYPES:
            try:
                await self.sim.account(tp.account, api_key=self.keys[tp.account], down=None,
                                       latency_s=0.0, fail_every=0)
            except Exception as exc:
                problems.append(f"account {tp.account} not restored: {exc}")
        for node in self.broker.nodes:
            if node.stopped:
                try:
                    await brokers.start_app(node)
                except Exception as exc:
                    problems.append(f"{node.label} not started again: {exc}")
        with contextlib.suppress(Exception):
            await brokers.restore_consumer_timeout(self.broker)
        try:
            if not await brokers.consumer_timeout_restored(self.broker):
                problems.append("consumer_timeout / channel_tick_interval not restored")
        except Exception as exc:
            problems.append(f"consumer timeout not checked: {exc}")
        return problems


async def restart(replica: Replica, http: aiohttp.ClientSession, not_ready: list[str],
                  started: float) -> None:
    """Start the replica again and wait for it to be ready; note it if it is not."""
    replica.start()
    try:
        await replica.wait_ready(http)
    except AssertionError as exc:
        _, why = await replica.probe(http)
        not_ready.append(f"replica {replica.index} pid {replica.pid} restarted at "
                         f"+{time.monotonic() - started:.1f}s: {exc} (/readyz: {why})")
    finally:
        replica.busy = False


async def gather_faults(injector: Injector, faults: list[Fault]) -> None:
    """Run every planned fault at its time (concurrently: faults overlap)."""
    await asyncio.gather(*(injector.run(f) for f in faults))
