"""``make demo``: the service end to end against the simulator, shown as a table of signals.

Starts the Jasper simulator and the service in this process, with a queue prefix and
exchanges of their own (``demo-<random>``, so a running ``make run`` is not disturbed),
publishes the scenarios below as a producer would, reads the signals from the history
queue and prints them; then removes its queues and exchanges.

1. a commission: the client's SIM becomes ACTIVATED;
2. the decommission of that client: the SIM becomes DEACTIVATED;
3. an ICCID Control Center does not know: ``20000001``;
4. a device without a Device Ref No: ``MISSING_ICCID``, no API call;
5. a communicator type whose API key file holds a wrong key: the type pauses and the
   event gets a ``delayed`` signal; the right key is written to the file, the service's
   Echo probe passes and the event succeeds.

Exits 0 when every scenario ended as expected. ``python -m jasper_consumer.tools.demo --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from prometheus_client import CollectorRegistry

from ..app import Service
from ..broker import publish_event
from ..config import Settings, parse_settings, redact_url
from ..events import new_event
from ..metrics import Metrics
from ..simulator import Simulator
from ..topology import Names, remove_topology
from .tables import render_table

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
STEP_TIMEOUT_S = 20.0
TOTAL_TIMEOUT_S = 55.0
FINAL = frozenset({"succeeded", "failed"})
_EVENT_NAMES = {65516: "commission", 65517: "decommission"}


@dataclass(frozen=True)
class Scenario:
    title: str
    event_code: int
    client_id: str
    ref_no: str
    communicator_type: str
    expected: tuple[tuple[str, str | None], ...]  # (outcome, error code) of each signal


NZ, AU = "M2MOne NZ", "M2MOne AU"
SIM_A = "8961 0185 0023 4567 8901"  # typed with spaces, as operators do
SCENARIOS = (
    Scenario("Commission client 100234", 65516, "100234", SIM_A, NZ,
             (("succeeded", None),)),
    Scenario("Decommission client 100234", 65517, "100234", SIM_A, NZ,
             (("succeeded", None),)),
    Scenario("Commission client 100235, an ICCID Control Center does not know", 65516,
             "100235", "89990000000000000001", NZ, (("failed", "20000001"),)),
    Scenario("Commission client 100236, whose device has no Device Ref No", 65516,
             "100236", "", NZ, (("failed", "MISSING_ICCID"),)),
    Scenario(f"Commission client 100237 via {AU}, whose API key file holds a wrong key",
             65516, "100237", "89610185009876543210", AU,
             (("delayed", "10000001"), ("succeeded", None))),
)


class SignalLog:
    """The signals read from the history queue, and a bounded wait for one."""

    def __init__(self) -> None:
        self.signals: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        async with self._changed:
            self.signals.append(json.loads(message.body))
            self._changed.notify_all()

    def of(self, event_id: str) -> list[dict[str, Any]]:
        return [s for s in self.signals if s.get("event_id") == event_id]

    async def wait(self, event_id: str, outcomes: frozenset[str]) -> dict[str, Any]:
        """The first signal of ``event_id`` whose outcome is in ``outcomes``."""

        def found() -> dict[str, Any] | None:
            return next((s for s in self.of(event_id) if s.get("outcome") in outcomes), None)

        try:
            async with asyncio.timeout(STEP_TIMEOUT_S), self._changed:
                await self._changed.wait_for(lambda: found() is not None)
        except TimeoutError:
            raise DemoFailed(f"no {'/'.join(sorted(outcomes))} signal for event {event_id} "
                             f"within {STEP_TIMEOUT_S:g} s") from None
        signal = found()
        assert signal is not None
        return signal


    async def wait_count(self, count: int) -> None:
        """Until ``count`` signals have come, whichever they are."""
        try:
            async with asyncio.timeout(STEP_TIMEOUT_S), self._changed:
                await self._changed.wait_for(lambda: len(self.signals) >= count)
        except TimeoutError:
            raise DemoFailed(f"{len(self.signals)} of {count} signals within "
                             f"{STEP_TIMEOUT_S:g} s") from None


class DemoFailed(Exception):
    """A scenario did not end as it should."""


def _settings(amqp_url: str, prefix: str, base_url: str, key_file: Path) -> Settings:
    return parse_settings({
        "amqp_url": amqp_url,
        "events_exchange": f"{prefix}.events",
        "history_exchange": f"{prefix}.history",
        "queue_prefix": prefix,
        "http_port": 0,
        "retry": {"max_attempts": 3, "initial_delay_seconds": 0.2, "max_delay_seconds": 1,
                  "max_elapsed_seconds": 5},
        "shutdown_grace_seconds": 5,
        "communicator_types": [
            {"name": NZ, "server_address": base_url, "username": "patriot-nz",
             "api_key": "nz-demo-key", "requests_per_second": 5},
            {"name": AU, "server_address": base_url, "username": "patriot-au",
             "api_key_file": str(key_file), "requests_per_second": 5},
        ],
    }, env={})


async def _publish(channel: AbstractChannel, settings: Settings, scenario: Scenario) -> str:
    event = new_event(scenario.event_code, scenario.client_id, scenario.ref_no,
                      scenario.communicator_type)
    await publish_event(await channel.get_exchange(settings.events_exchange, ensure=False),
                        event)
    return str(event["event_id"])


def _said(signal: dict[str, Any]) -> str:
    error = signal.get("error") or {}
    return f"{signal['outcome']} ({error['code']})" if error else str(signal["outcome"])


async def _play(scenario: Scenario, channel: AbstractChannel, settings: Settings,
                log: SignalLog, key_file: Path, right_key: str, out: TextIO) -> list[str]:
    """Publish one scenario, wait for its signals; return what went differently."""
    print(f"{scenario.title} …", end=" ", file=out, flush=True)
    event_id = await _publish(channel, settings, scenario)
    first = await log.wait(event_id, FINAL | {"delayed"})
    print(_said(first), file=out, flush=True)
    if first["outcome"] == "delayed":
        await asyncio.to_thread(key_file.write_text, right_key + "\n", encoding="utf-8")
        fixed = time.monotonic()
        print(f"  the right key is written to {key_file.name}; waiting for the service's "
              "Echo probe to resume the type …", end=" ", file=out, flush=True)
        final = await log.wait(event_id, FINAL)
        print(f"{_said(final)} after {time.monotonic() - fixed:.1f} s", file=out, flush=True)
    got = [(s["outcome"], (s.get("error") or {}).get("code")) for s in log.of(event_id)]
    return [] if tuple(got) == scenario.expected else [
        f"{scenario.title}: expected {list(scenario.expected)}, got {got}"]


def table(signals: Sequence[dict[str, Any]]) -> str:
    """The signals as the demo prints them: event, client, ICCID, outcome, code, text."""
    rows = []
    for s in signals:
        code = s.get("event_code")
        event = f"{code} {_EVENT_NAMES.get(code, '')}".strip() if code else "-"
        error = s.get("error") or {}
        rows.append([event, s.get("client_id") or "-", s.get("iccid") or "-",
                     s.get("outcome", "-"), error.get("code", "-"), s.get("text", "")])
    return render_table(["EVENT", "CLIENT", "ICCID", "OUTCOME", "CODE", "TEXT"], rows)


async def run_demo(out: TextIO, amqp_url: str = AMQP_URL) -> tuple[list[str], list[dict[str, Any]]]:
    """Play every scenario; return (what went differently, the signals in arrival order)."""
    prefix = f"demo-{uuid.uuid4().hex[:8]}"
    right_key = "au-demo-key"
    problems: list[str] = []
    log = SignalLog()
    async with contextlib.AsyncExitStack() as stack:  # undone in reverse, whatever happens
        sim = Simulator()
        base_url = await sim.start()
        stack.push_async_callback(sim.stop)
        sim.add_account("patriot-nz", "nz-demo-key", requests_per_second=5)
        sim.add_account("patriot-au", right_key, requests_per_second=5)
        key_file = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="jasper-demo-")))
        key_file = key_file / "m2mone-au-api-key"
        await asyncio.to_thread(key_file.write_text, "a-wrong-key\n", encoding="utf-8")
        settings = _settings(amqp_url, prefix, base_url, key_file)

        connection = await aio_pika.connect(amqp_url)
        stack.push_async_callback(connection.close)
        stack.push_async_callback(remove_topology, connection, settings)
        service = Service(settings, Metrics(CollectorRegistry()), http_host="127.0.0.1")
        stack.push_async_callback(service.stop)
        print(f"Jasper simulator at {base_url}; service on queues {prefix}.*", file=out)
        await service.start()

        channel = await connection.channel(publisher_confirms=True)
        history = await channel.get_queue(Names.from_settings(settings).history_queue)
        await history.consume(log.on_message, no_ack=True)
        async with asyncio.timeout(TOTAL_TIMEOUT_S):
            for n, scenario in enumerate(SCENARIOS, 1):
                print(f"{n}. ", end="", file=out)
                problems += await _play(scenario, channel, settings, log, key_file, right_key,
                                        out)
    print(f"\nSignals in the client history (queue {prefix}.history):", file=out)
    print(table(log.signals), file=out)
    return problems, log.signals


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jasper_consumer.tools.demo",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--amqp-url", default=AMQP_URL, help=f"RabbitMQ (default {AMQP_URL})")
    parser.add_argument("--verbose", action="store_true", help="also print the service's logs")
    args = parser.parse_args(argv)
    if args.verbose:
        from .. import log as jlog

        jlog.configure("INFO")
    else:
        logging.getLogger().addHandler(logging.NullHandler())
    problems = play(_problems(run_demo(sys.stdout, args.amqp_url)), args.amqp_url,
                    TOTAL_TIMEOUT_S)
    return 1 if problems is None or problems else 0


async def _problems(demo: Awaitable[tuple[list[str], Any]]) -> list[str]:
    return (await demo)[0]


def play(demo: Coroutine[Any, Any, list[str]], amqp_url: str,
         timeout_s: float) -> list[str] | None:
    """Run a demo to its end (at most ``timeout_s``) and print what went unexpectedly; None
    (said on stderr) when it could not run at all (RabbitMQ away, a step failed, too slow)."""
    try:
        problems = asyncio.run(asyncio.wait_for(demo, timeout_s))
    except (DemoFailed, TimeoutError) as exc:
        print(f"\ndemo failed: {exc or f'it took longer than {timeout_s:g} s'}",
              file=sys.stderr)
        return None
    except (OSError, aio_pika.exceptions.AMQPConnectionError) as exc:
        print(f"\ndemo failed: cannot reach RabbitMQ at {redact_url(amqp_url)}: {exc!r}",
              file=sys.stderr)
        return None
    for problem in problems:
        print(f"unexpected: {problem}", file=sys.stderr)
    return problems

if __name__ == "__main__":
    sys.exit(main())
