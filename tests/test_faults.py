"""Faults on real processes over PostgreSQL: a replica killed mid-stream, OpenBao stopped,
PostgreSQL restarted, a SIGTERM with streams in flight, clocks that disagree between replicas.

Each test runs ``broker serve`` processes configured as an operator would (environment, and
config/broker.toml for the provider and model tables) in front of the fake provider, injects its
fault under load, and then checks what the clients saw and what the ledger holds. What matters
is checked against the configured times (``vault.max_stale_s``, ``sweeper.max_request_s``,
``server.shutdown_grace_s``), never against how fast this machine is; the measured times are
printed. Cut-offs of revocations and tokens' ``iat`` are both read from the database's clock,
so replicas whose clocks disagree still agree on which came first.

Needs ``initdb``/``pg_ctl`` (postgresql), ``faketime`` and, as root, ``runuser``: .ci/run
installs what the image lacks; a missing tool fails the test, it does not skip it.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from broker.devvault import DevVault
from broker.gateway.provider_keys import FRESH_S
from broker.settings import VaultSettings
from broker.storage.vault import Vault
from broker.tokens.tokens import LEEWAY_S
from tests.conftest import SECRETS
from tests.fake_provider import FakeProviderServer
from tests.fault_support import (
    Cluster,
    Ledger,
    Load,
    Outcome,
    PrivateBao,
    PrivatePostgres,
    Replica,
    Stream,
    chat_body,
    replica_env,
    require_tool,
    seed_agent,
    streaming,
    write_config,
)
from tests.gateway_support import gateway_sections
from tests.support import assert_problem, wait_for

# Short enough that an orphaned hold is settled within seconds. The gateway's limits must stay
# below it (the settings refuse otherwise): no stream outlives MAX_STREAM_S plus DRAIN_S.
MAX_REQUEST_S = 10
MAX_STREAM_S = 8
FAST = {
    "SWEEPER_INTERVAL_S": "0.5",
    "SWEEPER_MAX_REQUEST_S": str(MAX_REQUEST_S),
    "GATEWAY_MAX_STREAM_S": str(MAX_STREAM_S),
    "GATEWAY_DRAIN_S": "1",
    "SCHEDULER_TICK_S": "0.2",
    "REVOCATION_CATCHUP_INTERVAL_S": "1",
}
MODELS = ["gpt-test"]
CHUNK_S = 0.1


@pytest.fixture
def fake(fake: FakeProviderServer) -> FakeProviderServer:
    # Every call streams one word per CHUNK_S: long enough to be caught in flight.
    fake.state.faults.chunk_delay_s = CHUNK_S
    return fake


class Deployment:
    """The replicas of one test, the provider key they read, and the ledger they share."""

    def __init__(self, workdir: Path, fake: FakeProviderServer, db_url: str, vault_addr: str,
                 vault_token: str, **settings: str) -> None:
        self.fake = fake
        self.vault_path = f"faults-{secrets.token_hex(6)}/providers/fake"
        sections = gateway_sections(fake, self.vault_path, timeout_s=MAX_STREAM_S)
        write_config(workdir, {
            "gateway": sections["gateway"],
            "providers": {"fake-openai": sections["providers"]["fake-openai"]},
            "models": {"gpt-test": sections["models"]["gpt-test"]},
            "monitoring": {"enabled": False},
        })
        self.cluster = Cluster(workdir, replica_env(db_url, vault_addr, vault_token,
                                                    **{**FAST, **settings}))
        self.ledger = Ledger(db_url)
        self.vault = Vault(VaultSettings.model_validate(
            {"addr": vault_addr, "token": vault_token}))
        self.key = SECRETS.add("sk-fake-" + secrets.token_urlsafe(16))
        self.agent: dict[str, Any] = {}

    def write_key(self) -> None:
        self.vault.write(self.vault_path, {"api_key": self.key})
        self.fake.state.valid_keys = {self.key}

    def start(self, name: str, **kw: Any) -> Replica:
        return self.cluster.start(name, **kw)

    def token(self, replica: Replica) -> str:
        if not self.agent:
            self.agent = seed_agent(replica, MODELS)
        return replica.token(self.agent["client_id"], self.agent["client_secret"])


@pytest.fixture
def deploy(tmp_path: Path, fake: FakeProviderServer) -> Iterator[Callable[..., Deployment]]:
    """Replicas on a database and a Vault: a test asks for this fixture after theirs, so that
    its replicas stop before the database and Vault go away."""
    made: list[Deployment] = []

    def factory(db_url: str, vault_addr: str, vault_token: str, **settings: str) -> Deployment:
        made.append(Deployment(tmp_path, fake, db_url, vault_addr, vault_token, **settings))
        return made[-1]

    yield factory
    for deployment in made:
        deployment.cluster.stop()


def jti(token: str) -> str:
    value: str = jwt.decode(token, options={"verify_signature": False})["jti"]
    return value


def stream_client(replica: Replica) -> httpx.Client:
    return httpx.Client(base_url=replica.url, timeout=30,
                        limits=httpx.Limits(max_connections=200, max_keepalive_connections=0))


# --- kill -9 ------------------------------------------------------------------------------


STREAMS = 50
ANSWER_WORDS = 40  # at CHUNK_S a word: each stream runs ~4 s


def test_a_replica_killed_during_50_streams_leaves_one_usage_event_per_stream_and_no_hold(
    pg_url: str, vault: DevVault, deploy: Callable[..., Deployment],
) -> None:
    env = deploy(pg_url, vault.addr, vault.root_token)
    env.fake.state.faults.answer_tokens = ANSWER_WORDS
    env.write_key()
    a, b = env.start("a"), env.start("b")
    tokens = [env.token(a if i % 2 else b) for i in range(STREAMS)]
    on_a = set(range(0, STREAMS, 2))
    streams = [Stream(token, f"kill-{i}-{secrets.token_hex(4)}") for i, token in enumerate(tokens)]
    body = chat_body(64, stream=True)
    with contextlib.ExitStack() as stack:
        clients = {name: stack.enter_context(stream_client(r)) for name, r in (("a", a), ("b", b))}
        calls = [(clients["a" if i in on_a else "b"], s, body) for i, s in enumerate(streams)]
        with streaming(calls):
            wait_for(lambda: all(s.started.is_set() for s in streams), 60,
                     what=lambda: f"{STREAMS} streams under way "
                                  f"({sum(s.started.is_set() for s in streams)} started)")
            in_flight = sum(not s.ended.is_set() for s in streams)
            killed_at = time.monotonic()
            a.kill()
        # A stream of a that ended before the kill (a slow start of the others) is simply ok.
        cut = {i for i in on_a if not streams[i].completed}
        print(f"\nkill -9 of replica a with {in_flight} of {STREAMS} streams in flight: "
              f"{len(cut)} of its {len(on_a)} cut")
        assert cut, "replica a finished its streams before it was killed"
        for i, s in enumerate(streams):
            if i not in on_a:
                assert s.completed, (s.status, s.error, s.text[-300:])

        restarted = env.start("a-restarted")
        settled = env.ledger.wait_until_no_hold(MAX_REQUEST_S + 30)
    took = time.monotonic() - killed_at
    print(f"orphaned holds settled {took:.1f} s after the kill (max_request_s {MAX_REQUEST_S}; "
          f"{settled:.1f} s of it after the restart)")

    events = env.ledger.assert_consistent()
    by_jti: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_jti.setdefault(event["jti"], []).append(event)
    ok: list[dict[str, Any]] = []
    orphaned: list[dict[str, Any]] = []
    for i, token in enumerate(tokens):
        mine = by_jti.get(jti(token), [])
        assert len(mine) == 1, (i, mine)
        (orphaned if i in cut else ok).append(mine[0])
    assert {e["status"] for e in ok} == {"ok"} and {e["status"] for e in orphaned} == {"orphaned"}
    # Each stream reached the provider once. An orphan is charged its whole hold, which bounds
    # any answer (64 words held, 40 given): more than the provider's count, charged the others.
    assert len(env.fake.state.requests) == STREAMS
    assert min(e["cost_micros"] for e in orphaned) > max(e["cost_micros"] for e in ok) > 0
    # The restarted replica serves.
    resp = restarted.client.post("/v1/chat/completions", json=chat_body(8, stream=False),
                                 headers={"authorization": f"Bearer {env.token(restarted)}"})
    assert resp.status_code == 200, resp.text


# --- OpenBao stopped ------------------------------------------------------------------------


# Past FRESH_S (5 s) a cached key is read again at each call; the allowance is counted from the
# last read that worked, at most FRESH_S before the stop.
MAX_STALE_S = 10


@pytest.fixture
def private_bao() -> Iterator[PrivateBao]:
    bao = PrivateBao()
    try:
        yield bao.create()
    finally:
        bao.destroy()


def assert_openai_error(outcome: Outcome, status: int, code: str) -> None:
    """An error of the OpenAI-dialect routes (docs/api.md, "Errors"): its four members."""
    assert outcome.status == status, outcome
    error = json.loads(outcome.body)["error"]
    assert set(error) == {"message", "type", "code", "param"} and error["message"], error
    assert error["code"] == code, error


def test_with_openbao_stopped_cached_keys_serve_up_to_max_stale_then_503_until_it_returns(
    pg_url: str, private_bao: PrivateBao, deploy: Callable[..., Deployment],
) -> None:
    env = deploy(pg_url, private_bao.addr, private_bao.root_token,
                 VAULT_MAX_STALE_S=str(MAX_STALE_S), VAULT_TIMEOUT_S="2")
    env.write_key()
    a = env.start("a")
    token = env.token(a)
    with Load(a.url, token, threads=3) as load:
        load.wait_for(200, after=time.monotonic(), timeout_s=30)
        stopped = time.monotonic()
        private_bao.stop()
        # Only provider calls need Vault: tokens are still issued.
        env.token(a)
        first_503 = load.wait_for(503, after=stopped, timeout_s=MAX_STALE_S + 30)
        # Refused from then on: a key past its allowance does not come back by itself.
        wait_for(lambda: sum(o.status == 503 for o in load.since(stopped)) >= 10, 30)
        restarting = time.monotonic()
        private_bao.start()
        restarted = time.monotonic()
        recovered = load.wait_for(200, after=restarted, timeout_s=30)
        wait_for(lambda: sum(o.status == 200 for o in load.since(restarted)) >= 10, 30)
    print(f"\nOpenBao stopped: cached key served for {first_503:.1f} s (vault.max_stale_s "
          f"{MAX_STALE_S}, keys fresh for {FRESH_S} s), then 503; OpenBao back after "
          f"{restarted - restarting:.1f} s, calls served again {recovered:.2f} s later")
    outage = [o for o in load.outcomes if stopped <= o.at < restarting]
    assert {o.status for o in outage} == {200, 503}
    served = [o for o in outage if o.status == 200]
    refused = [o for o in outage if o.status == 503]
    # Calls run concurrently: a 200 may return after a 503 if it was sent before it.
    assert max(o.sent for o in served) < min(o.at for o in refused), "a 200 after the first 503"
    # The cached key was read at most FRESH_S before the stop and serves MAX_STALE_S after
    # that read: not for less than the difference, nor longer than the allowance (the slack is
    # a call's time on a busy machine).
    assert MAX_STALE_S - FRESH_S - 1 <= first_503 <= MAX_STALE_S + 5
    for outcome in refused:
        assert_openai_error(outcome, 503, "service_unavailable")
    assert {o.status for o in load.since(restarted + recovered)} == {200}
    # Refused calls were refused before any money moved or any provider call was made.
    env.ledger.wait_until_no_hold(10)
    events = env.ledger.assert_consistent()
    served_ids = {o.request_id for o in load.outcomes if o.status == 200}
    assert {e["request_id"] for e in events if e["cost_micros"] > 0} == served_ids
    assert len(env.fake.state.requests) == len(served_ids)


# --- PostgreSQL restarted ---------------------------------------------------------------------


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    try:
        yield pg.create()
    finally:
        pg.destroy()


def test_a_postgresql_restart_under_load_answers_503_loses_no_hold_and_recovers_by_itself(
    private_pg: PrivatePostgres, vault: DevVault, deploy: Callable[..., Deployment],
) -> None:
    env = deploy(private_pg.url, vault.addr, vault.root_token)
    env.fake.state.faults.answer_tokens = 30  # 3 s streams: in flight across the outage
    env.write_key()
    a = env.start("a")
    admin = a.admin()
    token = env.token(a)
    stream_tokens = [env.token(a) for _ in range(4)]
    streams = [Stream(t, f"pg-{i}-{secrets.token_hex(4)}") for i, t in enumerate(stream_tokens)]
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(stream_client(a))
        load = stack.enter_context(Load(a.url, token, threads=3))
        load.wait_for(200, after=time.monotonic(), timeout_s=30)
        stack.enter_context(streaming(
            [(client, s, chat_body(64, stream=True, marker=s.request_id)) for s in streams]))
        wait_for(lambda: all(s.started.is_set() for s in streams), 30, what="streams under way")
        stopped = time.monotonic()
        private_pg.stop()
        first_503 = load.wait_for(503, after=stopped, timeout_s=30)
        wait_for(lambda: sum(o.status == 503 for o in load.since(stopped)) >= 10, 30)
        # Every route fails closed in its own dialect while the ledger is away.
        assert_problem(a.client.get("/readyz"), 503, "service_unavailable")
        assert_problem(a.client.get("/v1/admin/tenants", headers=admin), 503,
                       "service_unavailable")
        refused = a.client.post("/v1/token", data={
            "grant_type": "client_credentials", "client_id": env.agent["client_id"],
            "client_secret": env.agent["client_secret"]})
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "service_unavailable", refused.text
        # Down until the streams have ended: their settlements meet the outage too.
        wait_for(lambda: all(s.ended.is_set() for s in streams), 30, what="the streams' end")
        restarting = time.monotonic()
        private_pg.start()
        restarted = time.monotonic()
        recovered = load.wait_for(200, after=restarted, timeout_s=30)
        wait_for(lambda: sum(o.status == 200 for o in load.since(restarted)) >= 10, 30)
    print(f"\nPostgreSQL stopped for {restarting - stopped:.1f} s: first 503 after "
          f"{first_503:.2f} s; restarted in {restarted - restarting:.1f} s, calls served again "
          f"{recovered:.2f} s later, by the same process")
    assert a.proc.poll() is None, "the broker restarted"
    statuses = {o.status for o in load.outcomes}
    assert statuses <= {200, 503}, statuses  # never a 500, never a dropped connection
    for outcome in load.outcomes:
        if outcome.status == 503:
            assert_openai_error(outcome, 503, "service_unavailable")
    assert {o.status for o in load.since(restarted + recovered)} == {200}
    for s in streams:  # their provider answered; only their settlement met the outage
        assert s.completed, (s.status, s.error, s.text[-300:])

    # A settlement the outage refused left its hold for the sweeper, which settles it at the
    # whole hold once it is MAX_REQUEST_S old: no hold is lost, none is charged twice.
    swept = env.ledger.wait_until_no_hold(MAX_REQUEST_S + 30)
    print(f"holds left by the outage settled {swept:.1f} s after the load stopped")
    events = env.ledger.assert_consistent()
    named = {e["request_id"] for e in events}
    orphans = [e for e in events if e["status"] == "orphaned"]
    # Every call that reached the provider held money first and was charged once: by its own
    # settlement (its request id) or, when the outage refused that, as an orphan.
    sent = [r["messages"][0]["content"] for r in env.fake.state.requests]
    unnamed = [rid for rid in sent if rid not in named]
    assert len(unnamed) <= len(orphans), (len(unnamed), len(orphans))
    served = [o.request_id for o in load.outcomes if o.status == 200]
    assert set(served) <= set(sent)
    by_jti = {e["jti"]: e for e in events}
    for t in stream_tokens:
        assert by_jti[jti(t)]["status"] == "orphaned"
    print(f"{len(sent)} provider calls, {len(orphans)} settled as orphans")


# --- SIGTERM --------------------------------------------------------------------------------


GRACE_S = 4


def test_sigterm_refuses_new_connections_and_drains_streams_within_the_grace(
    pg_url: str, vault: DevVault, deploy: Callable[..., Deployment],
) -> None:
    env = deploy(pg_url, vault.addr, vault.root_token, SERVER_SHUTDOWN_GRACE_S=str(GRACE_S))
    env.fake.state.faults.answer_tokens = 70
    env.write_key()
    a = env.start("a")
    short = [Stream(env.token(a), f"short-{i}-{secrets.token_hex(4)}") for i in range(3)]
    long = [Stream(env.token(a), f"long-{i}-{secrets.token_hex(4)}") for i in range(3)]
    with stream_client(a) as client:
        # At most ~2 s of answer left at the signal, well inside the grace; and ~7 s, past it.
        calls = [(client, s, chat_body(20, stream=True)) for s in short]
        calls += [(client, s, chat_body(70, stream=True)) for s in long]
        with streaming(calls):
            wait_for(lambda: all(s.started.is_set() for s in short + long), 30,
                     what="streams under way")
            assert not any(s.ended.is_set() for s in short + long)
            signalled = time.monotonic()
            a.signal(signal.SIGTERM)

            def refused() -> bool:
                try:
                    httpx.get(a.url + "/healthz", timeout=2)
                    return False
                except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                    # Refused, or accepted by the kernel's backlog just before the listening
                    # socket closed and then reset: either way not served.
                    return True

            closed = wait_for(refused, 10, interval=0.02, what="new connections refused")
            assert not any(s.ended.is_set() for s in long), "the drain ended too early"
            a.proc.wait(timeout=GRACE_S + 30)
            exited = time.monotonic() - signalled
    print(f"\nSIGTERM: new connections refused after {closed:.2f} s, process exited after "
          f"{exited:.1f} s (server.shutdown_grace_s {GRACE_S})")
    assert a.proc.returncode == 0, a.tail()
    for s in short:
        assert s.completed, (s.status, s.error, s.text[-300:])
    for s in long:
        # Ended by the broker, cleanly, with the dialect's error event rather than a cut.
        assert s.status == 200 and s.error is None and not s.completed, (s.error, s.text[-300:])
        assert s.events()[-1]["error"]["code"] == "stream_time_limit", s.text[-300:]
    events = env.ledger.assert_consistent()
    by_request = {e["request_id"]: e for e in events}
    assert all(by_request[s.request_id]["status"] == "ok" for s in short)
    for s in long:
        event = by_request[s.request_id]
        assert event["status"] == "expired" and event["cost_micros"] > 0, event
    assert "timeout graceful shutdown exceeded" not in a.log.read_text(), "uvicorn cancelled"


# --- clock skew -------------------------------------------------------------------------------


SKEW_S = 5


@pytest.fixture
def skewed(pg_url: str, vault: DevVault,
           deploy: Callable[..., Deployment]) -> tuple[Deployment, Replica, Replica]:
    """Two replicas, the first with a clock SKEW_S seconds ahead of the second's (and ours)."""
    faketime = require_tool("faketime", "faketime")
    assert SKEW_S < LEEWAY_S, "the skew under test must be one the leeway covers"
    env = deploy(pg_url, vault.addr, vault.root_token)
    env.write_key()
    ahead = env.start("ahead", wrapper=[faketime, "-f", f"+{SKEW_S}s"])
    normal = env.start("normal")
    return env, ahead, normal


