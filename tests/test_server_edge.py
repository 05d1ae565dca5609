"""The server edge (broker/api/server.py): a real uvicorn on a real port, with each HTTP parser.

A request head must arrive within ``server.head_timeout_s`` of the connection opening (or of the
previous response finishing, on a keep-alive connection), and connections beyond
``server.max_connections`` are refused at once. Timing assertions are only generous bounds
around the timeout itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from broker.api.server import uvicorn_config
from broker.settings import ServerSettings, Settings
from tests.support import wait_for

HOST = "127.0.0.1"
HEAD_TIMEOUT = 0.5
CAP = 20
SLACK = 3.0  # how late, at most, a timeout may take effect on a loaded machine
HEAD = b"GET /hello HTTP/1.1\r\nHost: edge.test\r\nX-Padding: " + b"p" * 60 + b"\r\n\r\n"
ROOT = Path(__file__).resolve().parent.parent
Parser = Literal["httptools", "h11"]


# --- the app and the server -------------------------------------------------------------------

STREAM_CHUNKS = 5
STREAM_PAUSE_S = 0.25  # five pauses: the whole stream lasts over twice the head timeout


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


async def echo(request: Request) -> Response:
    return PlainTextResponse(await request.body())


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(STREAM_CHUNKS):
            await asyncio.sleep(STREAM_PAUSE_S)
            yield f"chunk {i}\n".encode()

    return StreamingResponse(chunks(), media_type="text/plain")


async def slow(request: Request) -> Response:
    await asyncio.sleep(HEAD_TIMEOUT * 2)
    return PlainTextResponse("slow")


async def client(request: Request) -> Response:
    assert request.client is not None
    return JSONResponse({"client": request.client.host})


APP = Starlette(routes=[
    Route("/hello", hello), Route("/echo", echo, methods=["POST"]), Route("/stream", stream),
    Route("/client", client), Route("/slow", slow),
])


class EdgeServer:
    """uvicorn with ``uvicorn_config`` in a background thread, on a port bound beforehand."""

    def __init__(self, parser: Parser, head_timeout_s: float, max_connections: int, **extra: Any):
        settings = Settings(server=ServerSettings(head_timeout_s=head_timeout_s,
                                                  max_connections=max_connections))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, 0))
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://{HOST}:{self.port}"
        config = uvicorn_config(APP, settings, host=HOST, port=self.port, parser=parser,
                                log_level="warning", timeout_graceful_shutdown=1, **extra)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="edge-server", daemon=True)

    def start(self) -> EdgeServer:
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), timeout=20,
                 what="the server's start")
        assert self.server.started, "the server's thread ended during its start"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


Edge = Callable[..., EdgeServer]
"""Starts an :class:`EdgeServer` (with the given settings) that the test ends with."""
Sockets = list[socket.socket]


@pytest.fixture(params=["httptools", "h11"])
def edge(request: pytest.FixtureRequest) -> Iterator[Edge]:
    servers: list[EdgeServer] = []

    def start(head_timeout_s: float = HEAD_TIMEOUT, max_connections: int = CAP, **extra: Any) -> EdgeServer:
        server = EdgeServer(request.param, head_timeout_s, max_connections, **extra).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Client sockets, closed after the test."""
    opened: list[socket.socket] = []
    yield opened
    for s in opened:
        s.close()


# --- raw HTTP/1.1 over a socket ---------------------------------------------------------------


def connect(server: EdgeServer, opened: list[socket.socket]) -> socket.socket:
    s = socket.create_connection((HOST, server.port), timeout=10)
    opened.append(s)
    return s


def read_response(s: socket.socket) -> tuple[int, bytes]:
    """One response with a Content-Length body, and not a byte more (pipelining reads two in a
    row); raises EOFError if the server closes first."""
    raw = s.makefile("rb", buffering=0)  # unbuffered: what follows stays in the socket
    status_line = raw.readline()
    if not status_line:
        raise EOFError("closed before a response")
    headers = {}
    while (line := raw.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    body = b""
    while len(body) < int(headers[b"content-length"]):
        chunk = raw.read(int(headers[b"content-length"]) - len(body))
        if not chunk:
            raise EOFError("closed mid-body")
        body += chunk
    return int(status_line.split(b" ")[1]), body


def request(s: socket.socket) -> tuple[int, bytes]:
    s.sendall(HEAD)
    return read_response(s)


def wait_closed(s: socket.socket, within: float) -> bytes:
    """Read until the server closes the connection (EOF or reset) and return what it sent;
    fail if it is still open after ``within`` seconds."""
    deadline = time.monotonic() + within
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"still open after {within}s (got {data!r})"
        s.settimeout(remaining)
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def trickle_until_closed(s: socket.socket, payload: bytes, pause_s: float) -> tuple[float, bytes]:
    """Send ``payload`` a byte at a time, ``pause_s`` apart, until the server closes the
    connection; return the seconds that took and what the server sent."""
    t0 = time.monotonic()
    for i in range(len(payload)):
        try:
            s.sendall(payload[i:i + 1])
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - t0, b""
        readable, _, _ = select.select([s], [], [], pause_s)
        if readable:
            return time.monotonic() - t0, wait_closed(s, SLACK)
    raise AssertionError(f"the whole head went through in {time.monotonic() - t0:.1f}s")


# --- the head deadline ------------------------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout(
        edge: Edge, sockets: Sockets) -> None:
    server = edge()
    t0 = time.monotonic()
    s = connect(server, sockets)
    assert wait_closed(s, HEAD_TIMEOUT + SLACK) == b""  # closed without a response (no 408)
    assert time.monotonic() - t0 >= HEAD_TIMEOUT * 0.8


