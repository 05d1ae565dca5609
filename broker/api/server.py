"""The broker's HTTP server: uvicorn, plus the two limits it lacks against slowloris and floods.

uvicorn bounds the idle time between requests (``timeout_keep_alive``) but not the time a client
may take to send a request head, and it serves every connection it accepts. From ``server.*``:

* ``head_timeout_s``: a request head must be complete within this of the connection opening, or
  of the previous response finishing on a keep-alive connection; otherwise the connection is
  closed, without a response (see ``_Edge._head_timer_fired``).
* ``max_connections``: a connection that arrives while this many are open is aborted before any
  byte of it is read, so a flood costs its sender a reset, not the server a slot.

And one it handles its own way: on SIGTERM uvicorn stops accepting and waits for the requests
under way, for ever, or cancels them all after ``timeout_graceful_shutdown``: a stream's client
would see its connection cut. :func:`serve` tells the app instead when its shutdown begins, so
that the streams end by ``server.shutdown_grace_s`` with an error event their clients can read
(see :func:`broker.api.app.drain`); uvicorn's own timeout stays behind it as a backstop.

Both live in subclasses of uvicorn's HTTP protocols (httptools; h11 when httptools is missing).
They rely on these uvicorn internals, as of 0.55: the protocols' ``loop``, ``transport`` and
``server_state.connections``; ``connection_made``/``connection_lost``; ``on_response_complete``
(called once per response); httptools' ``on_headers_complete`` and ``pipeline`` (heads parsed
ahead of their turn); h11's ``handle_events`` and ``conn``. An upgrade that renames one breaks
tests/test_server_edge.py, which drives a real server through every path with both parsers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import resource
import socket
import time
from collections.abc import Callable
from typing import Any, ClassVar, Literal, cast

import h11
import uvicorn
from starlette.applications import Starlette
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.h11_impl import H11Protocol

from broker.api.app import drain
from broker.settings import Settings

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # uvicorn without its [standard] extra: h11 is always there
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

logger = logging.getLogger("broker.server")

Parser = Literal["auto", "httptools", "h11"]
# A flood refuses thousands of connections a second: say so once in a while, not each time.
_REFUSAL_LOG_INTERVAL_S = 10.0
# Descriptors the broker needs besides client connections: database, Vault, providers, logs.
_FD_RESERVE = 128
# After the shutdown grace, the streams it ended still send their last event and settle; what
# still runs past this too (a non-stream call waiting on its provider) is cancelled by uvicorn
# and settled as cancelled.
_SETTLE_MARGIN_S = 5.0


class _Limits:
    """One server's edge limits, shared by all its connections."""

    def __init__(self, head_timeout_s: float, max_connections: int) -> None:
        self.head_timeout_s = head_timeout_s
        self.max_connections = max_connections
        self._refused = 0
        self._logged_at = -math.inf

    def admit(self, open_connections: int, transport: asyncio.Transport) -> bool:
        """Whether a new connection may be served; if not, it has been aborted already."""
        if open_connections < self.max_connections:
            return True
        transport.abort()
        self._refused += 1
        now = time.monotonic()
        if now - self._logged_at >= _REFUSAL_LOG_INTERVAL_S:
            logger.warning("refused %d connection(s): server.max_connections (%d) are open",
                           self._refused, self.max_connections)
            self._refused, self._logged_at = 0, now
        return False


class _Edge:
    """The per-connection state both parsers' protocols add. ``limits`` is bound per server."""

    limits: ClassVar[_Limits]
    _admitted = False
    # When the awaited request head must be complete (loop time); None while none is awaited.
    _head_due: float | None = None
    _head_timer: asyncio.TimerHandle | None = None

    def _await_head(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport) -> None:
        self._head_due = loop.time() + self.limits.head_timeout_s
        # One timer serves many keep-alive requests: a timer per request (call_later, then
        # cancel) would cost ~2 us each, several per cent of a small request's CPU time. A timer
        # that fires early, on a deadline since moved, is re-armed instead.
        if self._head_timer is None:
            self._head_timer = loop.call_at(self._head_due, self._head_timer_fired, loop, transport)

    def _head_timer_fired(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport) -> None:
        self._head_timer = None
        if self._head_due is None:  # the head came; the next response completion re-arms
            return
        if loop.time() < self._head_due:
            self._head_timer = loop.call_at(self._head_due, self._head_timer_fired, loop, transport)
            return
        # No 408: on a keep-alive connection it races with a request the client may be starting,
        # and would be read as that request's answer; clients already retry when an idle
        # connection closes. close(), not abort(): the previous response's tail may be buffered.
        if not transport.is_closing():
            transport.close()

    def _stop_head_timer(self) -> None:
        self._head_due = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


