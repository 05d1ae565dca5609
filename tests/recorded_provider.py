"""Recorded provider answers, replayed byte for byte by a real local HTTP server.

``tests/data/recorded/`` holds one provider answer per file, as the provider sent it: ``.json``
bodies of non-stream calls and ``.sse`` captures of streams (OpenAI chat ``data:`` chunks ending
with ``data: [DONE]``; OpenAI Responses and Anthropic Messages ``event:``/``data:`` pairs). A file's
name says which API answered it (``chat-``, ``responses-``, ``messages-``).

The server answers ``POST /v1/chat/completions``, ``/v1/responses`` and ``/v1/messages`` with the
recording named by the request body's ``model`` (the broker rewrites ``model`` to the configured
``upstream_model``: a test configures one broker model per recording, with ``upstream_model`` the
recording's name), the ``.sse`` capture when ``stream`` is true, else the ``.json`` body; a stream
is sent one event per write, as a provider sends it. Like a provider, it refuses a request without
an API key. Every request it received is kept in :attr:`RecordedProviderServer.received`.

    with RecordedProviderServer() as recorded:
        ...  # providers.openai.base_url = recorded.url + "/v1"; providers.anthropic: recorded.url
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fake_provider import HOST, FakeProviderServer

RECORDED = Path(__file__).parent / "data" / "recorded"
# Which recordings each route may answer with.
PREFIXES = {"/v1/chat/completions": "chat-", "/v1/responses": "responses-",
            "/v1/messages": "messages-"}
_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{0,127}")


@dataclass(frozen=True)
class Received:
    """One request as the provider got it."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def api_key(self) -> str | None:
        if self.path == "/v1/messages":
            return self.headers.get("x-api-key")
        scheme, _, key = self.headers.get("authorization", "").partition(" ")
        return key if scheme.lower() == "bearer" and key else None


def recording(name: str, *, stream: bool) -> Path:
    return RECORDED / f"{name}.{'sse' if stream else 'json'}"


def sse_events(raw: bytes) -> list[bytes]:
    """A capture cut into its events, each with its blank-line terminator."""
    return [event + b"\n\n" for event in raw.split(b"\n\n") if event]


def _error(path: str, status: int, kind: str, message: str) -> JSONResponse:
    if path == "/v1/messages":
        return JSONResponse({"type": "error", "error": {"type": kind, "message": message}},
                            status_code=status)
    return JSONResponse({"error": {"message": message, "type": kind, "param": None,
                                   "code": None}}, status_code=status)


def create_recorded_provider(received: list[Received]) -> Starlette:
    async def answer(request: Request) -> Response:
        path = request.url.path
        body = await request.json()
        entry = Received(path, dict(request.headers), body if isinstance(body, dict) else {})
        received.append(entry)
        if entry.api_key is None:
            kind = "authentication_error" if path == "/v1/messages" else "invalid_request_error"
            return _error(path, 401, kind, "missing API key")
        name, stream = entry.body.get("model"), entry.body.get("stream") is True
        if not (isinstance(name, str) and _NAME.fullmatch(name)
                and name.startswith(PREFIXES[path])
                and recording(name, stream=stream).is_file()):
            kind = "not_found_error" if path == "/v1/messages" else "invalid_request_error"
            return _error(path, 404, kind, f"no {'stream ' if stream else ''}recording named "
                                           f"{str(name)[:80]!r} for {path}")
        raw = recording(name, stream=stream).read_bytes()
        if not stream:
            return Response(raw, media_type="application/json")
        events = sse_events(raw)

        async def replay() -> Any:
            for event in events:
                yield event

        return StreamingResponse(replay(), media_type="text/event-stream; charset=utf-8")

    return Starlette(routes=[Route(path, answer, methods=["POST"]) for path in PREFIXES])


class RecordedProviderServer(FakeProviderServer):
    """The recordings under uvicorn in a background thread, run as the fake provider is (a
    socket bound before the server starts, the same start-up check and stop)."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[Received] = []

    def start(self) -> RecordedProviderServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(create_recorded_provider(self.received), lifespan="off",
                                log_level="warning", timeout_graceful_shutdown=1)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                                  name="recorded-provider", daemon=True)
        self._server, self._thread, self._socket = server, thread, sock
        thread.start()
        self._wait_until_serving()
        return self

    def reset(self) -> None:
        self.received.clear()

    def __enter__(self) -> RecordedProviderServer:
        return self.start()