def test_a_partial_head_then_silence_is_closed_after_the_head_timeout(edge: Edge, sockets: Sockets) -> None:
    server = edge()
    t0 = time.monotonic()
    s = connect(server, sockets)
    s.sendall(HEAD[:20])
    assert wait_closed(s, HEAD_TIMEOUT + SLACK) == b""
    assert time.monotonic() - t0 >= HEAD_TIMEOUT * 0.8


def test_a_head_sent_byte_by_byte_slower_than_the_timeout_is_closed(edge: Edge, sockets: Sockets) -> None:
    # Each byte arrives well within the timeout: the deadline is for the whole head, not a gap.
    server = edge()
    s = connect(server, sockets)
    took, sent = trickle_until_closed(s, HEAD, pause_s=HEAD_TIMEOUT / 5)
    assert sent == b""
    assert HEAD_TIMEOUT * 0.8 <= took <= HEAD_TIMEOUT + SLACK


def test_a_keep_alive_connection_that_starts_its_next_head_slowly_is_closed(
        edge: Edge, sockets: Sockets) -> None:
    server = edge()
    s = connect(server, sockets)
    assert request(s) == (200, b"hello")
    took, sent = trickle_until_closed(s, HEAD, pause_s=HEAD_TIMEOUT / 5)
    assert sent == b""
    assert HEAD_TIMEOUT * 0.8 <= took <= HEAD_TIMEOUT + SLACK


def test_the_deadline_restarts_with_each_request_on_a_keep_alive_connection(
        edge: Edge, sockets: Sockets) -> None:
    # Four prompt requests with pauses between them: together far longer than the head timeout.
    server = edge(head_timeout_s=1.0)
    s = connect(server, sockets)
    t0 = time.monotonic()
    for _ in range(4):
        assert request(s) == (200, b"hello")
        time.sleep(0.4)
    assert time.monotonic() - t0 > 1.0
    assert request(s) == (200, b"hello")


def test_a_pipelined_request_is_served_and_the_deadline_then_applies_again(
        edge: Edge, sockets: Sockets) -> None:
    server = edge()
    s = connect(server, sockets)
    s.sendall(HEAD + HEAD)
    assert read_response(s) == (200, b"hello")
    assert read_response(s) == (200, b"hello")
    assert wait_closed(s, HEAD_TIMEOUT + SLACK) == b""


def test_a_slow_response_is_not_cut_and_the_deadline_applies_again_after_it(
        edge: Edge, sockets: Sockets) -> None:
    # The app takes twice the head timeout: the deadline is suspended while a request runs.
    server = edge()
    s = connect(server, sockets)
    s.sendall(b"GET /slow HTTP/1.1\r\nHost: edge.test\r\n\r\n")
    assert read_response(s) == (200, b"slow")
    assert request(s) == (200, b"hello")
    t0 = time.monotonic()
    assert wait_closed(s, HEAD_TIMEOUT + SLACK) == b""
    assert time.monotonic() - t0 >= HEAD_TIMEOUT * 0.8


def test_a_request_body_that_arrives_after_the_head_is_not_cut(edge: Edge, sockets: Sockets) -> None:
    server = edge()
    s = connect(server, sockets)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: edge.test\r\nContent-Length: 11\r\n\r\n")
    time.sleep(HEAD_TIMEOUT * 2)
    s.sendall(b"hello")
    time.sleep(HEAD_TIMEOUT)
    s.sendall(b" world")
    assert read_response(s) == (200, b"hello world")


def test_a_streaming_response_longer_than_the_head_timeout_is_not_cut(edge: Edge) -> None:
    server = edge()
    t0 = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=30) as http, http.stream("GET", "/stream") as resp:
        body = b"".join(resp.iter_bytes())
    assert resp.status_code == 200
    assert body == b"".join(f"chunk {i}\n".encode() for i in range(STREAM_CHUNKS))
    assert time.monotonic() - t0 > HEAD_TIMEOUT


def test_a_normal_request_is_served(edge: Edge) -> None:
    server = edge()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for _ in range(3):
            resp = http.get("/hello")
            assert (resp.status_code, resp.text) == (200, "hello")


# --- the connection cap -----------------------------------------------------------------------


