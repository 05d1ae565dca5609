"""Fixtures: one real OpenBao dev server per session, real SQLite and PostgreSQL databases, and
brokers served in-process (TestClient) or on a real port (uvicorn in a thread)."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import httpx
import psycopg
import pytest
import uvicorn
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from starlette.testclient import TestClient

from broker.api.app import create_app
from broker.api.server import uvicorn_config
from broker.devvault import DevVault, free_port
from broker.money.sweeper import sweep_once
from broker.services import Services
from broker.settings import Settings, load_settings
from broker.storage.db import Database, make_engine, migrate
from tests.fake_issuer import fake_issuer, fake_issuer_server  # noqa: F401  (fixtures)
from tests.fake_provider import (
    FakeProviderServer,
    module_fake,  # noqa: F401  (a fixture)
)
from tests.sdk_support import sdk  # noqa: F401  (a fixture)
from tests.support import wait_for
from tests.vault_support import approle  # noqa: F401  (a fixture)

if TYPE_CHECKING:  # gateway_support imports this module
    from tests.gateway_support import Env

# Property tests search at random when asked (``HYPOTHESIS_PROFILE=explore``, with many more
# examples); the default run replays a fixed sequence, so a CI verdict does not depend on luck.
# A counterexample found while exploring becomes a named test. Neither profile has a clock in
# it (no per-example deadline, no "generation is slow" check): this machine is shared and
# noisy, and a verdict must not depend on how busy it was.
_NO_CLOCK = hypothesis_settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.register_profile("default", parent=_NO_CLOCK, derandomize=True)
hypothesis_settings.register_profile("explore", parent=_NO_CLOCK, max_examples=5_000,
                                     derandomize=False)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

PG_ADMIN_URL = os.environ.get("BROKER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
ADMIN_SECRET = "bootstrap-" + secrets.token_urlsafe(32)


# --- a record of every secret the run created, for the leak scan ----------------------------


class SecretLedger:
    def __init__(self) -> None:
        self.values: set[str] = set()

    def add(self, value: str) -> str:
        if value:
            self.values.add(value)
        return value


SECRETS = SecretLedger()
SECRETS.add(ADMIN_SECRET)


@pytest.fixture(scope="session")
def secret_ledger() -> SecretLedger:
    return SECRETS


# --- a record of every log line, for the leak scan ------------------------------------------
# A record factory (not a handler) sees the records of every logger, including uvicorn's, whose
# loggers do not propagate and whose handlers each ``uvicorn.Config`` replaces.

LOGS: list[str] = []
_LOG_FORMAT = logging.Formatter("%(levelname)s %(name)s %(message)s")
_make_record = logging.getLogRecordFactory()


def _recording_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _make_record(*args, **kwargs)
    try:
        LOGS.append(_LOG_FORMAT.format(record))
    except Exception:
        LOGS.append(f"{record.name} {record.msg!r} {record.args!r}")
    return record


logging.setLogRecordFactory(_recording_factory)
logging.getLogger().setLevel(logging.DEBUG)
# At DEBUG SQLAlchemy would echo every statement: a test-only cost the broker never pays.
logging.getLogger("sqlalchemy").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def recorded_logs() -> list[str]:
    return LOGS


# --- OpenBao ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def vault() -> Iterator[DevVault]:
    with DevVault() as dev:
        SECRETS.add(dev.root_token)
        yield dev


# --- databases -------------------------------------------------------------------------------


def _pg_admin() -> psycopg.Connection[Any]:
    return psycopg.connect(PG_ADMIN_URL.replace("postgresql+psycopg", "postgresql"), autocommit=True)


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated PostgreSQL database that each test copies (CREATE DATABASE ... TEMPLATE)."""
    name = f"broker_tpl_{secrets.token_hex(4)}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    engine = make_engine(url)
    migrate(engine)
    engine.dispose()
    yield name
    with _pg_admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    name = f"broker_t_{secrets.token_hex(4)}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with _pg_admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/broker.db"
    engine = make_engine(url)
    migrate(engine)
    engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Storage tests run on both backends."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    url: str = request.getfixturevalue(name)
    return url


