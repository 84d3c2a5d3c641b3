"""The first call after a first start, a clean hand-over and a crash (issue 15).

Operator guide, section 13, One owner per communicator type: a new owner calls at once on a
first start ever and after a clean hand-over (SIGTERM: its first call within 1 s of becoming
the owner); only after a crash does it wait one call interval plus the request timeout
(11 s at the defaults), since the previous owner's last request may still be open.

One type at 1 call/s, one call at a time, the default request timeout (10 s); the service's
processes are started here as replicas of one config. Who made a call is read from the
simulator's request log (the ``User-Agent`` names the caller's pid; ``started`` and
``finished`` are ``time.monotonic()``, one clock for every process on the host). When a
replica took the type over, and which case it saw, comes from its own log line ``took over
<type> (first owner | clean hand-over | waiting 11.0 s: … did not let go cleanly …)``, whose
wall-clock ``ts`` (ms) is turned into the bench's monotonic clock.

* **first start**: a fresh prefix, one commission waiting, one replica started: from its
  spawn to its first call on the simulator, and to the commission's final signal on
  ``<prefix>.history``; from its ``took over`` to that first call.
* **clean hand-over**: commissions waiting (the owner calls once a second); a chain of
  replicas, each started as a standby (its consumer on the work queue) before the owner
  is sent SIGTERM: from the old owner's exit, and from the end of its last call, to the new
  owner's first call.
* **crash**: every call of the account is held ``SLOW_S`` by the simulator; the owner is
  killed (SIGKILL) while one of its calls is open, its standby becomes the owner: from the
  killed call's start (and from the kill) to the new owner's first call, which must not
  come before that start + the request timeout + one interval. The next round's standby
  is started during that wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aio_pika.abc import AbstractRobustConnection

from . import common as c

TAKEN = "Bench Takeover"
RPS = 1.0
TIMEOUT_S = 10.0  # the default request_timeout_seconds
SLOW_S = 5.0  # the crash rounds: every call held this long (under the request timeout)
HANDOVER_TARGET_S = 1.0  # a clean hand-over's (and a first start's) first call
CRASH_MIN_S = TIMEOUT_S + 1 / RPS  # a crash: no call before the open one's start + this
_FINAL = ("succeeded", "failed")


def caller_pid(user_agent: str | None) -> int | None:
    """The pid in the service's ``jasper-consumer/<version> (<host> pid <pid>)``."""
    match = re.search(r"\bpid (\d+)\)", user_agent or "")
    return int(match.group(1)) if match else None


def _calls_of(records: list[dict[str, Any]], pid: int) -> list[dict[str, Any]]:
    return sorted((r for r in records if caller_pid(r["user_agent"]) == pid),
                  key=lambda r: r["started"])


def took_over(proc: c.Proc) -> list[dict[str, Any]]:
    """The replica's ``took over`` log lines: when (bench's monotonic clock), which case."""
    offset = time.time() - time.monotonic()
    out = []
    try:
        lines = proc.stderr_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        if not line.startswith("{") or '"took over ' not in line:
            continue
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            msg = str(rec.get("msg", ""))
            kind = ("crash" if "did not let go" in msg else "first owner"
                    if "first owner" in msg else "clean" if "clean hand-over" in msg
                    else "other")
            out.append({"at": datetime.fromisoformat(rec["ts"]).timestamp() - offset,
                        "kind": kind, "wait_s": rec.get("wait_s"), "msg": msg})
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((c.HOST, 0))
        return int(s.getsockname()[1])


