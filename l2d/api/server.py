"""The REST API's listening server: aiohttp's request handler with the limits a hostile client must meet.

aiohttp bounds header sizes and closes idle keep-alive connections itself (api.keepalive_timeout_ms is passed to
it), but it has no deadline for receiving a request's header or body, no cap on open connections (past the
descriptor limit asyncio logs every failed accept), it logs a malformed request's raw header line (a bearer token
included) with a traceback at error level, and its `Server` header names the Python and aiohttp versions. This
module adds the smallest pieces for those, around aiohttp's own `RequestHandler` and `AppRunner`:

- `ApiServer` accepts connections itself (asyncio's accept loop takes up to a backlog of sockets before any is
  refused, so a flood could run out of descriptors between accept and close): a connection beyond
  api.max_connections is answered with a 503 and closed inside the accept, so the daemon never holds more than
  api.max_connections + 1 client sockets (the process keeps FD_RESERVE more descriptors, checked at start); the
  others are handed to asyncio (`connect_accepted_socket`) and served by
- `_GuardedHandler`, which closes a connection whose request header is not complete api.header_timeout_ms after
  its first byte (or after connecting), or whose body is not complete api.body_timeout_ms after its header, and
  answers a malformed request with a fixed 400, counted and logged at info (its error class, never its bytes), at
  most LOG_LINES lines per LOG_INTERVAL_S;
- every response says `Server: l2d`.

`_GuardedHandler` reads two attributes of aiohttp's handler (`_request_count`, `_messages`): aiohttp is pinned in
pyproject.toml, and tests/l2d/api/test_server.py fails if they change.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import time
import weakref
from typing import Any, Callable, Optional, Set

from aiohttp import web
from aiohttp.streams import StreamReader

from ..config import ApiConfig, ConfigError
from ..metrics import Metrics

log = logging.getLogger(__name__)

SERVER = "l2d"  # the Server header: no versions to fingerprint
FD_RESERVE = 128  # descriptors kept for the rest of the daemon (LMDB, logs, bitcoind RPC and ZMQ, probes, files)
LOG_LINES = 10  # malformed-request lines logged per interval; the rest are counted in the next line
LOG_INTERVAL_S = 60.0
BACKLOG = 128  # aiohttp's TCPSite default
ACCEPT_RETRY_S = 1.0  # asyncio's pause after an accept failed for lack of descriptors
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_REFUSED = (f"HTTP/1.1 503 Service Unavailable\r\nServer: {SERVER}\r\nConnection: close\r\nRetry-After: 1\r\n"
            "Content-Length: 0\r\n\r\n").encode()


class _LogBudget:
    """At most `lines` log lines per `interval_s` window; counts what it holds back."""

    def __init__(self, lines: int, interval_s: float) -> None:
        self.lines = lines
        self.interval_s = interval_s
        self._window = float("-inf")
        self._used = 0
        self.suppressed = 0  # held back since the last line let through

    def take(self) -> Optional[int]:
        """None when this line must be dropped; else the number dropped before it (then reset)."""
        now = time.monotonic()
        if now - self._window >= self.interval_s:
            self._window, self._used = now, 0
        if self._used >= self.lines:
            self.suppressed += 1
            return None
        self._used += 1
        held, self.suppressed = self.suppressed, 0
        return held


def ensure_descriptors(max_connections: int) -> None:
    """Raise the soft RLIMIT_NOFILE so api.max_connections connections fit beside FD_RESERVE; ConfigError if the
    hard limit cannot hold them (asyncio would otherwise fail accepts and log each failure)."""
    need = max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise ConfigError(f"config: api.max_connections = {max_connections}: needs {need} file descriptors "
                          f"({FD_RESERVE} kept for the rest of the daemon) but this process may open at most {hard} "
                          "(RLIMIT_NOFILE); lower api.max_connections or raise the limit (ulimit -n)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    log.info("raised the open-file limit for api.max_connections", extra={"from": soft, "to": need})


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER


class _GuardedHandler(web.RequestHandler):
    """aiohttp's RequestHandler with header and body deadlines and a quiet, counted 400 for malformed requests."""

    __slots__ = ("_api", "_timer", "_body", "__weakref__")  # weakref: ApiServer counts live handlers in a WeakSet

    def __init__(self, api: ApiServer, manager: web.Server, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._api = api
        self._timer: Optional[asyncio.TimerHandle] = None
        self._body: Optional[StreamReader] = None  # the body being received, while its deadline runs

    def _arm(self, seconds: float, fire: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self._loop.call_later(seconds, fire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm(self._api.header_timeout_s, self._header_late)

    def data_received(self, data: bytes) -> None:
        if self._upgraded:  # a WebSocket (the federation's member links): frames, no more requests to time
            super().data_received(data)
            return
        if data and self._timer is None and self._body is None:  # the first byte of a request
            self._arm(self._api.header_timeout_s, self._header_late)
        seen = self._request_count
        super().data_received(data)
        if self._request_count != seen and self._messages:  # header(s) complete: the last may await its body
            self._disarm()
            payload = self._messages[-1][1]
            if not payload.is_eof():
                self._body = payload
                payload.on_eof(self._body_done)
                self._arm(self._api.body_timeout_s, self._body_late)

    def _body_done(self) -> None:
        self._disarm()
        self._body = None

    def _header_late(self) -> None:
        self._timer = None
        self._api.metrics.http_dropped.inc(reason="header-timeout")
        self.force_close()

    def _body_late(self) -> None:
        self._timer = None
        self._api.metrics.http_dropped.inc(reason="body-timeout")
        self.force_close()  # the handler reading the body gets ConnectionResetError

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._disarm()
        self._body = None
        self._api.connection_closed(self)
        super().connection_lost(exc)

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: Optional[BaseException] = None,
                     message: Optional[str] = None) -> web.StreamResponse:
        """aiohttp calls this with 400 for a request it could not parse: answer without echoing the request, count
        it, and log one info line (rate-limited) instead of aiohttp's error with the raw bytes."""
        if status != 400:
            return super().handle_error(request, status, exc, message)
        self._api.malformed(request.remote, exc)
        resp = web.Response(status=400, text="400 Bad Request: not a valid HTTP request\n",
                            headers={"Server": SERVER})
        resp.force_close()
        return resp


class ApiServer:
    """The REST app served on api.host:api.port with the limits of `ApiConfig`. start() returns the bound port."""

    def __init__(self, app: web.Application, cfg: ApiConfig, metrics: Metrics) -> None:
        app.on_response_prepare.append(_server_header)
        self.metrics = metrics
        self.header_timeout_s = cfg.header_timeout_ms / 1000
        self.body_timeout_s = cfg.body_timeout_ms / 1000
        self._cfg = cfg
        self._runner = web.AppRunner(app, handle_signals=False)
        self._open: weakref.WeakSet[_GuardedHandler] = weakref.WeakSet()
        self._log_budget = _LogBudget(LOG_LINES, LOG_INTERVAL_S)
        self._sock: Optional[socket.socket] = None  # the listening socket, while serving
        self._starting: Set[asyncio.Task[Any]] = set()  # connect_accepted_socket tasks, referenced until done

    async def start(self) -> int:
        ensure_descriptors(self._cfg.max_connections)
        await self._runner.setup()  # the app's startup; its web.Server is the manager of every handler
        family = socket.AF_INET6 if ":" in self._cfg.host else socket.AF_INET  # config: an IP literal
        sock = socket.create_server((self._cfg.host, self._cfg.port), family=family, backlog=BACKLOG)
        sock.setblocking(False)
        self._sock = sock
        self._listen()
        return int(sock.getsockname()[1])

    async def stop(self) -> None:
        """Stop listening, then let aiohttp close the open connections and clean up the app."""
        sock, self._sock = self._sock, None
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        await self._runner.cleanup()

    def _listen(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().add_reader(self._sock.fileno(), self._accept)

    def _accept(self) -> None:
        """Accept what is waiting (at most BACKLOG at a time, as asyncio): refuse past the limit here and now."""
        sock = self._sock
        loop = asyncio.get_running_loop()
        for _ in range(BACKLOG):
            if sock is None:
                return
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                # The daemon's other descriptors outgrew FD_RESERVE: pause accepting, as asyncio does, but say so
                # once per pause at warning rather than as an error with a traceback per connection.
                log.warning("out of descriptors: not accepting API connections for a second",
                            extra={"error": errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                                   "open": len(self._open)})
                loop.remove_reader(sock.fileno())
                loop.call_later(ACCEPT_RETRY_S, self._listen)
                return
            conn.setblocking(False)
            if len(self._open) >= self._cfg.max_connections:
                self.metrics.http_dropped.inc(reason="limit")
                try:
                    conn.send(_REFUSED)  # a fresh socket's send buffer is empty: this never blocks
                except OSError:  # the client has gone already
                    pass
                conn.close()
                continue
            # Counted from here, in the accepting call, so a burst of accepts cannot overshoot the limit.
            manager = self._runner.server
            assert manager is not None  # set by start() before listening
            handler = _GuardedHandler(self, manager, loop, access_log=None,
                                      keepalive_timeout=self._cfg.keepalive_timeout_ms / 1000)
            self._open.add(handler)
            task = loop.create_task(self._serve(conn, handler))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _serve(self, conn: socket.socket, handler: _GuardedHandler) -> None:
        """Hand an accepted socket to asyncio with its handler; forget the handler if the socket failed first."""
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: handler, sock=conn)
        except OSError as exc:
            self._open.discard(handler)
            log.info("API connection failed on accept", extra={"error": type(exc).__name__})

    def connection_closed(self, handler: _GuardedHandler) -> None:
        self._open.discard(handler)

    def malformed(self, remote: Optional[str], exc: Optional[BaseException]) -> None:
        self.metrics.http_malformed.inc()
        held = self._log_budget.take()
        if held is not None:
            log.info("malformed request refused", extra={"remote": remote, "error": type(exc).__name__,
                                                         "suppressed": held})
