"""The ``jasper-consumer`` command line (README, Commands)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import aio_pika

from . import log as jlog
from . import tools
from .broker import connect_once, publish_event
from .config import Command, Settings, load_settings
from .errors import BrokerUnavailable, ConfigError
from .events import new_event
from .tools import ToolError, check, deadletters, reconcile, replay
from .tools.progress import Progress
from .topology import Names

ENV_CONFIG = "JASPER_CONSUMER_CONFIG"


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=os.environ.get(ENV_CONFIG),
        help=f"YAML config file (default: ${ENV_CONFIG})")


def _load(path: str | None) -> Settings:
    if not path:
        raise ConfigError([f"no config file: pass --config FILE or set {ENV_CONFIG}"])
    settings = load_settings(path)
    problems = settings.file_problems()  # TLS files that cannot be used, before connecting
    if problems:
        raise ConfigError(problems)
    return settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jasper-consumer",
        description="Activates and deactivates SIMs in Cisco Jasper Control Center "
                    "for Patriot commission/decommission events.")
    sub = parser.add_subparsers(dest="cmd", required=True)

    run = sub.add_parser("run", help="run the service")
    _config_arg(run)
    run.add_argument("--log-level", default="INFO")

    check = sub.add_parser("check-config", help="validate the config; non-zero exit on problems")
    _config_arg(check)
    check.add_argument("--ping", action="store_true",
                       help="also connect to each RabbitMQ node (TLS verified) and call Echo "
                            "with each communicator type's credentials")

    pub = sub.add_parser("publish", help="publish one event, as a producer would")
    _config_arg(pub)
    pub.add_argument("--event", type=int, required=True, help="event code, e.g. 65516")
    pub.add_argument("--client-id", required=True)
    pub.add_argument("--iccid", required=True, help="the device's Device Ref No")
    pub.add_argument("--communicator-type", required=True)
    pub.add_argument("--command", choices=[c.value for c in Command])
    pub.add_argument("--event-id", help="default: a new UUID")
    pub.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                     help="wait up to SECONDS for the final signal and print it")

    status = sub.add_parser("sim-status", help="show a SIM's status from Get Device Details")
    _config_arg(status)
    status.add_argument("--communicator-type", required=True,
                        help="the communicator type whose account holds the SIM")
    status.add_argument("iccid", metavar="ICCID", help="the SIM's ICCID (the Device Ref No)")
    status.add_argument("--json", action="store_true", help="print Control Center's JSON")

    dead = sub.add_parser("dead-letters", help="inspect and replay dead-lettered messages")
    dead_sub = dead.add_subparsers(dest="dead_cmd", required=True)
    list_cmd = dead_sub.add_parser("list", help="a table of the dead letters, oldest first")
    replay_cmd = dead_sub.add_parser(
        "replay", help="re-queue dead-lettered events for processing (skips non-events)")
    for p in (list_cmd, replay_cmd):
        _config_arg(p)
        p.add_argument("--reason", metavar="TEXT",
                       help="only dead letters whose reason contains TEXT (any case)")
    list_cmd.add_argument("--limit", type=_positive_int, default=100, metavar="N",
                          help="show at most N (default 100)")
    list_cmd.add_argument("--json", action="store_true", help="one JSON object per dead letter")
    replay_cmd.add_argument("--limit", type=_positive_int, metavar="N",
                            help="replay at most N (default: all)")

    rec = sub.add_parser(
        "reconcile", help="compare every SIM of each account with the clients Patriot monitors",
        description="Lists every SIM of each communicator type's account (Search Devices) and "
                    "reports MONITORED_NOT_LIVE, LIVE_NOT_MONITORED, UNKNOWN_SIM and "
                    "INVALID_ICCID. Exit 0: all agree; 1: something reported or a row could "
                    "not be read; 2: an error.")
    _config_arg(rec)
    rec.add_argument("--clients", required=True, type=Path, metavar="FILE",
                     help="CSV export of Patriot's client list: client_id (Client No), ref_no "
                          "(Device Ref No), communicator_type, commissioned")
    rec.add_argument("--communicator-type", metavar="NAME", help="only this communicator type")
    rec.add_argument("--format", choices=reconcile.FORMATS, default="table",
                     help="the report on stdout (default: table)")
    rec.add_argument("--fix", action="store_true",
                     help="publish the events that correct MONITORED_NOT_LIVE and "
                          "LIVE_NOT_MONITORED of SIMs a client has (asks first)")
    rec.add_argument("--yes", action="store_true", help="with --fix: do not ask")

    sim = sub.add_parser("simulator", help="run a local Jasper Control Center stand-in")
    sim.add_argument("--port", type=int, default=8081)
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--config", default=os.environ.get(ENV_CONFIG),
                     help="create one account per communicator type of this config")
    sim.add_argument("--account", action="append", default=[], metavar="USER:KEY[:N[:RPS]]",
                     help="an account (repeatable): user name, API key, calls in flight, calls/s")
    sim.add_argument("--tls-cert", type=Path, metavar="FILE",
                     help="serve HTTPS with this certificate (PEM; with --tls-key)")
    sim.add_argument("--tls-key", type=Path, metavar="FILE",
                     help="the certificate's private key (PEM)")
    return parser


_TOOLS = frozenset({"check-config", "sim-status", "dead-letters", "reconcile"})


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd == "reconcile" and args.yes and not args.fix:
        parser.error("--yes goes with --fix")
    if args.cmd == "simulator" and (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    jlog.configure(getattr(args, "log_level", "INFO"))
    if args.cmd in _TOOLS:  # they say themselves what went wrong; no client library noise
        for name in ("aio_pika", "aiormq"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        if args.cmd == "run":
            return _run(args)
        if args.cmd == "publish":
            return asyncio.run(_publish(args))
        if args.cmd == "simulator":
            return _simulator(args)
        return asyncio.run(_tool(args, sys.stdout))
    except (ConfigError, ToolError) as exc:
        return _report(args, exc)
    except BrokerUnavailable as exc:  # a certificate that does not verify stops start-up
        print(f"jasper-consumer {args.cmd}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


async def run_tool(argv: Sequence[str], out: TextIO) -> int:
    """``check-config``, ``sim-status``, ``dead-letters`` or ``reconcile`` in the running
    event loop, as ``main`` runs them (for tests and embedding); output to ``out``."""
    args = build_parser().parse_args(argv)
    try:
        return await _tool(args, out)
    except (ConfigError, ToolError) as exc:
        return _report(args, exc)


def _report(args: argparse.Namespace, exc: ConfigError | ToolError) -> int:
    if isinstance(exc, ConfigError):
        print("configuration problems:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    print(f"jasper-consumer {args.cmd}: {exc}", file=sys.stderr)
    return tools.EXIT_FAILED


async def _tool(args: argparse.Namespace, out: TextIO) -> int:
    if args.cmd == "check-config":
        return await _check_config(args, out)
    if args.cmd == "sim-status":
        return await check.sim_status(
            _load(args.config), args.communicator_type, args.iccid, out, as_json=args.json)
    if args.cmd == "dead-letters" and args.dead_cmd == "list":
        return await _dead_letters_list(args, out)
    if args.cmd == "dead-letters" and args.dead_cmd == "replay":
        return await _dead_letters_replay(args, out)
    if args.cmd == "reconcile":
        options = reconcile.Options(args.clients, args.communicator_type, args.format,
                                    fix=args.fix, yes=args.yes)
        return await reconcile.run(_load(args.config), options, out, sys.stderr)
    raise AssertionError(args.cmd)  # pragma: no cover


def _run(args: argparse.Namespace) -> int:
    from .app import Service

    settings = _load(args.config)
    for ct in settings.communicator_types:
        ct.read_api_key()  # an unreadable api_key_file stops start-up, naming the file
    asyncio.run(Service(settings).run())
    return 0


async def _check_config(args: argparse.Namespace, out: TextIO) -> int:
    settings = _load(args.config)
    for ct in settings.communicator_types:
        ct.read_api_key()
    print(f"{args.config}: OK — {len(settings.communicator_types)} communicator type(s): "
          + ", ".join(repr(ct.name) for ct in settings.communicator_types), file=out)
    if not args.ping:
        return 0
    print("Echo with each communicator type's credentials:", file=out)
    try:
        echo_status = await check.ping(settings, out)
    except ToolError as exc:  # who owns a type is asked of the broker: none answers
        print(f"  not checked: {exc} (below)", file=out)
        echo_status = 1
    print("RabbitMQ, each node (TLS certificates verified):", file=out)
    return max(echo_status, await check.ping_broker(settings, out))


async def _dead_letters_list(args: argparse.Namespace, out: TextIO) -> int:
    listing = await deadletters.list_dead_letters(
        _load(args.config), reason=args.reason, limit=args.limit)
    if args.json:
        now = datetime.now(UTC)
        for letter in listing.letters:
            print(json.dumps(letter.as_dict(now)), file=out)
    else:
        deadletters.print_listing(listing, out, reason=args.reason, limit=args.limit)
    return 0


async def _dead_letters_replay(args: argparse.Namespace, out: TextIO) -> int:
    settings = _load(args.config)
    summary = replay.ReplaySummary(
        Names.from_settings(settings).dead_queue, settings.events_exchange)
    stop = asyncio.Event()
    with _first_ctrl_c_sets(stop):
        try:
            await replay.replay(settings, reason=args.reason, limit=args.limit,
                                progress=Progress(out, "replay"), summary=summary, stop=stop)
        except BaseException:  # the broker failed, or a second Ctrl-C: say what was done
            if summary.seen:
                replay.print_summary(summary, out, reason=args.reason, limit=args.limit)
            raise
    status = replay.print_summary(summary, out, reason=args.reason, limit=args.limit)
    return 130 if summary.interrupted else status


@contextlib.contextmanager
def _first_ctrl_c_sets(stop: asyncio.Event) -> Iterator[None]:
    """While inside, the first Ctrl-C sets ``stop``; the next one interrupts as usual."""
    loop = asyncio.get_running_loop()

    def first() -> None:
        print("\nstopping: replaying no more, handing the rest back in order "
              "(Ctrl-C again to abort at once)", file=sys.stderr)
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    try:
        loop.add_signal_handler(signal.SIGINT, first)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def _publish(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    event = new_event(args.event, args.client_id, args.iccid, args.communicator_type,
                      command=args.command, event_id=args.event_id)
    event_id = event["event_id"]
    connection = await connect_once(settings.amqp_urls)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.declare_exchange(
            settings.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        watch = None
        if args.wait > 0:
            history = await channel.declare_exchange(
                settings.history_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
            watch = await channel.declare_queue(exclusive=True, auto_delete=True)
            await watch.bind(history, "jasper.#")
        await publish_event(exchange, event)
        print(f"published event {event_id} ({args.event}) to {settings.events_exchange}")
        if watch is None:
            return 0
        try:
            async with asyncio.timeout(args.wait):
                async with watch.iterator() as messages:
                    async for message in messages:
                        await message.ack()
                        if message.correlation_id != event_id:
                            continue
                        signal = json.loads(message.body)
                        print(json.dumps(signal, indent=2))
                        if signal.get("outcome") in ("succeeded", "failed"):
                            return 0 if signal["outcome"] == "succeeded" else 1
        except TimeoutError:
            print(f"no final signal within {args.wait:g} s (is the service running?)",
                  file=sys.stderr)
            return 3
    return 3  # pragma: no cover


def _simulator(args: argparse.Namespace) -> int:
    from . import tls
    from .simulator import Account, accounts_from_settings, serve, server_context

    accounts = accounts_from_settings(_load(args.config)) if args.config else []
    for spec in args.account:
        parts = spec.split(":")
        if len(parts) < 2:
            raise ConfigError([f"--account {parts[0]!r}: expected USER:KEY[:N[:RPS]]"])
        accounts.append(Account(
            parts[0], parts[1],
            max_in_flight=int(parts[2]) if len(parts) > 2 else 1,
            requests_per_second=float(parts[3]) if len(parts) > 3 else 5.0))
    if not accounts:
        raise ConfigError(["simulator: give --config FILE or at least one --account"])
    tls_context = None
    if args.tls_cert is not None:
        problems = tls.file_problems("simulator", None, args.tls_cert, args.tls_key)
        if problems:
            raise ConfigError([p.replace("certfile", "--tls-cert").replace("keyfile", "--tls-key")
                               for p in problems])
        tls_context = server_context(args.tls_cert, args.tls_key)
    asyncio.run(serve(args.host, args.port, accounts, tls_context=tls_context))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
