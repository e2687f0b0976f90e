"""REST routes of the bridge subsystem (registered by l2d.api.make_app)."""
from __future__ import annotations

from aiohttp import web


def add_routes(r: web.UrlDispatcher) -> None:
    """Add this subsystem's routes; handlers reach the node as request.app[NODE_KEY] (from l2d.api, imported inside functions)."""
