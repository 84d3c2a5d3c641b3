"""A tool's Control Center calls (operator guide, section 13): replies read back as errors, a
reply that never comes, and each call made where the owner is at that moment (tools/calls.py,
account.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiormq
import pytest

from jasper_consumer.config import CommunicatorType
from jasper_consumer.errors import CommunicatorMisconfigured, JasperRejected, JasperRetryable
from jasper_consumer.simulator import Simulator
from jasper_consumer.tools.account import IN_USE, Account
from jasper_consumer.tools.calls import NO_REPLY, RemoteCalls, error_from_reply
from jasper_consumer.topology import Names

ICCID = "89610185002345678901"


@pytest.mark.parametrize(("error", "kind"), [
    ({"code": "10000001", "http_status": 401, "message": "m", "retryable": True},
     CommunicatorMisconfigured),
    ({"code": "40000029", "http_status": 429, "message": "m", "retryable": True},
     JasperRetryable),
    ({"code": "20000001", "http_status": 404, "message": "m", "retryable": False},
     JasperRejected),
    (None, JasperRejected),
])
def test_an_error_reply_becomes_the_matching_error(error, kind):
    """The tool reads an error reply back as the error it stands for."""
    err = error_from_reply(error)

    assert type(err) is kind
    if error:
        assert err.as_dict() == error


class _SilentReplies:
    """A reply queue whose replies never come (the owner failed over meanwhile)."""

    def __init__(self) -> None:
        self.published: list[str] = []

    async def send(self, routing_key: str, body: dict[str, Any]) -> Any:
        self.published.append(routing_key)
        return "cid", asyncio.get_running_loop().create_future()

    async def publish(self, routing_key: str, body: bytes, **_: Any) -> None:
        self.published.append(routing_key)

    def forget(self, correlation_id: str) -> None:
        pass


async def test_a_reply_that_never_comes_is_worth_asking_again():
    """A lost reply is a retryable NO_REPLY, so the listing's retries ask again instead of
    failing the whole type."""
    ct = CommunicatorType(name="M2MOne NZ", server_address="http://x/rws/api/v1",
                          username="u", api_key="k")
    names = Names("p", "events", "history")
    remote = RemoteCalls(_SilentReplies(), names, ct)  # type: ignore[arg-type]
    remote.timeout_s = 0.05

    with pytest.raises(JasperRetryable) as caught:
        await remote.get_device("89610185002345678901")

    assert caught.value.code == NO_REPLY


class _Answering:
    """Replies from an owner that answers every request at once."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.wakes = 0

    async def send(self, routing_key: str, body: dict[str, Any]) -> Any:
        self.sent.append(body)
        future = asyncio.get_running_loop().create_future()
        future.set_result({"ok": True, "result": {"iccid": body.get("iccid"), "by": "owner"}})
        return "cid", future

    async def publish(self, routing_key: str, body: bytes, **_: Any) -> None:
        self.wakes += 1  # the only thing published besides requests

    def forget(self, correlation_id: str) -> None:
        pass


class _LockChannel:
    def __init__(self, held_by_another: bool) -> None:
        self.held_by_another = held_by_another
        self.is_closed = False

    async def declare_queue(self, name: str, **_: Any) -> None:
        if self.held_by_another:
            raise aiormq.exceptions.ChannelLockedResource("RESOURCE_LOCKED")

    async def queue_delete(self, name: str) -> None:
        pass

    async def close(self) -> None:
        self.is_closed = True


class _Connection:
    def __init__(self, held_by_another: bool = False) -> None:
        self.held_by_another = held_by_another

    async def channel(self, **_: Any) -> _LockChannel:
        return _LockChannel(self.held_by_another)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    """Control Center for the tool's own calls."""
    simulator = Simulator()
    simulator.add_account("u", "k", requests_per_second=1000)
    await simulator.start()
    simulator.set_status(ICCID, "ACTIVATED")
    yield simulator
    await simulator.stop()


def _account(sim: Simulator, connection: _Connection, replies: _Answering,
             said: list[str]) -> Account:
    ct = CommunicatorType(name="M2MOne NZ", server_address=sim.base_url, username="u",
                          api_key="k", requests_per_second=100)

    async def open_replies() -> Any:
        return replies

    return Account(ct, connection, Names("p", "events", "history"),  # type: ignore[arg-type]
                   open_replies, said.append)


def _answers(*owned: bool) -> Any:
    """``Account.owned`` answering ``owned`` in turn."""
    answers = iter(owned)

    async def scripted() -> bool:
        return next(answers)

    return scripted


async def test_a_service_that_takes_the_type_before_the_call_leaves_makes_it(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tool asks again once its own limiter grants the start: a service that took the
    type in between makes the call, and the tool sends nothing itself."""
    replies, said = _Answering(), list[str]()
    account = _account(sim, _Connection(), replies, said)
    monkeypatch.setattr(account, "owned", _answers(False, True, True))

    details = await account.get_device(ICCID)
    await account.close()

    assert details == {"iccid": ICCID, "by": "owner"}
    assert replies.sent == [{"op": "get_device", "iccid": ICCID}]
    assert sim.requests == []
    assert account.route == "owner"


async def test_each_call_goes_where_the_owner_is_now(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Owner, then none, then owner again: each call asks, each change is said, and the
    owner that comes back (maybe another process, idle) is woken again."""
    replies, said = _Answering(), list[str]()
    account = _account(sim, _Connection(), replies, said)
    monkeypatch.setattr(account, "owned", _answers(True, False, False, True))

    answers = [await account.get_device(ICCID) for _ in range(3)]
    await account.close()

    assert [a.get("by", "tool") for a in answers] == ["owner", "tool", "owner"]
    assert len(sim.requests) == 1
    assert replies.wakes == 2
    assert [line.split(":")[0] for line in said] == ["no service owns it any more",
                                                     "a service now owns it"]


async def test_a_second_tool_calling_directly_is_refused(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no service, a tool that finds the type's direct queue held by another tool
    makes no call: ACCOUNT_IN_USE, saying why."""
    account = _account(sim, _Connection(held_by_another=True), _Answering(), [])
    monkeypatch.setattr(account, "owned", _answers(False))

    with pytest.raises(JasperRejected) as caught:
        await account.get_device(ICCID)
    await account.close()

    assert caught.value.code == IN_USE
    assert "another operator tool is calling M2MOne NZ's account directly" in \
        caught.value.message
    assert sim.requests == []
