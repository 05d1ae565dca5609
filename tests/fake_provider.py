"""Run the fake model provider (`plugins.mock_upstream`) as a real HTTP server for tests.

A real socket matters: the gateway's streaming, timeouts and broken-connection handling are only
exercised over TCP, never through an in-process transport.

    with FakeProviderServer() as fake:
        fake.state.faults.status = 500
        ...  # point a provider at fake.url + "/v1"
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from types import TracebackType

import pytest
import uvicorn

from plugins.mock_upstream import MockState, create_mock_upstream
from tests.support import wait_for

HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (e.g. for connection-refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class FakeProviderServer:
    """`create_mock_upstream(state)` under uvicorn in a background thread.

    The state is shared with the server thread: the test mutates `state.faults` and reads
    `state.received_keys` / `state.requests` while the server runs.
    """

    def __init__(self, state: MockState | None = None, *,
                 tls: tuple[str, str] | None = None) -> None:
        """``tls``: (certificate file, key file) to serve HTTPS, as real providers do."""
        self.state = state if state is not None else MockState()
        self.tls = tls
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.port}"

    def start(self) -> FakeProviderServer:
        # Binding the socket ourselves (port 0) leaves no window for another process to take
        # the port between choosing it and listening on it.
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that name it, and
        # without it every small response waits ~40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            create_mock_upstream(self.state),
            lifespan="off",
            log_level="warning",
            # A test that stops the server mid-stream must not hang on the open connection.
            timeout_graceful_shutdown=1,
            ssl_certfile=self.tls[0] if self.tls else None,
            ssl_keyfile=self.tls[1] if self.tls else None,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="fake-provider", daemon=True
        )
        self._server, self._thread, self._socket = server, thread, sock
        thread.start()
        self._wait_until_serving()
        return self

    def _wait_until_serving(self) -> None:
        assert self._server is not None and self._thread is not None
        server, thread = self._server, self._thread

        def serving() -> bool:
            if not thread.is_alive():
                raise RuntimeError("the fake provider exited during start-up")
            if not server.started:
                return False
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
            except OSError:
                return False
            return True

        try:
            wait_for(serving, START_TIMEOUT_S, what="the fake provider's start")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def reset(self) -> None:
        """Forget recorded keys and requests and clear every fault; valid keys are kept."""
        self.state.reset()

    def __enter__(self) -> FakeProviderServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@pytest.fixture(scope="module")
def module_fake() -> Iterator[FakeProviderServer]:
    """One fake for a module whose tests talk to it alone and leave no call running: cheaper
    than a server per test. Such a module's own ``fake`` fixture hands it out :func:`fresh`."""
    with FakeProviderServer() as server:
        yield server


def fresh(server: FakeProviderServer) -> FakeProviderServer:
    """The shared fake as a new one: no fault, recorded request or key check left over."""
    server.reset()
    server.state.valid_keys = None
    return server
