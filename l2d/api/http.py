"""HTTP helpers every route module shares: the JSON error shape and middleware, body and field parsers, the one
hex validator, and the admin bearer-token decorator.

Every error leaves as a JSON body {"error": code, "message": text} with a 4xx status for bad client input,
503 with Retry-After while the node refuses new transactions for low disk space; an unexpected exception is
logged and answered with a JSON 500.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from typing import Any, Awaitable, Callable, Collection, Optional

from aiohttp import web

from ..core.errors import Rejected
from ..datadir import DiskLow
from .deps import ADMIN_TOKEN, METRICS

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")
_DIGITS = re.compile(r"[0-9]{1,20}")
_STATUS_CODES = {400: "bad-request", 401: "unauthorized", 403: "forbidden", 404: "not-found",
                 405: "method-not-allowed", 409: "conflict", 408: "request-timeout", 411: "length-required",
                 413: "body-too-large", 415: "unsupported-media-type", 422: "unprocessable", 429: "too-many-requests"}
_KEEP_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An error answered with status and a JSON body {"error": code, "message": message}."""

    def __init__(self, status: int, code: str, message: str, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def json_error(status: int, code: str, message: str, headers: Optional[dict[str, str]] = None) -> web.Response:
    """The JSON error response every failure path uses."""
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


def _route_label(request: web.Request) -> str:
    """The route template (bounded label cardinality), or "unmatched"."""
    route = request.match_info.route
    resource = route.resource if route is not None else None
    if resource is None:
        return "unmatched"
    return resource.canonical


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every exception into a JSON error response; count and time the request."""
    resp: web.StreamResponse
    start = time.perf_counter()
    try:
        resp = await handler(request)
    except ApiError as e:
        resp = json_error(e.status, e.code, e.message, e.headers)
    except DiskLow as e:  # not the transaction's fault: the node refuses everything new for now
        resp = json_error(503, e.reason, str(e), {"Retry-After": str(e.retry_after_s)})
    except Rejected as e:  # a transaction refused at admission: the reason code is the error
        resp = json_error(400, e.reason, str(e))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {k: e.headers[k] for k in _KEEP_HEADERS if k in e.headers}
        code = _STATUS_CODES.get(e.status, "http-error")
        message = e.text if e.text and not e.text.startswith(f"{e.status}:") else (e.reason or code)
        resp = json_error(e.status, code, message, headers)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        if isinstance(e, ConnectionResetError) and (request.transport is None or request.transport.is_closing()):
            # The client is gone (it left, or api.body_timeout_ms cut it off): no one to answer, no server error.
            resp = json_error(408, "request-timeout", "connection closed before the request was served")
        else:
            log.exception("unhandled error serving %s %s", request.method, request.path)
            resp = json_error(500, "internal", "internal error (logged)")
    route = _route_label(request)
    request.app[METRICS].http_requests.inc(path=route, status=str(resp.status))
    request.app[METRICS].http_seconds.observe(time.perf_counter() - start, path=route)
    return resp


# -- request parsing -------------------------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json_object(request: web.Request, *, allow_empty: bool = False) -> dict[str, Any]:
    """The body as a JSON object; 415 for another content type, 413 when too large, 400 when not an object."""
    body = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    if allow_empty and not body.strip():
        return {}
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported-media-type",
                       f"Content-Type must be application/json, got {request.content_type!r}")
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, "malformed", f"body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "malformed", f"body must be a JSON object, got {type(value).__name__}")
    return value


def field(obj: dict[str, Any], name: str, typ: type) -> Any:
    """obj[name], which must be present and of type typ (an int is never a bool); 400 otherwise."""
    if name not in obj:
        raise ApiError(400, "missing-field", f"field {name!r} is required")
    v = obj[name]
    if typ is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise ApiError(400, "bad-field", f"field {name!r} must be an integer, got {type(v).__name__}")
    if not isinstance(v, typ):
        raise ApiError(400, "bad-field", f"field {name!r} must be a {typ.__name__}, got {type(v).__name__}")
    return v


def hex32(value: object, what: str, code: str = "malformed") -> bytes:
    """32 bytes from 64 hex characters (either case); 400 with `code` otherwise. The one hex validator."""
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise ApiError(400, code, f"{what} must be 64 hex characters")
    return bytes.fromhex(value)


def path_hex32(request: web.Request, name: str) -> bytes:
    """Path parameter `name` as 32 bytes from 64 hex characters; 400 malformed otherwise."""
    return hex32(request.match_info[name], name)


def status_query(request: web.Request, names: Collection[str], any_case: bool = True) -> Optional[str]:
    """The ?status= filter: None when absent, else one of names (upper-cased when any_case; ASCII letters only, so
    "ſettled" is not SETTLED), 400 otherwise."""
    want = request.query.get("status")
    if want is None:
        return None
    if any_case and want.isascii():
        want = want.upper()
    if want not in names:
        raise ApiError(400, "malformed", f"status must be one of {', '.join(names)}")
    return want


def uint(s: str, what: str, lo: int = 0, hi: int = 2**64 - 1) -> int:
    """An integer in lo..hi written with ASCII digits only (from a path or a query string); 400 malformed otherwise."""
    if not _DIGITS.fullmatch(s) or not lo <= int(s) <= hi:
        raise ApiError(400, "malformed", f"{what} must be an integer in {lo}..{hi}, got {s[:40]!r}")
    return int(s)


# -- admin -----------------------------------------------------------------------------------------------------
def check_admin(request: web.Request) -> None:
    """401 unless the request carries the configured bearer token (constant-time comparison)."""
    token = request.app[ADMIN_TOKEN]
    challenge = {"WWW-Authenticate": 'Bearer realm="l2d-admin"'}
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if not header or scheme.lower() != "bearer":
        raise ApiError(401, "unauthorized", "admin endpoint: send 'Authorization: Bearer <token>'", challenge)
    given_b = given.strip().encode("utf-8", "surrogateescape")
    # An empty configured token disables the admin API rather than accepting an empty bearer.
    if not token or not hmac.compare_digest(given_b, token.encode("utf-8")):
        raise ApiError(401, "unauthorized", "admin token rejected",
                       {"WWW-Authenticate": 'Bearer realm="l2d-admin", error="invalid_token"'})


def admin(handler: Handler) -> Handler:
    """Decorator: authenticate before anything else (including reading the body)."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        check_admin(request)
        return await handler(request)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped
