"""Limits shared by every replica (``limits.backend`` ``redis`` or ``database``): two limiters on
one store (two replicas) admit together what one in-memory limiter admits alone, never N times
it; simultaneous admissions on both never pass a cap; a dead replica's running requests stop
counting after their lease; failed secrets, issuance and gateway rates count across brokers; and
a store that does not answer refuses with a 503 in the caller's dialect, never a 500.

Redis is expected at 127.0.0.1:6379 (``BROKER_TEST_REDIS`` overrides): a run without it fails
rather than skips, as CI has one. Each test uses a key prefix of its own and deletes only its
keys. Time is injected wherever the limiter takes it: nothing sleeps through a window.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest
import redis.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from broker.api.auth import verify_bearer
from broker.devvault import free_port
from broker.errors import ConfigError, LimitsUnavailable, RateLimited
from broker.identity.credentials import EventWindow, FailureTracker, SlidingWindow
from broker.identity.policy import Policy
from broker.money.limits import InMemoryLimiter, Limiter
from broker.money.limits_db import DatabaseLimiter, DatabaseWindow, prune_once
from broker.money.limits_redis import RedisLimiter, RedisStore, RedisWindow
from broker.settings import load_settings
from broker.storage.db import Database, make_engine
from tests import limits_support
from tests.conftest import ADMIN_SECRET, SECRETS, Broker, BrokerFactory
from tests.limits_support import (
    LEASE_S,
    T0,
    Admit,
    Outcome,
    Settle,
    Store,
    play,
    policy_of,
    replicas,
    run,
)
from tests.test_replicas import start_replica

TEST_TOML = Path(__file__).parent / "data" / "test.toml"

# The fixtures of limits_support, found by pytest under these names.
redis_url = limits_support.redis_url
redis_prefix = limits_support.redis_prefix
store = limits_support.store


# --- the same history on one in-memory limiter and on two replicas --------------------------


def assert_like_one_limiter(store: Store, policy: Policy, history: list[Admit | Settle]) -> None:
    """Two replicas admit exactly what one in-memory limiter admits; where both refuse, the
    shared store's Retry-After is never earlier, and later by at most its bucketing (a
    sixtieth and a six-hundredth of the window) and a second of rounding."""
    alone = run(lambda: play([InMemoryLimiter()], policy, history))
    window = max(60, policy.burst.window_s if policy.burst is not None else 0)
    later = math.ceil(window / 60 + window / 600) + 1

    async def shared() -> list[Outcome]:
        async with replicas(store) as two:
            return await play([r.limiter for r in two], policy, history)

    together = run(shared)
    assert [o[0] for o in together] == [o[0] for o in alone], (together, alone)
    for (_, retry_shared), (_, retry_alone) in zip(together, alone, strict=True):
        assert retry_alone <= retry_shared <= retry_alone + later, (together, alone)


def test_two_replicas_admit_one_rpm_between_them(store: Store) -> None:
    history: list[Admit | Settle] = [Admit(i % 2, i * 0.5) for i in range(8)]  # 5 fit
    history += [Admit(1, 20.0), Admit(0, 59.0), Admit(1, 62.0), Admit(0, 62.5), Admit(1, 63.0)]
    assert_like_one_limiter(store, policy_of(rpm=5), history)


def test_two_replicas_hold_one_tpm_and_one_burst_window(store: Store) -> None:
    policy = policy_of(tpm=1000, burst=(120, 1000))
    history: list[Admit | Settle] = [
        Admit(0, 0.0, tokens=600, micros=600),
        Admit(1, 1.0, tokens=500),  # 600 held + 500: only the running request is in the way
        Admit(1, 1.5, micros=500),  # the burst window likewise
        Settle(0, 0, 2.0, tokens=100, micros=100),
        Admit(1, 3.0, tokens=500, micros=500),  # 100 used + 500 fits
        Admit(0, 4.0, tokens=500),  # 100 + 500 held + 500 > 1000
        Settle(1, 4, 5.0, tokens=500, micros=500),
        Admit(0, 6.0, tokens=500),  # 100 (at 2 s) must leave the minute: at 62 s
        Admit(1, 6.0, micros=500),  # 100 (at 2 s) must leave the 120 s window: at 122 s
        Admit(0, 20.0, tokens=1001),  # alone over the limit: the whole window
        Admit(1, 64.0, tokens=500),
        Admit(0, 124.0, micros=400),
    ]
    assert_like_one_limiter(store, policy, history)


def test_two_replicas_share_the_workloads_and_the_tenants_concurrency(store: Store) -> None:
    policy = policy_of(max_concurrent=3)

    def mine(replica: int, at: float, key: str = "wl_a") -> Admit:
        return Admit(replica, at, key=key, group="tn_a", cap=4)

    history: list[Admit | Settle] = [
        mine(0, 0.0), mine(0, 0.1), mine(1, 0.2),
        mine(1, 0.3),  # the workload's 3 are running, on both replicas
        mine(0, 0.4, key="wl_b"),  # the tenant's 4th
        mine(1, 0.5, key="wl_c"),  # the tenant is full
        Admit(1, 0.5, key="wl_c", group="tn_other", cap=4),  # another tenant is not
        Settle(1, 0, 1.0),  # admitted on replica 0, settled on replica 1
        mine(1, 1.1, key="wl_c"),
        mine(0, 1.2),  # the tenant is full again
    ]
    assert_like_one_limiter(store, policy, history)


# --- property: never less than exactly, never much more ------------------------------------


@dataclass
class _Exact:
    """The limits as stated, from the whole history; ``extra`` widens every window by what the
    shared stores may add (a bucket and the merge margin), giving the most they may count."""

    rpm: int
    tpm: int
    window_s: int
    limit: int
    calls: list[list[Any]]  # [at, tokens, micros, settled_at | None, used_tokens, used_micros]

    def fits(self, now: float, tokens: int, micros: int, *, extra: bool = False,
             running_done: bool = False) -> bool:
        def live(at: float, window: float) -> bool:
            return at > now - window - ((window / 60 + window / 600) if extra else 0)

        requests = sum(1 for c in self.calls if live(c[0], 60))
        used_t = used_m = 0
        for at, t, m, settled, ut, um in self.calls:
            if settled is None:
                used_t += 0 if running_done else t
                used_m += 0 if running_done else m
            else:
                used_t += ut if live(settled, 60) else 0
                used_m += um if live(settled, self.window_s) else 0
        return (requests + 1 <= self.rpm and used_t + tokens <= self.tpm
                and used_m + micros <= self.limit)


_dt = st.one_of(st.integers(0, 3), st.sampled_from([10, 30, 59, 60, 61]))
_step = st.tuples(st.sampled_from(["admit", "settle"]), _dt, st.integers(0, 30),
                  st.integers(0, 30), st.integers(0, 10**6))


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_random_histories_on_two_replicas_count_never_less_than_exactly(
        kind: str, request: pytest.FixtureRequest) -> None:
    """Whatever the history, the shared store admits only what fits the limits as stated, and
    refuses only what would not fit had every window been a bucket and a margin longer; its
    Retry-After names a moment the request fits, at most that much later than exactly."""
    store = (Store("redis", request.getfixturevalue("redis_url"),
                   request.getfixturevalue("redis_prefix")) if kind == "redis"
             else Store("database", request.getfixturevalue("sqlite_url")))
    examples = iter(range(10**6))

    @settings(max_examples=100 if kind == "redis" else 30, deadline=None)
    @given(rpm=st.integers(1, 6), tpm=st.integers(1, 80), window_s=st.integers(1, 120),
           limit=st.integers(0, 80), ops=st.lists(_step, max_size=40))
    def check(rpm: int, tpm: int, window_s: int, limit: int,
              ops: list[tuple[str, int, int, int, int]]) -> None:
        key = f"wl_prop_{next(examples)}"
        policy = policy_of(rpm=rpm, tpm=tpm, burst=(window_s, limit))
        exact = _Exact(rpm, tpm, window_s, limit, [])

        async def body() -> None:
            # No lease ends within a history: running requests count throughout, as above.
            async with replicas(store, lease_s=10**7) as two:
                now, tickets = 0, list[str]()
                for i, (kind, dt, a, b, pick) in enumerate(ops):
                    now += dt
                    limiter = two[i % 2].limiter
                    if kind == "settle":
                        running = [c for c in exact.calls if c[3] is None]
                        if not running:
                            continue
                        call = running[pick % len(running)]
                        call[3:] = [now, pick % (call[1] + 1), pick % (call[2] + 1)]
                        ticket = tickets[next(j for j, c in enumerate(exact.calls)
                                              if c is call)]
                        await limiter.settle(key, policy, ticket=ticket, held_tokens=call[1],
                                             used_tokens=call[4], held_micros=call[2],
                                             used_micros=call[5], now=T0 + now)
                        continue
                    try:
                        ticket = await limiter.admit(key, policy, tokens=a, cost_micros=b,
                                                     now=T0 + now)
                    except RateLimited as refused:
                        assert not exact.fits(now, a, b, extra=True)
                        retry = int(refused.headers["retry-after"])
                        if a <= tpm and b <= limit:
                            assert exact.fits(now + retry, a, b, running_done=True)
                            soonest = next(r for r in range(1, 10**4)
                                           if exact.fits(now + r, a, b, running_done=True))
                            assert retry <= soonest + math.ceil(
                                max(60, window_s) * (1 / 60 + 1 / 600)) + 1
                        continue
                    assert exact.fits(now, a, b)
                    exact.calls.append([now, a, b, None, 0, 0])
                    tickets.append(ticket)

        run(body)

    check()


# --- simultaneous admissions -------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "tokens", "keys", "cap", "expected"), [
    pytest.param(policy_of(max_concurrent=7), 0, 1, None, 7, id="max_concurrent"),
    pytest.param(policy_of(rpm=10), 0, 1, None, 10, id="rpm"),
    pytest.param(policy_of(tpm=50), 7, 1, None, 7, id="tpm"),
    pytest.param(policy_of(), 0, 40, 5, 5, id="tenant-cap-over-40-workloads"),
])
def test_simultaneous_admits_on_two_replicas_never_pass_a_cap(
        store: Store, policy: Policy, tokens: int, keys: int, cap: int | None,
        expected: int) -> None:
    async def body() -> int:
        async with replicas(store) as two:
            async def one(i: int) -> bool:
                try:
                    await two[i % 2].limiter.admit(
                        f"wl_{i % keys}", policy, tokens=tokens, cost_micros=0, now=T0,
                        group="tn_storm" if cap is not None else None, group_cap=cap)
                except RateLimited:
                    return False
                return True

            return sum(await asyncio.gather(*(one(i) for i in range(40))))

    assert run(body) == expected


# --- a replica that dies ---------------------------------------------------------------------


def test_a_dead_replicas_running_requests_stop_counting_after_their_lease(store: Store) -> None:
    policy = policy_of(tpm=1000, max_concurrent=1)

    async def body() -> None:
        async with replicas(store) as (a, b):
            # Replica a admits and dies: its requests are never settled.
            await a.limiter.admit("wl_a", policy, tokens=800, cost_micros=0, now=T0,
                                  group="tn_a", group_cap=1)
            await a.close()
            for key, tokens in (("wl_a", 0), ("wl_a", 300), ("wl_b", 0)):
                with pytest.raises(RateLimited):
                    await b.limiter.admit(key, policy, tokens=tokens, cost_micros=0,
                                          now=T0 + LEASE_S - 1, group="tn_a", group_cap=1)
            # After the lease, neither the workload's nor the tenant's count holds it, nor do
            # its 800 tokens: the tenant's slot is free though the dead key is never used again.
            await b.limiter.admit("wl_b", policy, tokens=0, cost_micros=0,
                                  now=T0 + LEASE_S + 0.01, group="tn_a", group_cap=1)
            await b.limiter.admit("wl_a", policy, tokens=1000, cost_micros=0,
                                  now=T0 + LEASE_S + 0.02, group="tn_a", group_cap=2)

    run(body)


def test_a_settle_after_the_lease_releases_nothing_twice(store: Store) -> None:
    """A request that outlived its lease (it cannot, by the settings; but if) settles without
    banking credit: what the lease gave back is not given back again."""
    policy = policy_of(tpm=1000, max_concurrent=2)

    async def body() -> None:
        async with replicas(store) as (a, b):
            late = await a.limiter.admit("wl_a", policy, tokens=600, cost_micros=0, now=T0)
            await b.limiter.admit("wl_a", policy, tokens=400, cost_micros=0,
                                  now=T0 + LEASE_S + 1)
            await a.limiter.settle("wl_a", policy, ticket=late, held_tokens=600, used_tokens=0,
                                   held_micros=0, used_micros=0, now=T0 + LEASE_S + 2)
            # 400 still held by the running request on b: 601 more do not fit.
            with pytest.raises(RateLimited):
                await a.limiter.admit("wl_a", policy, tokens=601, cost_micros=0,
                                      now=T0 + LEASE_S + 3)
            await a.limiter.admit("wl_a", policy, tokens=600, cost_micros=0,
                                  now=T0 + LEASE_S + 3)

    run(body)


# --- idle keys vanish ----------------------------------------------------------------------------


def test_redis_keys_expire_once_nothing_in_them_counts(redis_url: str, redis_prefix: str) -> None:
    store = Store("redis", redis_url, redis_prefix)
    policy = policy_of(rpm=10, tpm=1000, burst=(300, 1000))

    async def body() -> dict[str, int]:
        async with replicas(store, 1) as (a,):
            ticket = await a.limiter.admit("wl_a", policy, tokens=5, cost_micros=5, now=time.time(),
                                           group="tn_a", group_cap=5)
            running = await _ttls(store)
            await a.limiter.settle("wl_a", policy, ticket=ticket, held_tokens=5, used_tokens=5,
                                   held_micros=5, used_micros=5, now=time.time(), group="tn_a")
            await a.window.take(("client", "10.0.0.1"))
            return {"running": max(running.values()), **await _ttls(store)}

    ttls = run(body)
    # While a request runs its keys live as long as its lease; then as long as the longest
    # window (the burst's 300 s here), plus a bucket.
    assert LEASE_S * 1000 - 5000 < ttls.pop("running") <= (LEASE_S + 1) * 1000
    assert ttls and all(0 < ttl <= 307_000 for ttl in ttls.values()), ttls


async def _ttls(store: Store) -> dict[str, int]:
    client = redis.asyncio.Redis.from_url(store.url)
    try:
        keys = [k async for k in client.scan_iter(match=store.prefix + "*")]
        return {k.decode(): int(await client.pttl(k)) for k in keys}
    finally:
        await client.aclose()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_the_database_prune_drops_what_no_longer_counts(request: pytest.FixtureRequest,
                                                        database: str) -> None:
    store = Store("database", request.getfixturevalue(
        {"sqlite": "sqlite_url", "postgresql": "pg_url"}[database]))
    policy = policy_of(rpm=10, tpm=1000, burst=(300, 1000))

    async def body() -> None:
        async with replicas(store, 1) as (a,):
            ticket = await a.limiter.admit("wl_a", policy, tokens=5, cost_micros=5, now=T0,
                                           group="tn_a", group_cap=5)
            await a.limiter.settle("wl_a", policy, ticket=ticket, held_tokens=5, used_tokens=5,
                                   held_micros=5, used_micros=5, now=T0 + 1, group="tn_a")
            await a.limiter.admit("wl_dead", policy, tokens=5, cost_micros=5, now=T0,
                                  group="tn_a", group_cap=5)  # its replica dies
            await a.window.take(("client", "10.0.0.1"), now=T0)
            assert a.db is not None
            db = a.db

            def rows() -> dict[str, int]:
                with db.engine.connect() as conn:
                    return {t: int(conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one())
                            for t in ("limit_state", "limit_bucket", "limit_lease")}

            assert rows() == {"limit_state": 4, "limit_bucket": 5, "limit_lease": 1}
            # Within the windows and the lease nothing goes.
            assert await anyio.to_thread.run_sync(
                lambda: prune_once(db, now=T0 + 250)) == 0
            assert rows() == {"limit_state": 4, "limit_bucket": 5, "limit_lease": 1}
            # The dead replica's lease ended: it goes, and with it every key nothing counts in.
            assert await anyio.to_thread.run_sync(
                lambda: prune_once(db, now=T0 + LEASE_S + 1)) == 5
            assert rows() == {"limit_state": 0, "limit_bucket": 0, "limit_lease": 0}
            ticket = await a.limiter.admit("wl_b", policy, tokens=0, cost_micros=0,
                                           now=T0 + LEASE_S + 2, group="tn_a", group_cap=1)
            await a.limiter.settle("wl_b", policy, ticket=ticket, held_tokens=0, used_tokens=0,
                                   held_micros=0, used_micros=0, now=T0 + LEASE_S + 3,
                                   group="tn_a")
            assert await anyio.to_thread.run_sync(
                lambda: prune_once(db, now=T0 + LEASE_S + 4)) == 0
            await anyio.to_thread.run_sync(
                lambda: prune_once(db, now=T0 + 2 * LEASE_S + 10))
            assert rows() == {"limit_state": 0, "limit_bucket": 0, "limit_lease": 0}

    run(body)


# --- settings -----------------------------------------------------------------------------------


def test_the_backend_and_the_redis_url_are_set_by_environment_and_the_url_stays_secret() -> None:
    secret = SECRETS.add("s3cret-" + secrets.token_hex(4))
    settings = load_settings(TEST_TOML, env={
        "BROKER_LIMITS_BACKEND": "redis", "BROKER_LIMITS_TIMEOUT_S": "0.5",
        "BROKER_REDIS_URL": f"redis://:{secret}@cache.internal:6379/2"})
    assert (settings.limits.backend, settings.limits.timeout_s) == ("redis", 0.5)
    assert settings.redis.url.get_secret_value().endswith("@cache.internal:6379/2")
    assert secret not in repr(settings) and secret not in str(settings)
    for env, key in (({"BROKER_REDIS_URL": f"http://:{secret}@cache"}, "redis.url"),
                     ({"BROKER_LIMITS_BACKEND": "memcached"}, "limits.backend")):
        with pytest.raises(ConfigError) as bad:
            load_settings(TEST_TOML, env=env)
        assert key in str(bad.value) and secret not in str(bad.value)
    assert load_settings(TEST_TOML, env={}).limits.backend == "memory"


# --- event windows: failed secrets and issuance ------------------------------------------------


def test_two_replicas_count_one_event_window(store: Store) -> None:
    key = ("wl_client", "10.0.0.7")

    async def history(windows: list[EventWindow]) -> list[int]:
        a, b = windows[0], windows[-1]
        out = [await a.take(key, T0), await a.take(key, T0 + 1)]
        await b.record(key, T0 + 2)
        out += [await a.blocked_for(key, T0 + 3), await b.take(key, T0 + 3),
                await b.blocked_for(("wl_client", "10.0.0.8"), T0 + 3),
                await a.take(key, T0 + 299.9), await b.take(key, T0 + 300),
                await a.blocked_for(key, T0 + 300.5)]
        return out

    async def shared() -> list[int]:
        async with replicas(store, limit=3, window_s=300) as two:
            return await history([r.window for r in two])

    async def alone() -> list[int]:
        return await history([SlidingWindow(3, 300)])

    assert run(shared) == run(alone) == [0, 0, 298, 298, 0, 1, 0, 1]


@pytest.mark.parametrize("backend", ["database", "redis"])
def test_failed_secrets_on_one_replica_slow_down_another(
        backend: str, make_broker: BrokerFactory, pg_url: str, request: pytest.FixtureRequest,
) -> None:
    limits = _limits_section(backend, request)
    with contextlib.ExitStack() as stack:
        a = make_broker(pg_url, auth={"failure_limit": 5}, limits=limits)
        b = start_replica(stack, a.settings)
        agent = a.create_workload(a.create_tenant()["id"], policy={"models": []})
        form = {"grant_type": "client_credentials", "client_id": agent["client_id"]}
        for _ in range(5):
            wrong = a.client.post("/v1/token", data={**form, "client_secret": "bks_guess"})
            assert wrong.status_code == 401, wrong.text
        # The 6th wrong secret, and even the right one, on the other replica: slow down.
        for secret in ("bks_guess", agent["client_secret"]):
            slow = b.client.post("/v1/token", data={**form, "client_secret": secret})
            assert slow.status_code == 429, slow.text
            assert slow.json()["error"] == "slow_down"
            assert 0 < int(slow.headers["retry-after"]) <= a.settings.auth.failure_window_s


@pytest.mark.parametrize("backend", ["database", "redis"])
def test_issuance_counts_on_every_replica(backend: str, make_broker: BrokerFactory, pg_url: str,
                                          request: pytest.FixtureRequest) -> None:
    limits = _limits_section(backend, request)
    with contextlib.ExitStack() as stack:
        a = make_broker(pg_url, auth={"issuance_rpm": 3}, limits=limits)
        b = start_replica(stack, a.settings)
        agent = a.create_workload(a.create_tenant()["id"], policy={"models": []})
        form = {"grant_type": "client_credentials", "client_id": agent["client_id"],
                "client_secret": agent["client_secret"]}
        codes = [broker.client.post("/v1/token", data=form).status_code
                 for broker in (a, b, a, b, a)]
        assert codes == [200, 200, 200, 429, 429]


def _limits_section(backend: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    if backend == "redis":
        prefix: str = request.getfixturevalue("redis_prefix")
        return {"backend": "redis", "redis_prefix": prefix}
    return {"backend": "database"}


# --- the gateway -------------------------------------------------------------------------------

_MOCK = {"providers": {"mock": {}},
         "models": {"mock-gpt": {"provider": "mock", "input_micros_per_mtok": 1,
                                 "output_micros_per_mtok": 1}}}
_CHAT = {"model": "mock-gpt", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


def _agent_token(broker: Broker, **policy: Any) -> str:
    agent = broker.create_workload(broker.create_tenant()["id"], policy={
        "models": ["mock-gpt"], "token_budget_micros": 1_000_000, **policy})
    return broker.token(agent["client_id"], agent["client_secret"])


@pytest.mark.parametrize("backend", ["database", "redis"])
def test_gateway_rates_count_on_every_replica(backend: str, make_broker: BrokerFactory,
                                              pg_url: str, request: pytest.FixtureRequest) -> None:
    with contextlib.ExitStack() as stack:
        a = make_broker(pg_url, limits=_limits_section(backend, request), **_MOCK)
        b = start_replica(stack, a.settings)
        token = _agent_token(a, rate={"rpm": 3})
        headers = {"authorization": f"Bearer {token}"}
        codes = [broker.client.post("/v1/chat/completions", json=_CHAT, headers=headers)
                 for broker in (a, b, a, b)]
        assert [c.status_code for c in codes] == [200, 200, 200, 429], codes[-1].text
        assert codes[-1].json()["error"]["code"] == "rate_limit_exceeded"
        assert 55 <= int(codes[-1].headers["retry-after"]) <= 62
        # Calls that hold no money (token counting, batch files) count in the same store.
        other = _agent_token(a, rate={"rpm": 2})
        gateway, verified = b.services.gateway, verify_bearer(b.services, other)
        assert gateway is not None

        async def count_one() -> None:
            async with gateway.counted(verified, await gateway.policy(verified.sub)):
                pass

        for _ in range(2):
            b.client.portal.call(count_one)  # on b's event loop, where its client lives
        refused = a.client.post("/v1/chat/completions", json=_CHAT,
                                headers={"authorization": f"Bearer {other}"})
        assert refused.status_code == 429, refused.text


# --- a store that does not answer --------------------------------------------------------------


def test_an_unreachable_store_refuses_admission_and_a_settle_does_not_raise(
        sqlite_url: str, tmp_path: Any) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    unmigrated = f"sqlite:///{tmp_path}/empty.db"  # answers, but every statement fails

    async def body() -> None:
        dead_redis = RedisStore(closed, prefix="unused:", timeout_s=1.0)
        db = Database(make_engine(unmigrated))
        try:
            limiters: list[Limiter] = [RedisLimiter(dead_redis, lease_s=LEASE_S),
                                       DatabaseLimiter(db, lease_s=LEASE_S, timeout_s=1.0)]
            windows: list[EventWindow] = [
                RedisWindow(dead_redis, "events", 3, 60),
                DatabaseWindow(db, "events", 3, 60, timeout_s=1.0)]
            for limiter in limiters:
                with pytest.raises(LimitsUnavailable) as refused:
                    await limiter.admit("wl_a", policy_of(rpm=5), tokens=1, cost_micros=1, now=T0)
                assert refused.value.status == 503 and refused.value.code == "limits_unavailable"
                await limiter.settle("wl_a", policy_of(rpm=5), ticket="t", held_tokens=1,
                                     used_tokens=1, held_micros=1, used_micros=1, now=T0)
            for window in windows:
                for call in (window.take, window.blocked_for, window.record):
                    with pytest.raises(LimitsUnavailable):
                        await call(("client", "source"), None)
                with pytest.raises(LimitsUnavailable):
                    await FailureTracker(window).ensure_allowed("client", "source")
        finally:
            await dead_redis.aclose()
            db.dispose()

    run(body)


def test_an_unreachable_redis_answers_503_in_every_dialect_never_500(
        make_broker: BrokerFactory, sqlite_url: str, recorded_logs: list[str]) -> None:
    password = SECRETS.add("redis-pw-" + secrets.token_hex(8))
    with contextlib.ExitStack() as stack:
        down = make_broker(sqlite_url, limits={"backend": "redis", "timeout_s": 0.5}, redis={
            "url": f"redis://:{password}@127.0.0.1:{free_port()}/0"}, **_MOCK)
        # A replica counting in memory issues the token the other one then refuses to serve.
        up = start_replica(stack, down.settings, limits={"backend": "memory"})
        admin = {"authorization": f"Bearer {up.token('admin', ADMIN_SECRET)}"}
        tenant = up.client.post("/v1/admin/tenants", json={"name": f"t-{secrets.token_hex(3)}"},
                                headers=admin).json()
        agent = up.client.post("/v1/admin/workloads", headers=admin, json={
            "tenant_id": tenant["id"], "name": "w", "kind": "agent",
            "policy": {"models": ["mock-gpt"], "token_budget_micros": 1_000_000}}).json()
        SECRETS.add(agent["client_secret"])
        token = up.token(agent["client_id"], agent["client_secret"])

        issued = down.client.post("/v1/token", data={
            "grant_type": "client_credentials", "client_id": agent["client_id"],
            "client_secret": agent["client_secret"]})
        assert issued.status_code == 503, issued.text
        assert issued.json() == {"error": "limits_unavailable",
                                 "error_description": "the rate-limit store does not answer"}

        chat = down.client.post("/v1/chat/completions", json=_CHAT,
                                headers={"authorization": f"Bearer {token}"})
        assert chat.status_code == 503, chat.text
        assert chat.json()["error"] == {"message": "the rate-limit store does not answer",
                                        "type": "api_error", "code": "limits_unavailable",
                                        "param": None}
        messages = down.client.post("/v1/messages", json=_CHAT, headers={"x-api-key": token})
        assert messages.status_code == 503, messages.text
        assert messages.json() == {"type": "error", "error": {
            "type": "api_error", "message": "the rate-limit store does not answer"}}
        # Refused before any money moved.
        with down.services.db.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM hold")).scalar_one() == 0
            assert conn.execute(text("SELECT count(*) FROM usage_event")).scalar_one() == 0
    assert any("rate-limit store (Redis) failed" in line for line in recorded_logs)
    assert not [line for line in recorded_logs if password in line]
