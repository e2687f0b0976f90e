"""The aiohttp application: the error middleware, each dependency under its AppKey, every subsystem's routes."""
from __future__ import annotations

from aiohttp import web

from . import anchors, bridge, dashboard, federation, fl, ledger, models, netflow, openapi, sessions, work
from .deps import (ADMIN_TOKEN, ADMISSION, ANCHORS, BRIDGE, CHAIN, FEDERATION, MEMBERS, METRICS, MODELS, ORCHESTRATION,
                   SIGNATURES, SNAPSHOTS, ApiDeps)
from .http import error_middleware
from .limits import LIMITER, rate_limit


def make_app(deps: ApiDeps) -> web.Application:
    """The REST application over deps."""
    app = web.Application(client_max_size=deps.max_body_bytes, middlewares=[error_middleware, rate_limit])
    app[LIMITER] = deps.rate_limit
    app[CHAIN] = deps.chain
    app[ADMISSION] = deps.admission
    app[SNAPSHOTS] = deps.snapshots
    app[METRICS] = deps.metrics
    app[MODELS] = deps.models
    app[ADMIN_TOKEN] = deps.admin_token
    app[MEMBERS] = deps.members
    app[ANCHORS] = deps.anchors
    app[FEDERATION] = deps.federation
    app[BRIDGE] = deps.bridge
    app[ORCHESTRATION] = deps.orchestration
    app[SIGNATURES] = deps.signatures
    for routes in (ledger, federation, anchors, bridge, work, fl, sessions, netflow, models, openapi):
        routes.add_routes(app.router)
    dashboard.setup(app)
    return app
