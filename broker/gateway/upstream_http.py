"""The HTTP client of the provider hop: httpx's transport and httpcore's HTTP/1.1 on a lean
asyncio network layer.

The gateway pays for the provider hop on every call, and httpx's stock client on anyio cost
about 0.8 ms of CPU per request on this path. Most of it goes to three things this module
replaces, keeping httpx's request, response and exception types (so the gateway, the stream
meter and the plugins see the same objects) and httpcore's HTTP/1.1 state machine:

* the client layer (URL merging, default headers, cookies, auth and redirect flows): the gateway
  builds its :class:`httpx.Request` itself and hands it to the transport; redirects were never
  followed, and provider cookies are not carried from one tenant's call to the next;
* the network stream: asyncio's protocol callbacks instead of anyio's stream wrappers, timeouts
  as one timer on a future instead of a cancel scope per read, and the request's head and body
  written in one ``send`` (httpcore writes them separately: two syscalls, and the provider woken
  twice);
* the pool's liveness checks: httpcore asks every pooled connection whether its socket is
  readable (an ``extra_attributes`` dict, a ``getpeername`` and a new ``poll`` object each)
  twice per request, and counts the pool once per idle connection. Here only the connection
  about to be reused is checked, from what the event loop already read plus one ``poll(2)`` on
  a poll object registered at connect, and the full clean-up runs at most every :data:`SWEEP_S`.

Used only when no proxy is configured in the environment (httpx's client honours
``HTTP(S)_PROXY``; the gateway then keeps using it).
"""

from __future__ import annotations

import asyncio
import select
import socket
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import httpcore
import httpx

SWEEP_S = 1.0  # the pool's full clean-up (expired and surplus idle connections), at most this often
READ_HIGH_WATER = 256 * 1024  # stop reading the socket while this much is buffered
WRITE_BUFFER = 64 * 1024  # request bytes held back to be written together
# LeanPool overrides a private method of httpcore's pool, written against httpcore 1.0: any
# other version gets the stock pool logic (on the same network layer).
_POOL_COMPATIBLE = httpcore.__version__.startswith("1.0.")


def environment_has_proxy() -> bool:
    """Whether the environment names an HTTP(S) proxy (then the stock httpx client is used)."""
    proxies = urllib.request.getproxies()
    return any(k in proxies for k in ("http", "https", "all"))