class _H11Edge(_Edge, H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if not self.limits.admit(len(self.server_state.connections), transport):
            return
        self._admitted = True
        super().connection_made(transport)
        self._sync_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        if self._admitted:
            super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        self._sync_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._sync_head_timer()

    def _sync_head_timer(self) -> None:
        # h11 leaves both sides IDLE from the start of a cycle until a whole head is parsed. The
        # deadline is set once per head, so a head trickled in over many reads gains nothing.
        if not (self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE):
            self._head_due = None
        elif self._head_due is None and not self.transport.is_closing():
            self._await_head(self.loop, self.transport)


if HttpToolsProtocol is not None:

    class _HttpToolsEdge(_Edge, HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if not self.limits.admit(len(self.server_state.connections), transport):
                return
            self._admitted = True
            super().connection_made(transport)
            self._await_head(self.loop, transport)

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_timer()
            if self._admitted:
                super().connection_lost(exc)

        def on_headers_complete(self) -> None:
            self._head_due = None
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            # A pipelined request waiting its turn has its head already; without one, the next
            # head is still to come.
            next_head_awaited = not self.pipeline
            super().on_response_complete()
            if next_head_awaited and not self.transport.is_closing():
                self._await_head(self.loop, self.transport)


def edge_protocol(
    head_timeout_s: float, max_connections: int, *, parser: Parser = "auto"
) -> type[asyncio.Protocol]:
    """An HTTP protocol class for ``uvicorn.Config(http=...)`` that enforces both limits.

    ``parser="auto"`` picks httptools when it is importable (as uvicorn does), else h11. Each
    call returns a new class: the limits, and the refusal count, belong to one server.
    """
    if parser == "auto":
        parser = "h11" if HttpToolsProtocol is None else "httptools"
    elif parser == "httptools" and HttpToolsProtocol is None:
        raise RuntimeError("httptools is not installed: pip install 'uvicorn[standard]'")
    base: type[_Edge] = _H11Edge if parser == "h11" else _HttpToolsEdge
    limits = _Limits(head_timeout_s, max_connections)
    return cast(type[asyncio.Protocol], type(base.__name__, (base,), {"limits": limits}))


def uvicorn_config(
    app: Callable[..., Any],
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    parser: Parser = "auto",
    **extra: Any,
) -> uvicorn.Config:
    """uvicorn's configuration for serving ``app`` as the broker: ``server.*`` limits enforced.

    ``host``/``port`` default to ``server.host``/``server.port``; ``extra`` goes to
    ``uvicorn.Config`` (e.g. ``log_level``). uvicorn's ``timeout_keep_alive`` stays its default.
    """
    server = settings.server
    extra.setdefault("timeout_graceful_shutdown", server.shutdown_grace_s + _SETTLE_MARGIN_S)
    return uvicorn.Config(
        app,
        host=server.host if host is None else host,
        port=server.port if port is None else port,
        http=edge_protocol(server.head_timeout_s, server.max_connections, parser=parser),
        # uvicorn would believe X-Forwarded-For from any loopback peer; the app decides which
        # proxies to believe (server.trusted_proxies).
        proxy_headers=False,
        server_header=False,
        access_log=False,
        **extra,
    )


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, which tells the app that its shutdown begins."""

    def __init__(self, config: uvicorn.Config, app: Starlette, grace_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._grace_s = grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain(self._app, time.monotonic() + self._grace_s)
        await super().shutdown(sockets)


def serve(app: Starlette, settings: Settings, **kwargs: Any) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, as ``uvicorn.run`` would, with ``uvicorn_config``.

    As with ``uvicorn.run``: Ctrl-C ends in a graceful shutdown and a normal return, and a server
    that never started exits with status 3. On SIGTERM uvicorn shuts down gracefully, restores the
    handler that was installed before it and raises the signal again, so a caller's own SIGTERM
    handler (``broker serve`` unwinds with status 0) still decides how the process ends. The
    streams under way when the shutdown begins end within ``server.shutdown_grace_s``.
    """
    _warn_if_fd_limit_is_below_cap(settings.server.max_connections)
    server = _DrainingServer(uvicorn_config(app, settings, **kwargs), app,
                             settings.server.shutdown_grace_s)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)


def _warn_if_fd_limit_is_below_cap(max_connections: int) -> None:
    # Past the open-file limit accept() fails (EMFILE) and the event loop stops accepting for a
    # while, so the cap never gets to refuse anyone: every client waits, not just the excess.
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and max_connections > soft - _FD_RESERVE:
        logger.warning("server.max_connections (%d) is not below the open-file limit (%d) less %d "
                       "for the broker's own use: raise `ulimit -n` or lower the cap",
                       max_connections, soft, _FD_RESERVE)
