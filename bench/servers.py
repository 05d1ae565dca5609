"""Servers the benchmarks start in their own processes: ``python -m bench.servers <name> --port P``.

Each runs under uvicorn with the same settings as ``broker serve`` (broker/cli.py: one worker,
``log_level="info"``, no access log, no server header, uvicorn's default loop and HTTP parser), so
the only difference between a row of the table and the bare row is the application itself.
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def bare_app() -> Starlette:
    """The framework's ceiling: one route, no middleware, a small JSON answer."""

    async def bare(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/bare", bare, methods=["GET", "POST"])])


def mock_upstream_app() -> Starlette:
    from plugins.mock_upstream import create_mock_upstream

    return create_mock_upstream()


def jwks_app(path: str) -> Starlette:
    """An external issuer's key set (``GET /jwks``, the file at ``path`` as it was at start),
    and how many times it was fetched (``GET /fetches``): the broker should fetch it once."""
    with open(path, "rb") as handle:
        document = handle.read()
    fetches = 0

    async def jwks(request: Request) -> Response:
        nonlocal fetches
        fetches += 1
        return Response(document, media_type="application/json")

    async def count(request: Request) -> Response:
        return JSONResponse({"fetches": fetches})

    return Starlette(routes=[Route("/jwks", jwks), Route("/fetches", count)])


APPS: dict[str, Any] = {"bare": bare_app, "mock-upstream": mock_upstream_app, "jwks": jwks_app}


def serve(app: Any, host: str, port: int) -> None:
    # Keep in step with broker/cli.py:cmd_serve.
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False, server_header=False)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.servers")
    parser.add_argument("name", choices=sorted(APPS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--file", help="jwks: the JWKS document to serve")
    args = parser.parse_args()
    if args.name == "jwks" and not args.file:
        parser.error("jwks needs --file")
    serve(APPS[args.name](args.file) if args.name == "jwks" else APPS[args.name](), args.host, args.port)


if __name__ == "__main__":
    main()
