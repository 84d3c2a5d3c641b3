"""Operator tools: check each communicator type's settings, look up a SIM.

* :func:`ping_broker` and :func:`ping` (``check-config --ping``) connect to every RabbitMQ
  node (TLS verified) and call Echo for every communicator type, and print, per node and
  per type, OK or what is wrong in an operator's words (:func:`explain`);
* :func:`sim_status` (``sim-status``) shows a SIM's status and main fields from Get
  Device Details, as a table or as JSON.

Both call as :mod:`.account` decides, call by call: through the service process that owns
the type while one runs, else themselves, within the type's limits.

The dead-letter tools are in :mod:`.deadletters`. Each tool writes to the stream it is
given and returns the process exit status (:data:`EXIT_OK`, :data:`EXIT_FAILED`); a
problem that stops it from doing its job at all raises :class:`ToolError`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from .. import errors
from ..broker import connect_once
from ..config import CommunicatorType, Settings
from ..errors import ConfigError, EventRejected, JasperError
from ..events import normalise_iccid
from ..urls import amqp_tls_files, node_name
from . import EXIT_FAILED, EXIT_OK, ToolError
from .account import Account, Accounts
from .reach import communicator, connect
from .tables import render_table

# What an error means and what to check, per code: (short meaning, advice).
_ADVICE: dict[str, tuple[str, str]] = {
    "10000001": ("invalid credentials",
                 "check the user name and API key, and that this host's IP is allowed"),
    errors.UNAUTHORIZED: ("credentials refused", "check the user name and API key"),
    "10000024": ("invalid API version",
                 "server_address must end with the API version, e.g. "
                 "https://restapi1.jasper.com/rws/api/v1"),
    "10000030": ("the user's role has no access to this API function",
                 "ask the Control Center administrator to give the API user's role access "
                 "to Echo, Get Device Details and Edit Device Details"),
    "40000029": ("rate limit exceeded",
                 "another program is using this account's calls; lower requests_per_second "
                 "or try again in a minute"),
    "30000001": ("Control Center server error", "a fault on Control Center's side; try again "
                 "later and tell the carrier if it persists"),
    "20000001": ("no such SIM (invalid ICCID)",
                 "check the Device Ref No against the SIM's ICCID in Control Center, and that "
                 "the SIM belongs to this communicator type's account"),
    "10000025": ("invalid device ID", "check the SIM's device ID in Control Center"),
    "10000029": ("SIM may not be moved back to a pre-activation status",
                 "a SIM that was ever activated can only be ACTIVATED or DEACTIVATED"),
    errors.JASPER_UNREACHABLE: ("Control Center unreachable",
                                "check server_address and that this host can reach it "
                                "(DNS, firewall, proxy)"),
    errors.UNEXPECTED_RESPONSE: ("unexpected answer",
                                 "server_address may not point at the Control Center REST "
                                 "API: a proxy or a web page answered"),
}

_ADVICE[errors.CERTIFICATE_NOT_TRUSTED] = (
    "TLS", "operator guide, section 10: troubleshooting TLS and proxies")
_ADVICE[errors.PROXY_REFUSED] = (
    "forward proxy", "operator guide, section 10: troubleshooting TLS and proxies")

# Our own codes whose message carries the detail (which host, which HTTP status).
_DETAILED = frozenset({errors.JASPER_UNREACHABLE, errors.UNEXPECTED_RESPONSE,
                       errors.UNAUTHORIZED, errors.CERTIFICATE_NOT_TRUSTED,
                       errors.PROXY_REFUSED})

SIM_STATUS_MEANINGS: dict[str, str] = {
    "ACTIVATED": "live: the SIM can connect and is billed",
    "ACTIVATION_READY": "ready: the SIM can connect and becomes ACTIVATED on first use",
    "DEACTIVATED": "off: the SIM cannot connect",
    "INVENTORY": "in stock: the SIM cannot connect until it is activated",
    "TEST_READY": "test mode: the SIM can connect within its test allowance",
    "PURGED": "purged: the SIM is gone from the network for good",
    "REPLACED": "replaced by another SIM for good",
    "RETIRED": "retired for good",
}

# Get Device Details fields shown by ``sim-status``, in this order, with their labels.
_SIM_FIELDS: tuple[tuple[str, str], ...] = (
    ("iccid", "ICCID"),
    ("status", "Status"),
    ("ratePlan", "Rate plan"),
    ("communicationPlan", "Communication plan"),
    ("customer", "Customer"),
    ("msisdn", "MSISDN"),
    ("imsi", "IMSI"),
    ("imei", "IMEI"),
    ("deviceID", "Device ID"),
    ("modemID", "Modem ID"),
    ("dateActivated", "Date activated"),
    ("dateAdded", "Date added"),
    ("dateUpdated", "Date updated"),
)


def explain(err: JasperError) -> str:
    """An error in an operator's words: ``invalid credentials (10000001) — check …``."""
    meaning, advice = _ADVICE.get(err.code, (err.message, ""))
    if err.code in _DETAILED:
        meaning = f"{meaning}: {err.message}"
    text = f"{meaning} ({err.code})"
    return f"{text} — {advice}" if advice else text