def assert_refused(s: socket.socket) -> None:
    """A refused connection: closed at once, nothing of the request read or answered."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        s.sendall(HEAD)
    assert wait_closed(s, SLACK) == b""


def fill(server: EdgeServer, opened: list[socket.socket], n: int) -> list[socket.socket]:
    """``n`` connections, each known to be admitted: it has been answered."""
    conns = [connect(server, opened) for _ in range(n)]
    for s in conns:
        assert request(s) == (200, b"hello")
    return conns


def test_connections_beyond_the_cap_are_closed_at_once_while_those_under_it_work(
        edge: Edge, sockets: Sockets) -> None:
    # A head timeout far above the test's bounds: only the cap can close a connection here.
    server = edge(head_timeout_s=60, timeout_keep_alive=60)
    conns = fill(server, sockets, CAP)
    for _ in range(3):
        assert_refused(connect(server, sockets))
    for s in conns:
        assert request(s) == (200, b"hello")


def test_the_cap_counts_only_open_connections(edge: Edge, sockets: Sockets) -> None:
    server = edge(head_timeout_s=60, timeout_keep_alive=60)
    conns = fill(server, sockets, CAP)
    assert_refused(connect(server, sockets))
    for s in conns[:5]:
        s.close()
    # The server learns of the closes a moment later; until then a newcomer may still be refused.
    admitted: list[socket.socket] = []

    def one_more_admitted() -> bool:
        s = connect(server, sockets)
        with contextlib.suppress(EOFError, ConnectionResetError, BrokenPipeError):
            assert request(s) == (200, b"hello")
            admitted.append(s)
        return len(admitted) == 5

    wait_for(one_more_admitted, timeout=SLACK, interval=0.05,
             what=lambda: f"5 freed slots reused (only {len(admitted)} were)")
    assert_refused(connect(server, sockets))


def test_a_legitimate_client_is_served_once_slow_connections_are_reaped(edge: Edge, sockets: Sockets) -> None:
    server = edge()
    t0 = time.monotonic()
    slow = [connect(server, sockets) for _ in range(CAP + 10)]
    for s in slow:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(HEAD[:10])
    served: list[httpx.Response] = []
    fresh = httpx.Limits(max_keepalive_connections=0)  # every attempt a new connection
    with httpx.Client(base_url=server.url, timeout=5, limits=fresh) as http:

        def served_once() -> bool:
            with contextlib.suppress(httpx.TransportError):
                served.append(http.get("/hello"))
            return bool(served)

        wait_for(served_once, timeout=HEAD_TIMEOUT + SLACK - (time.monotonic() - t0),
                 interval=0.02, what="the legitimate client being served")
    assert (served[0].status_code, served[0].text) == (200, "hello")
    for s in slow:  # every slow one: refused at once, or reaped by the head deadline
        assert wait_closed(s, HEAD_TIMEOUT + SLACK) == b""


# --- what uvicorn is told ---------------------------------------------------------------------


def test_forwarded_headers_are_left_to_the_app_and_no_server_header_is_sent(edge: Edge) -> None:
    server = edge()
    resp = httpx.get(server.url + "/client", headers={"x-forwarded-for": "203.0.113.7"}, timeout=10)
    assert resp.json() == {"client": "127.0.0.1"}
    assert "server" not in resp.headers


def test_the_config_keeps_uvicorns_keep_alive_and_takes_host_and_port_from_settings() -> None:
    settings = Settings(server=ServerSettings(host="127.0.0.2", port=8123))
    config = uvicorn_config(APP, settings, log_level="info")
    assert (config.host, config.port) == ("127.0.0.2", 8123)
    assert config.timeout_keep_alive == uvicorn.Config(APP).timeout_keep_alive
    assert (config.proxy_headers, config.server_header, config.access_log) == (False, False, False)
    assert config.log_level == "info"


SERVE_SCRIPT = textwrap.dedent("""
    import signal, sys
    from starlette.applications import Starlette
    from broker.cli import _unwind_on_sigterm
    from broker.api.server import serve
    from broker.settings import Settings

    signal.signal(signal.SIGTERM, _unwind_on_sigterm)
    try:
        serve(Starlette(), Settings(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
    finally:
        print("unwound", flush=True)
""")


def test_serve_stops_on_sigterm_and_the_cli_handler_makes_it_exit_0() -> None:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def listening() -> bool:
            assert proc.poll() is None, proc.communicate()
            try:
                socket.create_connection((HOST, port), timeout=1).close()
            except OSError:
                return False
            return True

        wait_for(listening, timeout=30, interval=0.05, what="serve's start")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert b"unwound" in out


def test_a_cap_the_open_file_limit_cannot_hold_is_warned_about(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # Past the open-file limit accept() fails before the cap is reached: the cap would never act.
    import resource

    from broker.api import server

    monkeypatch.setattr(resource, "getrlimit", lambda _which: (1024, 1024))
    with caplog.at_level(logging.WARNING, logger="broker.server"):
        server._warn_if_fd_limit_is_below_cap(512)
        assert caplog.records == []
        server._warn_if_fd_limit_is_below_cap(4096)
    assert "ulimit -n" in caplog.text
