"""``make demo-reconcile``: ``jasper-consumer reconcile`` against the simulator, end to end.

Starts the Jasper simulator in this process with two accounts, writes a client list as
Patriot exports it (semicolons, a byte order mark, Patriot's captions) with one mismatch
of each kind, and declares the service's queues under a prefix of its own
(``demo-rec-<random>``, so a running ``make run`` is not disturbed). Then:

1. ``reconcile``: the report (MONITORED_NOT_LIVE, LIVE_NOT_MONITORED twice — one SIM a
   client has, one no client has —, UNKNOWN_SIM, INVALID_ICCID);
2. ``reconcile --fix --yes``: the two corrective events, published to the events exchange;
3. the service, started in this process, applies them; their signals are shown (the
   text ends with "(reconcile)");
4. ``reconcile`` again: only what ``--fix`` must not touch is left.

No service runs while reconcile does, so reconcile calls the simulator directly within
each type's limits (with a service running, the process that owns the type would make
the calls). Removes its queues and exchanges at the end. Exits 0 when every step ended
as expected.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import aio_pika
from prometheus_client import CollectorRegistry

from ...app import Service
from ...config import Settings, parse_settings
from ...metrics import Metrics
from ...simulator import Simulator
from ...topology import Names, declare, remove_topology
from .. import reconcile
from ..demo import AMQP_URL, SignalLog, play, table

NZ, AU = "M2MOne NZ", "M2MOne AU"
TOTAL_TIMEOUT_S = 60.0


def sim_id(n: int) -> str:
    return f"8961018500{n:010d}"


# Control Center: account -> ICCID -> status.
SIMS = {
    "patriot-nz": {sim_id(1): "ACTIVATED", sim_id(2): "DEACTIVATED", sim_id(3): "ACTIVATED",
                   sim_id(4): "ACTIVATED", sim_id(5): "DEACTIVATED"},
    "patriot-au": {sim_id(11): "ACTIVATED", sim_id(12): "DEACTIVATED"},
}
# Patriot's client list: Client No, Device Ref No, Communicator Type, Commissioned.
CLIENTS = [
    ("100234", sim_id(1), NZ, "Yes"),    # a base, commissioned ...
    ("100234-1", sim_id(1), NZ, "No"),   # ... and its linked area: they share the SIM
    ("100235", sim_id(2), NZ, "Yes"),    # MONITORED_NOT_LIVE: --fix activates
    ("100236", sim_id(3), NZ, "No"),     # LIVE_NOT_MONITORED: --fix deactivates
    ("100237", sim_id(99), NZ, "Yes"),   # UNKNOWN_SIM: the account has no such SIM
    ("100238", "8961 0185 00X", NZ, "Yes"),  # INVALID_ICCID
    ("100239", sim_id(5), NZ, "No"),     # decommissioned, SIM off: agrees
    ("200001", sim_id(11), AU, "Yes"),
    ("200002", sim_id(12), AU, "No"),
]
# sim_id(4) is ACTIVATED and no client has it: LIVE_NOT_MONITORED, left to the operator.
AFTER_FIX = [(sim_id(4), "LIVE_NOT_MONITORED"), (sim_id(99), "UNKNOWN_SIM"),
             ("8961 0185 00X", "INVALID_ICCID")]


def _settings(amqp_url: str, prefix: str, base_url: str) -> Settings:
    return parse_settings({
        "amqp_url": amqp_url, "queue_prefix": prefix, "http_port": 0,
        "events_exchange": f"{prefix}.events", "history_exchange": f"{prefix}.history",
        "shutdown_grace_seconds": 5,
        "communicator_types": [
            {"name": NZ, "server_address": base_url, "username": "patriot-nz",
             "api_key": "nz-demo-key", "requests_per_second": 5},
            {"name": AU, "server_address": base_url, "username": "patriot-au",
             "api_key": "au-demo-key", "requests_per_second": 5},
        ],
    }, env={})


def _client_list() -> bytes:
    lines = ["Client No;Device Ref No;Communicator Type;Commissioned"]
    lines += [";".join(row) for row in CLIENTS]
    return ("\ufeff" + "\r\n".join(lines) + "\r\n").encode()


async def _step(title: str, settings: Settings, options: reconcile.Options,
                out: TextIO) -> int:
    print(f"\n$ jasper-consumer {title}", file=out, flush=True)
    return await reconcile.run(settings, options, out, out)


async def run_demo(out: TextIO, amqp_url: str = AMQP_URL) -> list[str]:
    """Play the four steps; return what went differently from the module docstring."""
    prefix = f"demo-rec-{uuid.uuid4().hex[:8]}"
    problems: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        sim = Simulator()
        base_url = await sim.start()
        stack.push_async_callback(sim.stop)
        for account, sims in SIMS.items():
            sim.add_account(account, f"{account[8:]}-demo-key", requests_per_second=5)
            sim.add_sims(sims, account=account)
        settings = _settings(amqp_url, prefix, base_url)
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="jasper-rec-")))
        clients = work / "clients.csv"
        await asyncio.to_thread(clients.write_bytes, _client_list())

        connection = await aio_pika.connect(amqp_url)
        stack.push_async_callback(connection.close)
        stack.push_async_callback(remove_topology, connection, settings)
        channel = await connection.channel()
        await declare(channel, settings)
        print(f"Jasper simulator at {base_url}; queues {prefix}.*; the client list "
              f"({clients.name}, as Patriot exports it):", file=out)
        print(clients.read_text(encoding="utf-8-sig").rstrip(), file=out)

        first = await _step("reconcile", settings, reconcile.Options(clients), out)
        await _step("reconcile --fix --yes", settings,
                    reconcile.Options(clients, fix=True, yes=True), out)

        print("\nStarting the service to apply the published events …", file=out, flush=True)
        log = SignalLog()
        history = await channel.get_queue(Names.from_settings(settings).history_queue)
        await history.consume(log.on_message, no_ack=True)
        service = Service(settings, Metrics(CollectorRegistry()), http_host="127.0.0.1")
        stack.push_async_callback(service.stop)
        await service.start()
        await log.wait_count(2)
        # Stopped again, so that reconcile calls the simulator itself: the service's
        # process would otherwise be asked to make the calls (see tools/account.py).
        await service.stop()
        print("Signals in the client history:", file=out)
        print(table(log.signals), file=out)

        last = await _step("reconcile", settings, reconcile.Options(clients), out)
        quiet = io.StringIO()
        await reconcile.run(settings, reconcile.Options(clients, format="json"), quiet,
                            io.StringIO())
        left = [(m["iccid"], m["kind"]) for m in json.loads(quiet.getvalue())]

    if first != 1 or last != 1:
        problems.append(f"exit statuses {first} and {last}, expected 1 and 1")
    texts = [s["text"] for s in log.signals]
    if len(texts) != 2 or not all(t.endswith("(reconcile)") for t in texts):
        problems.append(f"expected two signals ending (reconcile), got {texts}")
    if sorted(left) != sorted(AFTER_FIX):
        problems.append(f"after --fix expected {AFTER_FIX}, got {left}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jasper_consumer.tools.reconcile.demo",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--amqp-url", default=AMQP_URL, help=f"RabbitMQ (default {AMQP_URL})")
    args = parser.parse_args(argv)
    logging.getLogger().addHandler(logging.NullHandler())
    for name in ("aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    problems = play(run_demo(sys.stdout, args.amqp_url), args.amqp_url, TOTAL_TIMEOUT_S)
    if problems is None:
        return 1
    print("\ndemo-reconcile: " + ("every step ended as expected" if not problems
                                  else "something went differently"), file=sys.stderr)
    return 1 if problems else 0

if __name__ == "__main__":
    sys.exit(main())
