"""What every tool reaches for, from one place: RabbitMQ (:func:`connect`), a configured
communicator type by name (:func:`communicator`), and a Control Center client of the
tool's own for that type (:func:`jasper_client`)."""

from __future__ import annotations

from aio_pika.abc import AbstractConnection
from prometheus_client import CollectorRegistry

from ..broker import connect_once
from ..config import CommunicatorType, Settings
from ..errors import BrokerUnavailable
from ..jasper import JasperClient, Limiter
from ..metrics import Metrics
from . import ToolError


async def connect(settings: Settings) -> AbstractConnection:
    """A plain connection for a tool; a clear :class:`ToolError` if the broker does not answer."""
    try:
        return await connect_once(settings.amqp_urls)
    except BrokerUnavailable as exc:  # every node's failure, in words, without passwords
        raise ToolError(f"cannot connect: {exc}") from None


def communicator(settings: Settings, name: str) -> CommunicatorType:
    """The configured type called ``name``, or a ToolError naming the configured ones."""
    ct = settings.communicator(name)
    if ct is None:
        known = ", ".join(repr(c.name) for c in settings.communicator_types)
        raise ToolError(f"communicator type {name!r} is not configured (configured: {known})")
    return ct


def jasper_client(ct: CommunicatorType, *, limiter: Limiter | None = None) -> JasperClient:
    """A client of the tool's own for ``ct``: its own limiter, metrics nobody scrapes."""
    return JasperClient(ct, Metrics(CollectorRegistry()), limiter=limiter)
