"""The operations listener (plain HTTP, loopback by default): /healthz, /readyz, /metrics.

Liveness says the process answers; readiness says every check the server keeps current passed, so a load
balancer sends nothing to an lkm that cannot unwrap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from lkm.web.plumbing import WebContext, application
from lkm.web.routes import ListenerName, Route


class ReadinessView:
    """What /readyz shows; the server keeps it current."""

    def __init__(self) -> None:
        self.checks: dict[str, tuple[bool, str]] = {}

    @property
    def ready(self) -> bool:
        return bool(self.checks) and all(ok for ok, _ in self.checks.values())

    def to_json(self) -> dict[str, Any]:
        return {"ready": self.ready,
                "checks": {name: {"ok": ok, "detail": detail} for name, (ok, detail) in self.checks.items()}}


READINESS = web.AppKey("readiness", ReadinessView)
MetricsRender = Callable[[], tuple[bytes, str]]
METRICS_RENDER: web.AppKey[MetricsRender] = web.AppKey("metrics_render")


async def healthz(_: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    view = request.app[READINESS]
    return web.json_response(view.to_json(), status=200 if view.ready else 503)


async def metrics(request: web.Request) -> web.StreamResponse:
    body, content_type = request.app[METRICS_RENDER]()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


def ops_app(wctx: WebContext, readiness: ReadinessView, render_metrics: MetricsRender | None) -> web.Application:
    return _with_ops_routes(application(wctx, ListenerName.OPS), readiness, render_metrics)


def supervisor_ops_app(readiness: ReadinessView, render_metrics: MetricsRender) -> web.Application:
    """The ops listener of a supervisor of several server processes: their combined readiness and metrics."""
    return _with_ops_routes(web.Application(), readiness, render_metrics)


def _with_ops_routes(app: web.Application, readiness: ReadinessView,
                     render_metrics: MetricsRender | None) -> web.Application:
    app[READINESS] = readiness
    app.router.add_get(Route.HEALTHZ, healthz)
    app.router.add_get(Route.READYZ, readyz)
    if render_metrics is not None:
        app[METRICS_RENDER] = render_metrics
        app.router.add_get(Route.METRICS, metrics)
    return app
