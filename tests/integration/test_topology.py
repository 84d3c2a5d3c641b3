"""The declarations on the real broker: RabbitMQ keeps exactly the arguments declare() sends,
and a queue an older version left with fewer arguments does not stop the service.

The queues are read back with ``rabbitmqctl list_queues name arguments``; where it cannot
be run (not installed, or this user may not talk to the node) the test says so and skips.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aio_pika.abc import AbstractRobustConnection

from jasper_consumer.config import Settings, parse_settings
from jasper_consumer.topology import declare, remove_topology

from ..test_topology import RecordingChannel, rule_breaches
from .conftest import raw_config

TYPES = [{"name": "M2MOne NZ", "server_address": "http://127.0.0.1:9/rws/api/v1",
          "username": "nz", "api_key": "k"},
         {"name": "M2MOne AU", "server_address": "http://127.0.0.1:9/rws/api/v1",
          "username": "au", "api_key": "k"}]


def broker_queues(prefix: str) -> dict[str, dict[str, Any]]:
    """Name -> arguments of the broker's queues named ``<prefix>.…``, from rabbitmqctl."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed: the declared queues cannot be read back")
    done = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "arguments",
                           "--formatter", "json"], capture_output=True, text=True,
                          timeout=60, check=False)
    if done.returncode != 0:
        pytest.skip(f"rabbitmqctl list_queues failed (run as a user allowed to talk to the "
                    f"node, e.g. root or rabbitmq): {done.stderr.strip()[:200]}")
    rows = json.loads(done.stdout)
    return {row["name"]: {name: value for name, _type, value in row["arguments"]}
            for row in rows if row["name"].startswith(f"{prefix}.")}


@pytest.fixture
async def settings(connection: AbstractRobustConnection) -> AsyncIterator[Settings]:
    tag = f"jct-{uuid.uuid4().hex[:10]}"
    settings = parse_settings(raw_config(tag, [dict(t) for t in TYPES]), {})
    yield settings
    await remove_topology(connection, settings)


async def test_broker_keeps_what_declare_sends(connection, settings):
    """Every queue on the broker has the arguments the recorded declarations have, and
    those keep the RabbitMQ 4 rules."""
    recorded = RecordingChannel()
    await declare(recorded, settings)  # type: ignore[arg-type]
    expected = {d.name: d.arguments for d in recorded.declared if d.kind == "queue"}
    exchanges = {d.name for d in recorded.declared if d.kind == "exchange"}
    channel = await connection.channel()

    await declare(channel, settings)
    await channel.close()

    assert broker_queues(settings.queue_prefix) == expected
    assert [p for d in recorded.declared if d.kind == "queue"
            for p in rule_breaches(d, exchanges)] == []


async def test_a_queue_left_by_an_older_version_does_not_stop_start_up(connection, settings):
    """<prefix>.dead and <prefix>.history as an older version declared them (no delivery
    limit) stay as they are; everything else is declared, the second time too."""
    names = [f"{settings.queue_prefix}.dead", f"{settings.queue_prefix}.history"]
    channel = await connection.channel()
    for name in names:
        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})

    await declare(channel, settings)
    await declare(channel, settings)
    await channel.close()

    queues = broker_queues(settings.queue_prefix)
    assert {name: queues[name] for name in names} == \
        {name: {"x-queue-type": "quorum"} for name in names}
    assert queues[f"{settings.queue_prefix}.events"]["x-delivery-limit"] == \
        settings.delivery_limit
