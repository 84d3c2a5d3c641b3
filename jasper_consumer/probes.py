"""``/healthz``, ``/readyz`` and ``/metrics`` on ``http_port`` (README, Metrics), and whatever
other routes the service adds (the status page, :mod:`.statuspage`).

``/healthz`` answers while the event loop does; ``/readyz`` asks the service
whether it is connected and its consumers are registered. Neither depends on Jasper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class ProbeServer:
    def __init__(
        self, registry: CollectorRegistry, readiness: Callable[[], tuple[bool, str]],
        routes: Iterable[web.RouteDef] = (),
    ) -> None:
        self._registry = registry
        self._readiness = readiness
        self._routes = list(routes)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_routes(self._routes)
        return app

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        ready, why = self._readiness()
        return web.json_response({"ready": ready, "detail": why}, status=200 if ready else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
