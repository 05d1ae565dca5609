"""The provider hop (:mod:`broker.gateway.upstream_http`) on both of its transports.

Without a proxy the gateway sends on its lean transport (httpcore's HTTP/1.1 on asyncio
protocols, measured in ``bench/bench_transport.py``); with ``HTTP(S)_PROXY`` in the environment,
or a provider that brings its own transport, it sends with httpx's own client. Both must speak
the same HTTP to a real socket: one request per connection turn, connections reused while the
provider keeps them open and never once it closed them, and httpx's timeout errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from broker.gateway.upstream_http import ProviderPools, environment_has_proxy

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                   "all_proxy", "NO_PROXY", "no_proxy")


@dataclass
class Origin:
    """A real HTTP/1.1 server on a socket: records each request line and connection."""

    close_after_answer: bool = False
    silent: bool = False
    lines: list[str] = field(default_factory=list)
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                length = 0
                while (header := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.lines.append(f"{line.decode().strip()} {body.decode()}")
                if self.silent:
                    await asyncio.sleep(30)
                answer = b'{"ok":true}'
                close = b"connection: close\r\n" if self.close_after_answer else b""
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + close
                             + b"content-length: " + str(len(answer)).encode() + b"\r\n\r\n" + answer)
                await writer.drain()
                if self.close_after_answer:
                    return
        finally:
            writer.close()


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    yield


async def _calls(origin: Origin, n: int, *, via_proxy: bool, monkeypatch: pytest.MonkeyPatch,
                 timeout_s: float = 5.0) -> list[str]:
    server = await asyncio.start_server(origin.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    if via_proxy:
        # The origin answers absolute-form requests itself, as a forward proxy would relay them.
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    assert environment_has_proxy() is via_proxy
    pools = ProviderPools()
    up = pools.get("p", None, timeout_s=timeout_s, max_connections=4)
    target = "http://provider.invalid" if via_proxy else f"http://127.0.0.1:{port}"
    bodies = []
    try:
        for i in range(n):
            resp = await up.send(up.request(f"{target}/v1/chat/completions",
                                            {"content-type": "application/json"}, b'{"n":%d}' % i))
            try:
                bodies.append((await resp.aread()).decode())
            finally:
                await resp.aclose()
    finally:
        await pools.aclose()
        server.close()
        await server.wait_closed()
    return bodies


@pytest.mark.parametrize("via_proxy", [False, True], ids=["lean", "httpx-client-via-proxy"])
def test_calls_reuse_one_connection_while_the_provider_keeps_it_open(
        no_proxy: None, monkeypatch: pytest.MonkeyPatch, via_proxy: bool) -> None:
    origin = Origin()
    bodies = asyncio.run(_calls(origin, 3, via_proxy=via_proxy, monkeypatch=monkeypatch))
    assert bodies == ['{"ok":true}'] * 3
    assert origin.connections == 1
    path = "http://provider.invalid/v1/chat/completions" if via_proxy else "/v1/chat/completions"
    assert origin.lines == [f'POST {path} HTTP/1.1 {{"n":{i}}}' for i in range(3)]


@pytest.mark.parametrize("via_proxy", [False, True], ids=["lean", "httpx-client-via-proxy"])
def test_a_connection_the_provider_closed_is_never_reused(
        no_proxy: None, monkeypatch: pytest.MonkeyPatch, via_proxy: bool) -> None:
    origin = Origin(close_after_answer=True)
    bodies = asyncio.run(_calls(origin, 3, via_proxy=via_proxy, monkeypatch=monkeypatch))
    assert bodies == ['{"ok":true}'] * 3
    assert origin.connections == 3


@pytest.mark.parametrize("via_proxy", [False, True], ids=["lean", "httpx-client-via-proxy"])
def test_a_provider_that_never_answers_is_an_httpx_read_timeout(
        no_proxy: None, monkeypatch: pytest.MonkeyPatch, via_proxy: bool) -> None:
    origin = Origin(silent=True)
    with pytest.raises(httpx.ReadTimeout):
        asyncio.run(_calls(origin, 1, via_proxy=via_proxy, monkeypatch=monkeypatch, timeout_s=0.3))
    assert len(origin.lines) == 1


def test_a_refused_connection_is_an_httpx_connect_error(no_proxy: None) -> None:
    async def scenario() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()  # nothing listens on the port any more
        pools = ProviderPools()
        up = pools.get("p", None, timeout_s=2, max_connections=1)
        try:
            await up.send(up.request(f"http://127.0.0.1:{port}/v1/x", {}, b"{}"))
        finally:
            await pools.aclose()

    with pytest.raises(httpx.ConnectError):
        asyncio.run(scenario())