class _Protocol(asyncio.Protocol):
    """Buffers what the socket delivers and wakes the one reader waiting for it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.reader: asyncio.Future[None] | None = None
        self.drain: asyncio.Future[None] | None = None
        self.write_paused = False
        self.read_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have asyncio.Transport's interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > READ_HIGH_WATER and self.transport is not None and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        self.eof = True
        self._wake()
        return False  # close the transport: HTTP/1.1 has no half-closed use here

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake()
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)

    def _wake(self) -> None:
        if self.reader is not None and not self.reader.done():
            self.reader.set_result(None)


def _expire(future: asyncio.Future[None], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


async def _wait(future: asyncio.Future[None], timeout: float | None, error: Exception) -> None:
    """Await ``future``, failing with ``error`` after ``timeout`` seconds (one timer, no scope)."""
    if timeout is None:
        await future
        return
    timer = asyncio.get_running_loop().call_later(timeout, _expire, future, error)
    try:
        await future
    finally:
        timer.cancel()


class AsyncioStream(httpcore.AsyncNetworkStream):
    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._sock: Any = transport.get_extra_info("socket")
        # Registered once: the liveness check is then a single poll(2) call.
        self._poll: select.poll | None = None
        fd = self._sock.fileno() if self._sock is not None else -1
        if fd >= 0:
            self._poll = select.poll()
            self._poll.register(fd, select.POLLIN)
        self._pending: list[bytes] = []
        self._pending_size = 0

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._pending:
            await self._flush(timeout)
        p = self._protocol
        if not p.buffer and not p.eof:
            p.reader = asyncio.get_running_loop().create_future()
            try:
                await _wait(p.reader, timeout, httpcore.ReadTimeout("timed out reading"))
            finally:
                p.reader = None
        if p.buffer:
            if len(p.buffer) <= max_bytes:
                data = bytes(p.buffer)
                p.buffer.clear()
            else:
                data = bytes(p.buffer[:max_bytes])
                del p.buffer[:max_bytes]
            if p.read_paused and len(p.buffer) <= READ_HIGH_WATER // 4:
                p.read_paused = False
                self._transport.resume_reading()
            return data
        if p.error is not None:
            raise httpcore.ReadError(str(p.error) or type(p.error).__name__)
        return b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        # Held back until the response is read (or enough piles up): httpcore writes a request's
        # head and body separately, and one send wakes the provider once.
        if not buffer:
            return
        self._pending.append(buffer)
        self._pending_size += len(buffer)
        if self._pending_size >= WRITE_BUFFER:
            await self._flush(timeout)

    async def _flush(self, timeout: float | None) -> None:
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        p = self._protocol
        if p.error is not None or self._transport.is_closing():
            raise httpcore.WriteError("the connection is closed")
        self._transport.write(data)
        if p.write_paused:
            p.drain = asyncio.get_running_loop().create_future()
            try:
                await _wait(p.drain, timeout, httpcore.WriteTimeout("timed out writing"))
            finally:
                p.drain = None
            if p.error is not None:
                raise httpcore.WriteError(str(p.error) or type(p.error).__name__)

    async def aclose(self) -> None:
        self._pending.clear()
        self._transport.close()

    async def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            transport = await asyncio.wait_for(
                loop.start_tls(self._transport, self._protocol, ssl_context,
                               server_hostname=server_hostname),
                timeout,
            )
        except TimeoutError:
            self._transport.close()
            raise httpcore.ConnectTimeout("timed out in the TLS handshake") from None
        except (OSError, ConnectionError) as exc:
            self._transport.close()
            raise httpcore.ConnectError(str(exc)) from None
        if transport is None:
            raise httpcore.ConnectError("the TLS handshake did not complete")
        self._protocol.transport = transport
        return AsyncioStream(transport, self._protocol)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            return self._readable()
        if info == "ssl_object":
            return self._transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._transport.get_extra_info("sockname")
        if info == "server_addr":
            return self._transport.get_extra_info("peername")
        if info == "socket":
            return self._sock
        return None

    def _readable(self) -> bool:
        """What httpcore's ``is_readable`` answers: an idle connection with something to read
        (the provider closed it, or sent bytes nobody asked for) must not be reused. The event
        loop has read the socket up to its last poll; a peek covers what arrived since."""
        p = self._protocol
        if p.buffer or p.eof or self._transport.is_closing():
            return True
        if self._poll is None:
            return True
        try:
            return bool(self._poll.poll(0))  # POLLIN, or POLLHUP / POLLERR on a dead socket
        except OSError:
            return True


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await asyncio.wait_for(
                loop.create_connection(
                    _Protocol, host, port,
                    local_addr=(local_address, 0) if local_address else None,
                ),
                timeout,
            )
        except TimeoutError:
            raise httpcore.ConnectTimeout("timed out connecting") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # asyncio sets TCP_NODELAY already; set it again for transports that do not.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for option in socket_options or ():
                sock.setsockopt(*option)
        return AsyncioStream(transport, protocol)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not used by the gateway")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class LeanPool(httpcore.AsyncConnectionPool):
    """httpcore's pool, checking only the connection it is about to reuse on each request."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._next_sweep = 0.0

    def _assign_requests_to_connections(self) -> list[httpcore.AsyncConnectionInterface]:
        now = time.monotonic()
        if not _POOL_COMPATIBLE or now >= self._next_sweep:
            # The stock pass: drops closed, expired and surplus idle connections everywhere.
            self._next_sweep = now + SWEEP_S
            return super()._assign_requests_to_connections()
        closing: list[httpcore.AsyncConnectionInterface] = []
        connections = self._connections
        for pool_request in self._requests:
            if not pool_request.is_queued():
                continue
            origin = pool_request.request.url.origin
            chosen = None
            for connection in list(connections):
                if connection.is_closed():
                    connections.remove(connection)
                elif connection.can_handle_request(origin) and connection.is_available():
                    if connection.has_expired():
                        connections.remove(connection)
                        closing.append(connection)
                        continue
                    chosen = connection
                    break
            if chosen is None and len(connections) >= self._max_connections:
                idle = next((c for c in connections if c.is_idle()), None)
                if idle is None:
                    continue  # stays queued until a connection frees up
                connections.remove(idle)
                closing.append(idle)
            if chosen is None:
                chosen = self.create_connection(origin)
                connections.append(chosen)
            pool_request.assign_to_connection(chosen)
        return closing