# --- the fake model provider ----------------------------------------------------------------


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    """A database of each backend, migrated, for tests of storage and domain code without a
    broker around it (a module may override it with its own)."""
    database = Database(make_engine(db_url))
    yield database
    database.dispose()


@pytest.fixture
def fake() -> Iterator[FakeProviderServer]:
    """A fake model provider of its own for each test, on a real port: no fault, recorded
    request or call still running can reach another test. A module that needs it configured
    differently overrides this fixture by asking for it (``def fake(fake): ...``)."""
    with FakeProviderServer() as server:
        yield server


# --- settings and brokers --------------------------------------------------------------------


def make_settings(db: str, dev_vault: DevVault, **sections: dict[str, Any]) -> Settings:
    overrides: dict[str, Any] = {
        "database": {"url": db},
        "vault": {"addr": dev_vault.addr, "token": dev_vault.root_token,
                  "prefix": f"t-{secrets.token_hex(6)}"},
        "issuer": {"url": "http://broker.test", "audience": "ai-broker"},
        "sweeper": {"interval_s": 0.2},
    }
    for name, values in sections.items():
        overrides[name] = {**overrides.get(name, {}), **values}
    overrides["bootstrap_admin_secret"] = ADMIN_SECRET
    return load_settings(path=Path(__file__).parent / "data" / "test.toml", env={}, overrides=overrides)


class Closeable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closeable)


class Broker:
    """A broker under test: its settings, services and an HTTP client bound to it."""

    def __init__(self, settings: Settings, services: Services, client: Any, url: str | None = None):
        self.settings = settings
        self.services = services
        self.client = client
        self.url = url
        self._admin: tuple[str, float] | None = None
        self._opened: list[Closeable] = []

    def opened(self, client: C) -> C:
        """``client`` (an SDK or HTTP client a test made for this broker), closed with the
        broker: a client left to the garbage collector leaks its sockets (ResourceWarning)."""
        self._opened.append(client)
        return client

    def close_opened(self) -> None:
        while self._opened:
            self._opened.pop().close()

    def sweep(self, now: int | None = None) -> tuple[int, int]:
        """One sweeper pass, as the scheduler runs it: (slices released, orphaned holds settled)."""
        svc = self.services
        return sweep_once(svc.db, svc.settings.sweeper, svc.metrics, now=now)

    def admin_token(self) -> str:
        return self.token("admin", ADMIN_SECRET)

    def cached_admin_token(self) -> str:
        """One admin token reused while it has a while to live, as a real operator would: the
        broker caps an identity's live tokens and the tokens a client may obtain per minute."""
        if self._admin is None or self._admin[1] < time.monotonic():
            self._admin = (self.admin_token(), time.monotonic() + 120)
        return self._admin[0]

    def forget_admin_token(self) -> None:
        """For tests that change the admin identity (which ends its live tokens)."""
        self._admin = None

    def token(self, client_id: str, secret: str, **params: Any) -> str:
        resp = self.client.post(
            "/v1/token",
            data={"grant_type": "client_credentials", "client_id": client_id,
                  "client_secret": secret, **{k: str(v) for k, v in params.items()}},
        )
        assert resp.status_code == 200, resp.text
        token: str = resp.json()["access_token"]
        return SECRETS.add(token)

    def admin(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.cached_admin_token()}"}

    def create_tenant(self, name: str | None = None, **body: Any) -> dict[str, Any]:
        resp = self.client.post(
            "/v1/admin/tenants", json={"name": name or f"t-{secrets.token_hex(4)}", **body},
            headers=self.admin(),
        )
        assert resp.status_code == 201, resp.text
        out: dict[str, Any] = resp.json()
        return out

    def create_workload(self, tenant_id: str, kind: str = "agent", **body: Any) -> dict[str, Any]:
        payload = {"tenant_id": tenant_id, "name": f"w-{secrets.token_hex(4)}", "kind": kind, **body}
        resp = self.client.post("/v1/admin/workloads", json=payload, headers=self.admin())
        assert resp.status_code == 201, resp.text
        out: dict[str, Any] = resp.json()
        SECRETS.add(out["client_secret"])
        return out


