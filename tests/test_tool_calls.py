"""The tool's side of the calls the owning process makes for it: replies read back as
errors, a reply that never comes (SPEC §6)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from jasper_consumer.config import CommunicatorType
from jasper_consumer.errors import CommunicatorMisconfigured, JasperRejected, JasperRetryable
from jasper_consumer.tools.calls import NO_REPLY, RemoteCalls, error_from_reply
from jasper_consumer.topology import Names


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