class _Replicas:
    """Replicas of one service config, each ``jasper-consumer run`` in its own process with
    its own HTTP port (``/readyz``)."""

    def __init__(self, raw: dict[str, Any], session: aiohttp.ClientSession) -> None:
        self.raw = raw
        self.session = session
        self.procs: list[c.Proc] = []
        self.ports: dict[int, int] = {}  # pid → HTTP port
        self.configs: list[Path] = []

    def start(self) -> tuple[c.Proc, float]:
        port = _free_port()
        fd, path = tempfile.mkstemp(prefix="jcbench-", suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump({**self.raw, "http_port": port}, f)
        self.configs.append(Path(path))
        spawned = time.monotonic()
        proc = c.spawn("service", ["-m", "jasper_consumer", "run", "--config", path,
                                   "--log-level", "INFO"])
        self.procs.append(proc)
        self.ports[proc.pid] = port
        return proc, spawned

    async def ready(self, proc: c.Proc, timeout_s: float = 40.0) -> None:
        """Until ``proc``'s ``/readyz`` answers 200 (connected, every consumer registered:
        beside an owner, a standby)."""
        url = f"http://{c.HOST}:{self.ports[proc.pid]}/readyz"

        async def up() -> bool:
            proc.check()
            try:
                async with self.session.get(url) as resp:
                    return resp.status == 200
            except (aiohttp.ClientError, OSError):
                return False

        await c.wait_until(up, f"pid {proc.pid} to be ready", timeout_s, 0.05)

    async def close(self) -> None:
        for proc in self.procs:
            await proc.stop()
        for path in self.configs:
            path.unlink(missing_ok=True)


@contextlib.asynccontextmanager
async def _setting(conn: AbstractRobustConnection, sim: c.Sim, *, waiting: int, series: int,
                   latency_s: float = 0.0) -> AsyncIterator[tuple[c.Topo, _Replicas, c.Drain]]:
    """A fresh prefix with ``waiting`` commissions on ``<prefix>.events``, its replicas and
    a reader of its final signals; everything removed on exit."""
    topo = c.Topo()
    await sim.reset()
    await sim.account(c.account_name(TAKEN), max_in_flight=1, rps=RPS, latency_s=latency_s)
    raw = topo.config([c.comm_type(TAKEN, sim.base_url, max_concurrency=1, rps=RPS,
                                   request_timeout_s=TIMEOUT_S)])
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(c.delete_topology, conn, topo, [TAKEN])
        channel = await conn.channel()
        await c.declare_service_topology(channel, raw)
        await channel.close()
        drain = c.Drain(conn, topo.history_queue, parse=True,
                        accept=lambda s: s.get("outcome") in _FINAL)
        await drain.start()
        stack.push_async_callback(drain.close)
        await c.preload(conn, [c.event_bytes(n, TAKEN, series) for n in range(waiting)],
                        exchange=topo.events_exchange, routing_key=f"event.{c.EVENT_CODE}")
        replicas = _Replicas(raw, sim.session)
        stack.push_async_callback(replicas.close)
        yield topo, replicas, drain


async def _first_call(sim: c.Sim, proc: c.Proc, since: float,
                      timeout_s: float = 40.0) -> dict[str, Any]:
    """The simulator's record of ``proc``'s first call that started at or after ``since``."""
    found: list[dict[str, Any]] = []

    async def called() -> bool:
        proc.check()
        found[:] = _calls_of(await sim.requests(since=since), proc.pid)
        return bool(found)

    await c.wait_until(called, f"a first call from pid {proc.pid}", timeout_s, 0.02)
    return found[0]


async def _exit(proc: c.Proc, sig: int) -> float:
    """Send ``sig``; when the process had exited (bench's monotonic clock)."""
    proc.popen.send_signal(sig)
    await asyncio.to_thread(proc.popen.wait, 60)
    return time.monotonic()


def _last(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return entries[-1] if entries else {"at": float("nan"), "kind": "not logged",
                                        "wait_s": None}


async def first_start_round(conn: AbstractRobustConnection, sim: c.Sim) -> dict[str, Any]:
    async with _setting(conn, sim, waiting=1, series=8) as (_, replicas, drain):
        proc, spawned = replicas.start()
        call = await _first_call(sim, proc, spawned)
        await drain.wait_count(1, 30)
        took = _last(took_over(proc))
    return {"spawn_to_first_call_s": call["started"] - spawned,
            "spawn_to_final_signal_s": drain.bodies[0]["_received"] - spawned,
            "took_over_to_first_call_s": call["started"] - took["at"],
            "kind": took["kind"], "wait_s": took["wait_s"]}


async def clean_rounds(conn: AbstractRobustConnection, sim: c.Sim,
                       rounds: int) -> list[dict[str, Any]]:
    """A chain: owner, standby; SIGTERM the owner; the standby owns; a new standby; …"""
    out = []
    async with _setting(conn, sim, waiting=20 + 10 * rounds, series=9) as (_, replicas, _):
        owner, spawned = replicas.start()
        await _first_call(sim, owner, spawned)
        for _ in range(rounds):
            standby, _at = replicas.start()
            await replicas.ready(standby)
            await c.sleep_checked(owner, 1.5)  # the owner at work, a call or two on
            asked = time.monotonic()
            exited = await _exit(owner, signal.SIGTERM)
            first = await _first_call(sim, standby, asked - 5)
            records = await sim.requests(since=asked - 30)
            old = _calls_of(records, owner.pid)
            took = _last(took_over(standby))
            out.append({
                "sigterm_to_exit_s": exited - asked,
                "exit_to_first_call_s": first["started"] - exited,
                "last_call_end_to_first_call_s": first["started"] - old[-1]["finished"],
                "last_call_start_to_first_call_s": first["started"] - old[-1]["started"],
                "took_over_to_first_call_s": first["started"] - took["at"],
                "overlap": any(r["started"] >= first["started"] for r in old),
                "exit_code": owner.popen.returncode,
                "kind": took["kind"], "wait_s": took["wait_s"]})
            c.log(f"takeover: clean hand-over: exit {out[-1]['sigterm_to_exit_s']:.2f} s after "
                  f"SIGTERM, new owner's first call {out[-1]['exit_to_first_call_s']:.3f} s "
                  f"after it ({out[-1]['last_call_end_to_first_call_s']:.3f} s after the old "
                  f"one's last call ended; {took['kind']})")
            owner = standby
        violations = (await sim.stats())["violations"]
    for r in out:
        r["violations"] = violations
    return out


async def crash_rounds(conn: AbstractRobustConnection, sim: c.Sim,
                       rounds: int) -> list[dict[str, Any]]:
    """A chain: owner, standby; kill -9 the owner during a slow call; the standby owns
    after its wait (meanwhile the next standby starts); …"""
    out = []
    async with _setting(conn, sim, waiting=10 + 5 * rounds, series=10,
                        latency_s=SLOW_S) as (_, replicas, _):
        owner, spawned = replicas.start()
        await _first_call(sim, owner, spawned)
        standby, _at = replicas.start()
        await replicas.ready(standby)
        for i in range(rounds):
            open_call: list[dict[str, Any]] = []

            async def call_open(proc: c.Proc = owner, into: list[dict[str, Any]] = open_call
                                ) -> bool:
                now = time.monotonic()
                into[:] = [r for r in _calls_of(await sim.requests(since=now - 30), proc.pid)
                           if r["finished"] == 0 and r["started"] <= now - 0.3]
                return bool(into)

            await c.wait_until(call_open, "an open call of the owner", 30, 0.02)
            killed = await _exit(owner, signal.SIGKILL)
            following = replicas.start()[0] if i < rounds - 1 else None
            first = await _first_call(sim, standby, killed - 1)
            took = _last(took_over(standby))
            gap = first["started"] - open_call[0]["started"]
            out.append({
                "open_call_age_at_kill_s": killed - open_call[0]["started"],
                "open_call_start_to_first_call_s": gap,
                "kill_to_first_call_s": first["started"] - killed,
                "took_over_to_first_call_s": first["started"] - took["at"],
                "kill_to_took_over_s": took["at"] - killed,
                "kind": took["kind"], "wait_s": took["wait_s"]})
            c.log(f"takeover: crash: new owner's first call {gap:.2f} s after the killed "
                  f"call's start ({out[-1]['kill_to_first_call_s']:.2f} s after the kill; "
                  f"{took['kind']}, wait {took['wait_s']} s)")
            owner = standby
            if following is not None:
                standby = following
                await replicas.ready(standby)
    return out


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in runs[0].items() if isinstance(v, float)] if runs else []
    out: dict[str, Any] = {"runs": runs}
    for k in keys:
        values = [r[k] for r in runs]
        out[f"{k}_median"] = c.median(values)
        out[f"{k}_min"] = min(values)
        out[f"{k}_max"] = max(values)
    out["kinds"] = sorted({str(r["kind"]) for r in runs})
    return out


def _each(values: Iterator[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


async def run_takeover(conn: AbstractRobustConnection, sim: c.Sim, *,
                       rounds: int) -> dict[str, Any]:
    firsts = []
    for _ in range(rounds):
        firsts.append(await first_start_round(conn, sim))
        c.log(f"takeover: first start: first call {firsts[-1]['spawn_to_first_call_s']:.2f} s "
              f"after the spawn ({firsts[-1]['took_over_to_first_call_s']:.3f} s after "
              f"'took over', {firsts[-1]['kind']}), final signal "
              f"{firsts[-1]['spawn_to_final_signal_s']:.2f} s")
    clean = await clean_rounds(conn, sim, rounds)
    crash = await crash_rounds(conn, sim, rounds)
    out = {"rps": RPS, "request_timeout_s": TIMEOUT_S, "slow_s": SLOW_S, "rounds": rounds,
           "handover_target_s": HANDOVER_TARGET_S, "crash_min_s": CRASH_MIN_S,
           "first_start": _summary(firsts), "clean": _summary(clean), "crash": _summary(crash)}
    c.log("takeover: exit → first call after SIGTERM: "
          + _each(r["exit_to_first_call_s"] for r in clean)
          + " s; killed call's start → first call after a crash: "
          + _each(r["open_call_start_to_first_call_s"] for r in crash) + " s")
    return out
