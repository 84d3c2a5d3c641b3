"""Reconnection restores the consumers by itself (operator guide, section 11,
JasperBrokerDisconnected): the watchdog is only a backstop.

The broker closes the service's own connection (found by its connection name, which
carries the test's unique queue prefix; no other client is touched). With the watchdog
set far beyond the test's bound, only aio-pika's restoration of the channels and their
consumers can make the service consume again in time.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from .conftest import Harness, iccid, make_event, rabbitmqctl_table, type_, wait_until

RESUME_BOUND_S = 5.0
WATCHDOG_S = 60.0


async def connections(name: str) -> list[str]:
    """The broker's pids of the connections whose client named itself ``name``."""
    rows = await rabbitmqctl_table("list_connections", "pid", "client_properties")
    return [r["pid"] for r in rows if f'{{"connection_name","{name}"}}' in r["client_properties"]]


async def close_connections(pids: list[str]) -> None:
    for pid in pids:
        proc = await asyncio.create_subprocess_exec(
            "rabbitmqctl", "-q", "close_connection", pid, "jasper-consumer reconnect test",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode(errors="replace")


@pytest.mark.timeout(120)
async def test_consumers_come_back_with_the_connection(harness: Harness) -> None:
    """A closed connection: both stages consume again within 5 s, without the watchdog."""
    await harness.setup([type_("a", 1, 50, request_timeout_seconds=0.5)],
                        watchdog_interval_seconds=WATCHDOG_S)
    service = await harness.start_service()
    await harness.read_signals()
    before = [make_event(iccid(n), "Type A") for n in range(5)]
    await harness.publish(before)
    await harness.wait_final([e["event_id"] for e in before], 20)

    pids = await connections(f"jasper-consumer {harness.tag}")
    assert len(pids) == 1, pids
    closed_at = time.monotonic()
    await close_connections(pids)
    after = [make_event(iccid(100 + n), "Type A") for n in range(5)]
    await harness.publish(after)
    ids = [e["event_id"] for e in after]
    await wait_until(lambda: any(harness.signals.finals(e) for e in ids),
                     "a final signal after the connection closed", 30, 0.02)
    resumed_s = min(harness.signals.arrived[e][0] for e in ids
                    if harness.signals.finals(e)) - closed_at
    await harness.wait_final(ids, 20)

    lost, dup = harness.signals.count(ids)
    line = (f"reconnect: consuming again {resumed_s:.2f} s after the connection closed "
            f"(watchdog every {WATCHDOG_S:.0f} s); lost {lost}, duplicated {dup}")
    print(line)
    assert resumed_s <= RESUME_BOUND_S, f"{line}\n{service.output()[-3000:]}"
    assert lost == 0, line