def lean_transport(limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """An HTTP/1.1 transport with httpx's TLS defaults (certifi, verification on) on the pool and
    network layer above."""
    transport = httpx.AsyncHTTPTransport(limits=limits, http1=True, http2=False)
    transport._pool = LeanPool(
        ssl_context=httpx.create_ssl_context(),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        http1=True,
        http2=False,
        network_backend=AsyncioBackend(),
    )
    return transport


# Headers httpx's client adds to every request; sent as before (the provider's own win).
DEFAULT_HEADERS: tuple[tuple[str, str], ...] = (
    ("accept", "*/*"),
    ("accept-encoding", "gzip, deflate"),
    ("connection", "keep-alive"),
    ("user-agent", f"python-httpx/{httpx.__version__}"),
)


CONNECT_TIMEOUT_S = 10.0
KEEPALIVE_PER_PROVIDER = 200


@dataclass(frozen=True)
class Upstream:
    """One provider's way out: the sender, the timeouts, the parsed URLs it was given."""

    send: Callable[[httpx.Request], Awaitable[httpx.Response]]
    extensions: dict[str, Any]
    urls: dict[str, httpx.URL]

    def request(self, url: str, headers: Mapping[str, str], content: bytes) -> httpx.Request:
        parsed = self.urls.get(url)
        if parsed is None:
            if len(self.urls) >= 64:
                self.urls.clear()
            parsed = self.urls[url] = httpx.URL(url)
        present = {k.lower() for k in headers}
        merged = [(k, v) for k, v in DEFAULT_HEADERS if k not in present]
        merged.extend(headers.items())
        return httpx.Request("POST", parsed, headers=merged, content=content,
                             extensions=self.extensions)


class ProviderPools:
    """A connection pool per provider, built on first use and shared by its calls, so that
    calls held open on one provider (long streams) cannot starve the others."""

    def __init__(self) -> None:
        self._upstreams: dict[str, Upstream] = {}
        self._closers: list[Callable[[], Awaitable[None]]] = []

    def get(self, name: str, transport: httpx.AsyncBaseTransport | None, *, timeout_s: float,
            max_connections: int) -> Upstream:
        up = self._upstreams.get(name)
        if up is not None:
            return up
        limits = httpx.Limits(max_connections=max_connections,
                              max_keepalive_connections=min(max_connections,
                                                            KEEPALIVE_PER_PROVIDER))
        send: Callable[[httpx.Request], Awaitable[httpx.Response]]
        if transport is None and not environment_has_proxy():
            # The network path: the lean transport, called directly.
            lean = lean_transport(limits)
            self._closers.append(lean.aclose)
            send = lean.handle_async_request
        else:
            # In-process providers, or a proxy from the environment: httpx's client as is.
            # Redirects are never followed: the provider key must reach only the configured URL.
            client = httpx.AsyncClient(transport=transport, follow_redirects=False, limits=limits)
            self._closers.append(client.aclose)

            async def send(request: httpx.Request) -> httpx.Response:
                return await client.send(request, stream=True)

        timeout = httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s),
                                pool=min(CONNECT_TIMEOUT_S, timeout_s)).as_dict()
        up = self._upstreams[name] = Upstream(send, {"timeout": timeout}, {})
        return up

    async def aclose(self) -> None:
        closers, self._closers = self._closers, []
        self._upstreams.clear()
        for close in closers:
            await close()
