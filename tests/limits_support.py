"""What the tests of shared limits share: a Redis that must answer (a run without one fails
rather than skips: CI has one), a key prefix per test, the three stores, replicas (each with
its own client or engine of one store), and histories to play on them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pytest
import redis
from redis.exceptions import RedisError

from broker.errors import RateLimited
from broker.identity.credentials import EventWindow
from broker.identity.policy import Burst, Policy, Rate
from broker.money.limits import Limiter
from broker.money.limits_db import DatabaseLimiter, DatabaseWindow
from broker.money.limits_redis import RedisLimiter, RedisStore, RedisWindow
from broker.storage.db import Database, make_engine

REDIS_URL = os.environ.get("BROKER_TEST_REDIS", "redis://127.0.0.1:6379/0")
LEASE_S = 600.0  # sweeper.max_request_s's default: a running request's lease
T0 = 1_000_000.0  # the tests' clock starts here (any value works: it is passed in)
TIMEOUT_S = 5.0  # generous: this machine is shared, and a slow answer here is not the point

R = TypeVar("R")


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except RedisError as exc:
        pytest.fail(f"Redis does not answer at {REDIS_URL} ({type(exc).__name__}): these tests "
                    "need it (CI runs one); set BROKER_TEST_REDIS to point elsewhere")
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys (and only those) are deleted after it."""
    prefix = f"test-limits-{secrets.token_hex(6)}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@dataclass(frozen=True)
class Store:
    kind: str  # redis | database
    url: str
    prefix: str = ""


@pytest.fixture(params=["redis", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest) -> Store:
    if request.param == "redis":
        return Store("redis", request.getfixturevalue("redis_url"),
                     request.getfixturevalue("redis_prefix"))
    url: str = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    return Store("database", url)


@dataclass
class Replica:
    """What one broker process would hold: its limiter and an event window, on its own client
    or engine of the shared store."""

    limiter: RedisLimiter | DatabaseLimiter
    window: EventWindow
    close: Callable[[], Awaitable[None]]
    db: Database | None = None


@contextlib.asynccontextmanager
async def replicas(store: Store, n: int = 2, *, limit: int = 3, window_s: int = 300,
                   lease_s: float = LEASE_S) -> AsyncIterator[list[Replica]]:
    made: list[Replica] = []
    try:
        for _ in range(n):
            if store.kind == "redis":
                shared = RedisStore(store.url, prefix=store.prefix, timeout_s=TIMEOUT_S)
                made.append(Replica(RedisLimiter(shared, lease_s=lease_s),
                                    RedisWindow(shared, "events", limit, window_s), shared.aclose))
            else:
                db = Database(make_engine(store.url))

                async def dispose(db: Database = db) -> None:
                    db.dispose()

                made.append(Replica(DatabaseLimiter(db, lease_s=lease_s, timeout_s=TIMEOUT_S),
                                    DatabaseWindow(db, "events", limit, window_s,
                                                   timeout_s=TIMEOUT_S), dispose, db))
        yield made
    finally:
        for replica in made:
            await replica.close()


def run(body: Callable[[], Awaitable[R]]) -> R:
    async def main() -> R:
        return await body()

    return asyncio.run(main())


def policy_of(rpm: int | None = None, tpm: int | None = None, burst: tuple[int, int] | None = None,
            max_concurrent: int | None = None) -> Policy:
    return Policy(rate=Rate(rpm=rpm, tpm=tpm), max_concurrent=max_concurrent,
                  burst=Burst(window_s=burst[0], limit_micros=burst[1]) if burst else None)


# --- a history of admissions and settlements, played on one limiter or on replicas ----------


@dataclass(frozen=True)
class Admit:
    replica: int
    at: float
    tokens: int = 0
    micros: int = 0
    key: str = "wl_a"
    group: str | None = None
    cap: int | None = None


@dataclass(frozen=True)
class Settle:
    replica: int
    admission: int  # the index of its Admit in the history
    at: float
    tokens: int = 0
    micros: int = 0


Outcome = tuple[str, int]  # ("ok", 0) or ("refused", retry-after)


async def play(limiters: list[Limiter], policy: Policy,
               history: list[Admit | Settle]) -> list[Outcome]:
    out: list[Outcome] = []
    tickets: dict[int, tuple[str, Admit]] = {}
    for i, step in enumerate(history):
        limiter = limiters[step.replica % len(limiters)]
        if isinstance(step, Admit):
            try:
                ticket = await limiter.admit(step.key, policy, tokens=step.tokens,
                                             cost_micros=step.micros, now=T0 + step.at,
                                             group=step.group, group_cap=step.cap)
            except RateLimited as refused:
                out.append(("refused", int(refused.headers["retry-after"])))
                continue
            tickets[i] = (ticket, step)
            out.append(("ok", 0))
        else:
            ticket, admitted = tickets.pop(step.admission)
            await limiter.settle(admitted.key, policy, ticket=ticket, held_tokens=admitted.tokens,
                                 used_tokens=step.tokens, held_micros=admitted.micros,
                                 used_micros=step.micros, now=T0 + step.at, group=admitted.group)
            out.append(("ok", 0))
    return out