def test_tokens_issued_by_a_replica_whose_clock_is_a_few_seconds_off_are_accepted_both_ways(
    skewed: tuple[Deployment, Replica, Replica],
) -> None:
    env, ahead, normal = skewed
    admin = normal.admin()
    from_ahead, from_normal = env.token(ahead), env.token(normal)
    # The skew is real: the replica's own clock (its Date header) runs SKEW_S seconds ahead of
    # this process's. Its tokens are dated by the database's clock, which here is ours.
    dated = parsedate_to_datetime(ahead.client.get("/healthz").headers["date"]).timestamp()
    assert abs(dated - time.time() - SKEW_S) <= 2, dated - time.time()
    issued_ahead = jwt.decode(from_ahead, options={"verify_signature": False})["iat"]
    assert abs(issued_ahead - time.time()) <= 2, issued_ahead - time.time()
    # Issued by the replica behind, it has expired by the other's clock, within the leeway.
    expiring = normal.client.post("/v1/token", data={
        "grant_type": "client_credentials", "client_id": env.agent["client_id"],
        "client_secret": env.agent["client_secret"], "ttl_s": "2"})
    assert expiring.status_code == 200, expiring.text
    short_lived = SECRETS.add(expiring.json()["access_token"])

    checks = ((from_ahead, normal), (from_normal, ahead), (short_lived, ahead))
    for token, verifier in checks:
        assert verifier.active(token, admin)
        resp = verifier.client.post("/v1/chat/completions", json=chat_body(8, stream=False),
                                    headers={"authorization": f"Bearer {token}"})
        assert resp.status_code == 200, resp.text
        assert int(resp.headers["x-broker-cost-micros"]) > 0
    # A revocation on either replica holds on the other, whoever issued the token.
    for token, revoker, other in ((from_ahead, normal, ahead), (from_normal, ahead, normal)):
        resp = revoker.client.post(f"/v1/admin/tokens/{jti(token)}/revoke", headers=admin,
                                   json={"reason": "skew test"})
        assert resp.status_code == 200, resp.text

        def revoked(token: str = token, other: Replica = other) -> bool:
            return not other.active(token, admin)

        wait_for(revoked, 10, what="a revocation made on the other replica")
    env.ledger.wait_until_no_hold(10)
    env.ledger.assert_consistent()


def test_a_cut_off_on_a_replica_behind_ends_tokens_issued_just_before_by_one_ahead(
    skewed: tuple[Deployment, Replica, Replica],
) -> None:
    env, ahead, normal = skewed
    admin = normal.admin()
    token = env.token(ahead)
    agent = env.agent["id"]
    # Issued before the policy change: it must die with it, on both replicas.
    resp = normal.client.patch(f"/v1/admin/workloads/{agent}", headers=admin, json={
        "policy": {"models": MODELS, "token_budget_micros": 500}})
    assert resp.status_code == 200, resp.text
    wait_for(lambda: not normal.active(token, admin) and not ahead.active(token, admin), 3,
             what="the cut of a token issued before the policy change")