class _LoggingClient:
    """Wraps a client and keeps every response body and header for the leak scan."""

    def __init__(self, inner: Any, sink: list[str]):
        self._inner = inner
        self._sink = sink

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        resp: httpx.Response = self._inner.request(method, url, **kw)
        self._sink.append(str(dict(resp.headers)) + resp.text)
        return resp

    def get(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("POST", url, **kw)

    def patch(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("PATCH", url, **kw)

    def delete(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("DELETE", url, **kw)


RESPONSES: list[str] = []


@pytest.fixture(scope="session")
def recorded_responses() -> list[str]:
    return RESPONSES


BrokerFactory = Callable[..., Broker]


@pytest.fixture
def make_broker(vault: DevVault) -> Iterator[BrokerFactory]:
    """Build brokers on a given database URL; each gets its own Vault prefix."""
    stack = contextlib.ExitStack()

    def factory(db: str, **sections: dict[str, Any]) -> Broker:
        settings = make_settings(db, vault, **sections)
        services = Services.build(settings)
        stack.callback(services.close)
        app = create_app(settings, services=services)
        client = stack.enter_context(TestClient(app, base_url="http://broker.test"))
        broker = Broker(settings, services, _LoggingClient(client, RESPONSES))
        stack.callback(broker.close_opened)
        return broker

    yield factory
    stack.close()


@pytest.fixture
def broker(make_broker: BrokerFactory, db_url: str) -> Broker:
    return make_broker(db_url)


@pytest.fixture
def sqlite_broker(make_broker: BrokerFactory, sqlite_url: str) -> Broker:
    return make_broker(sqlite_url)


class LiveServer:
    """uvicorn on a real port in a background thread, configured as ``broker serve`` is (the
    server edge's limits, no proxy headers)."""

    def __init__(self, app: Any, settings: Settings, port: int | None = None):
        self.port = free_port() if port is None else port
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(app, settings, host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="on", timeout_graceful_shutdown=2,
                                backlog=2048)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), timeout=20,
                 what="the live broker's start")
        assert self.server.started, "the live broker's thread ended during its start"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def make_live_broker(vault: DevVault) -> Iterator[Callable[..., Broker]]:
    servers: list[LiveServer] = []
    closers: list[Callable[[], None]] = []

    def factory(db: str, port: int | None = None, **sections: dict[str, Any]) -> Broker:
        """``port``: listen there (a test that must name the broker's URL in its settings,
        e.g. as ``issuer.url``, picks it first with ``free_port``)."""
        settings = make_settings(db, vault, **sections)
        services = Services.build(settings)
        closers.append(services.close)
        app = create_app(settings, services=services)
        server = LiveServer(app, settings, port).start()
        servers.append(server)
        client = httpx.Client(base_url=server.url, timeout=30)
        closers.append(client.close)
        broker = Broker(settings, services, _LoggingClient(client, RESPONSES), url=server.url)
        closers.append(broker.close_opened)
        return broker

    yield factory
    for server in servers:
        server.stop()
    for close in closers:
        close()


# --- a live broker with its fake provider -----------------------------------------------------


@pytest.fixture
def env(make_live_broker: Callable[..., Broker], sqlite_url: str, fake: FakeProviderServer) -> Env:
    """A live broker on SQLite in front of this test's fake provider, with an agent and a key."""
    from tests.gateway_support import make_env

    return make_env(make_live_broker, sqlite_url, fake)


@pytest.fixture
def both(make_live_broker: Callable[..., Broker], db_url: str, fake: FakeProviderServer) -> Env:
    """The same on each backend (SQLite and PostgreSQL)."""
    from tests.gateway_support import make_env

    return make_env(make_live_broker, db_url, fake)