# --- check-config --ping ------------------------------------------------------------------


@dataclass(frozen=True)
class PingResult:
    """The outcome of one communicator type's Echo."""

    name: str
    problem: str | None  # None: Echo passed
    elapsed_ms: float
    by_owner: bool = False  # made by the service process that owns the type

    proxy: str | None = None  # the proxy the call went through, without credentials

    @property
    def line(self) -> str:
        via = f", via proxy {self.proxy}" if self.proxy else ""
        if self.problem is None:
            made = (", made by the service process that owns it, with its settings"
                    if self.by_owner else via)
            return f"{self.name}: OK (Echo answered in {self.elapsed_ms:.0f} ms{made})"
        return f"{self.name}: {self.problem}"


async def ping_broker(settings: Settings, out: TextIO) -> int:
    """Connect to every node of ``amqp_url`` once (TLS verified, client certificate sent
    where configured); print one line each. Non-zero when any node fails."""
    failed = 0
    for url in settings.amqp_urls:
        try:
            connection = await connect_once([url])
        except errors.BrokerUnavailable as exc:  # in words, naming the node
            failed += 1
            print(f"  {exc}", file=out)
            continue
        await connection.close()
        _, certfile, _ = amqp_tls_files(url)
        how = ("TLS, certificate verified" + (", client certificate sent" if certfile else "")
               if url.startswith("amqps://") else "plain AMQP, no TLS")
        print(f"  RabbitMQ at {node_name(url)}: OK ({how})", file=out)
    if failed:
        print(f"{failed} of {len(settings.amqp_urls)} RabbitMQ node(s) failed", file=out)
        return EXIT_FAILED
    return EXIT_OK


async def ping_one(account: Account) -> PingResult:
    """Call Echo once: through the service process that owns the type while one runs, else
    with this config's credentials (re-reading ``api_key_file``), through the type's proxy
    and trusting its ``ca_file``."""
    started = time.perf_counter()
    problem: str | None = None
    try:
        await account.echo()
    except JasperError as err:
        problem = explain(err)
    except ConfigError as err:
        problem = "; ".join(err.problems)
    by_owner = account.route == "owner"
    return PingResult(account.ct.name, problem, (time.perf_counter() - started) * 1000,
                      by_owner=by_owner, proxy=None if by_owner else account.ct.proxy_shown)


async def ping(settings: Settings, out: TextIO) -> int:
    """Echo every communicator type (at once: they are separate accounts); print one line
    each, in config order. Non-zero when any type fails."""
    async with await connect(settings) as connection, Accounts(connection, settings) as accounts:
        results = await asyncio.gather(*(ping_one(accounts[ct])
                                         for ct in settings.communicator_types))
    for result in results:
        print(f"  {result.line}", file=out)
    failed = [r for r in results if r.problem is not None]
    if failed:
        print(f"{len(failed)} of {len(results)} communicator type(s) failed Echo", file=out)
        return EXIT_FAILED
    return EXIT_OK


# --- sim-status ---------------------------------------------------------------------------


def sim_table(details: Mapping[str, Any]) -> str:
    """The main fields of a Get Device Details answer as a two-column table."""
    rows: list[list[str]] = []
    for key, label in _SIM_FIELDS:
        value = details.get(key)
        if value is None or value == "":
            continue
        text = str(value)
        if key == "status" and text in SIM_STATUS_MEANINGS:
            text = f"{text} — {SIM_STATUS_MEANINGS[text]}"
        rows.append([label, text])
    return render_table(["FIELD", "VALUE"], rows)


async def _get_device(settings: Settings, ct: CommunicatorType, iccid: str) -> dict[str, Any]:
    """Get Device Details, made by the service process that owns the type while one runs,
    within the account's limits together with its own calls (operator guide, section 13); a
    broker that does not answer is an error, never a reason to call directly."""
    async with await connect(settings) as connection, Accounts(connection, settings) as accounts:
        return await accounts[ct].get_device(iccid)


async def sim_status(
    settings: Settings, communicator_type: str, ref_no: str, out: TextIO, *, as_json: bool = False
) -> int:
    """Print a SIM's details from Get Device Details (one call, no retry)."""
    ct = communicator(settings, communicator_type)
    try:
        iccid = normalise_iccid(ref_no)
    except EventRejected as exc:
        raise ToolError(exc.message) from None
    try:
        details = await _get_device(settings, ct, iccid)
    except JasperError as err:
        if as_json:
            print(json.dumps({"iccid": iccid, "communicator_type": ct.name,
                              "error": err.as_dict()}, indent=2), file=out)
        else:
            print(f"SIM {iccid} via {ct.name}: {explain(err)}", file=out)
        return EXIT_FAILED
    if as_json:
        print(json.dumps(details, indent=2), file=out)
    else:
        print(f"SIM {iccid} via {ct.name}", file=out)
        print(sim_table(details), file=out)
    return EXIT_OK
