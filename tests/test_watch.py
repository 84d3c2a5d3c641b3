"""The service's consumer watchdog loop (app.Service._watch), with the broker replaced."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from prometheus_client import CollectorRegistry

from jasper_consumer import app as app_module
from jasper_consumer import broker
from jasper_consumer.app import Service
from jasper_consumer.config import parse_settings
from jasper_consumer.metrics import Metrics


class ScriptedWatchdog:
    """Each check does what the script says next: "ok", "hang", "cancelled" (aiormq
    cancelling the RPC under it when it gives up on a stuck connection)."""

    script: ClassVar[list[str]] = []

    def __init__(self, *_: Any) -> None:
        pass

    async def check(self) -> str | None:
        step = self.script.pop(0) if self.script else "ok"
        if step == "hang":
            await asyncio.sleep(3600)
        if step == "cancelled":
            raise asyncio.CancelledError
        return None


class Worker:
    """What the watchdog loop asks of a worker."""

    def __init__(self) -> None:
        self.allowed: list[bool] = []

    def calls_allowed(self, allowed: bool, why: str = "") -> None:
        self.allowed.append(allowed)


@pytest.fixture
def service(monkeypatch: pytest.MonkeyPatch) -> Service:
    settings = parse_settings({"watchdog_interval_seconds": 0.01, "communicator_types": [{
        "name": "T", "server_address": "https://j.example/rws/api/v1", "username": "u",
        "api_key": "k"}]}, {})
    monkeypatch.setattr(broker, "Watchdog", ScriptedWatchdog)
    monkeypatch.setattr(app_module, "CHECK_TIMEOUT_S", 0.05)
    service = Service(settings, Metrics(CollectorRegistry()))
    service._connection = SimpleNamespace(is_closed=False)  # type: ignore[assignment]
    service._link = SimpleNamespace(up=True, problem=None)  # type: ignore[assignment]
    service._last_ok = 1e18  # "just now", for readiness
    service.workers = {"T": Worker()}  # type: ignore[dict-item]
    return service


async def test_the_watchdog_survives_a_check_cancelled_under_it(service: Service):
    """aiormq cancelling the check's RPC (a stuck connection given up) is a failed check,
    not the end of the watchdog: the next check runs, and readiness comes back."""
    ScriptedWatchdog.script = ["cancelled", "ok", "ok"]
    task = asyncio.create_task(service._watch())
    worker: Any = service.workers["T"]

    async with asyncio.timeout(5):
        while len(worker.allowed) < 2 or ScriptedWatchdog.script:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    assert not task.done()
    assert worker.allowed[:2] == [False, True]
    assert service._problem is None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_broker_that_does_not_answer_stops_new_calls_until_it_does(service: Service):
    """A check that hangs past its bound makes readiness say so and stops every type from
    starting a call; the next passing check allows calls again."""
    ScriptedWatchdog.script = ["hang", "ok"]
    task = asyncio.create_task(service._watch())
    worker: Any = service.workers["T"]
    said: list[str] = []

    async with asyncio.timeout(5):
        while True:
            ready, why = service.readiness()
            if not ready:
                said.append(why)
            if len(worker.allowed) >= 2:
                break
            await asyncio.sleep(0.005)

    assert worker.allowed[:2] == [False, True]
    assert any("did not answer" in why for why in said), said
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
