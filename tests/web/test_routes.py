"""Every route in lkm.web.routes is served, and nothing is served that is not listed there."""

from __future__ import annotations

from typing import Any, cast

from aiohttp import web

from lkm.auth import ClientPolicy
from lkm.web.admin import install_admin_routes
from lkm.web.batch import install_batch_route
from lkm.web.native import native_app
from lkm.web.ops import ReadinessView, ops_app
from lkm.web.platform import HEALTH_PATH
from lkm.web.plumbing import WebContext, WebObserver
from lkm.web.routes import Route


def _templates(app: web.Application) -> set[str]:
    return {resource.canonical for resource in app.router.resources()}


def test_the_route_list_is_exactly_what_the_applications_serve() -> None:
    # Route tables only: no request is served, so the service and key admin are never called.
    wctx = WebContext(service=cast(Any, None), observer=WebObserver(), max_body_bytes=4096)
    native = native_app(wctx, ClientPolicy(()))
    install_admin_routes(native, cast(Any, None))
    install_batch_route(native, 10)
    ops = ops_app(wctx, ReadinessView(), lambda: (b"", "text/plain"))
    served = _templates(native) | _templates(ops) | {HEALTH_PATH}
    assert served == {str(route) for route in Route}

