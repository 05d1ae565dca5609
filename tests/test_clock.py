"""One clock orders tokens and revocation cut-offs: the database's.

A token's ``iat`` and a suspension's (or a policy change's) cut-off are compared with each
other, and with several replicas they are read on different machines. On PostgreSQL both come
from the database's clock, so a replica whose own clock is seconds off still has its tokens end
with a cut-off made elsewhere; on SQLite (one machine) the process clock is the database's.

The replicas' skew is played here by moving this process's ``time.time`` while a broker on
PostgreSQL (whose server keeps the machine's true time) issues, cuts and resumes: each step is
a replica with that clock. tests/test_faults.py does the same with real processes under
``faketime``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import jwt
import pytest
from sqlalchemy import Connection

from broker.storage.db import Database, db_clock, db_now, make_engine
from tests.conftest import SECRETS, Broker
from tests.test_revocation import POLICY, SLICE, _active, _agent, _post, _token

SKEW_S = 5
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"

_real_time = time.time


class Clock:
    """This process's clock, ``offset`` seconds off the machine's (and the database's)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return _real_time() + self.offset


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    skewed = Clock()
    monkeypatch.setattr(time, "time", skewed)
    return skewed


@pytest.fixture
def pg_broker(make_broker: Callable[..., Broker], pg_url: str) -> Broker:
    return make_broker(pg_url)


def _iat(token: str) -> int:
    iat: int = jwt.decode(token, options={"verify_signature": False})["iat"]
    return iat


def _admin_post(broker: Broker, path: str) -> None:
    resp = _post(broker, path)
    assert resp.status_code == 200, resp.text


def _on(database_url: str, fn: Callable[[Connection], Any]) -> Any:
    database = Database(make_engine(database_url))
    try:
        return database.read_transaction(fn)
    finally:
        database.dispose()


def test_on_postgresql_the_clock_is_the_databases_whatever_this_process_says(
    clock: Clock, pg_url: str,
) -> None:
    clock.offset = SKEW_S
    read, now = _on(pg_url, lambda conn: (db_clock(conn), db_now(conn, local=0)))
    assert abs(read - _real_time()) < 2 and abs(now - _real_time()) < 2, (read, now)


def test_on_sqlite_the_clock_is_this_processs(clock: Clock, sqlite_url: str) -> None:
    clock.offset = SKEW_S
    read, now = _on(sqlite_url, lambda conn: (db_clock(conn), db_now(conn)))
    assert abs(read - time.time()) < 2 and abs(now - time.time()) < 2, (read, now)
    # The caller's own reading of that clock is kept: one action's times stay one.
    assert _on(sqlite_url, lambda conn: db_now(conn, local=1234)) == 1234


def test_tokens_and_children_are_dated_by_the_database_not_the_issuing_replica(
    clock: Clock, pg_broker: Broker,
) -> None:
    agent = _agent(pg_broker)
    clock.offset = SKEW_S
    token = _token(pg_broker, agent)
    resp = pg_broker.client.post("/v1/token", data={
        "grant_type": EXCHANGE, "subject_token": token, "subject_token_type": ACCESS})
    assert resp.status_code == 200, resp.text
    child = SECRETS.add(resp.json()["access_token"])
    for issued in (token, child):
        claims = jwt.decode(issued, options={"verify_signature": False})
        assert abs(claims["iat"] - _real_time()) < 2, claims["iat"] - _real_time()
        # nbf and exp come from the same reading: a token's times stay consistent.
        assert claims["nbf"] == claims["iat"] < claims["exp"]


@pytest.mark.parametrize("cut", ["suspend", "policy change"])
def test_a_cut_on_a_replica_behind_ends_a_token_issued_just_before_by_one_ahead(
    clock: Clock, pg_broker: Broker, cut: str,
) -> None:
    agent = _agent(pg_broker)
    clock.offset = SKEW_S  # the issuing replica, ahead
    token = _token(pg_broker, agent)
    clock.offset = 0  # the cutting replica, on time
    if cut == "suspend":
        _admin_post(pg_broker, f"/v1/admin/workloads/{agent['id']}/suspend")
    else:
        resp = pg_broker.client.patch(f"/v1/admin/workloads/{agent['id']}",
                                      headers=pg_broker.admin(),
                                      json={"policy": {**POLICY, "token_budget_micros": SLICE // 2}})
        assert resp.status_code == 200, resp.text
    assert not _active(pg_broker, token)
    # By its own clock the cutting replica cut SKEW_S seconds before the token was issued.
    listed = pg_broker.client.get("/v1/admin/revocations", headers=pg_broker.admin()).json()
    cutoff = next(e["cutoff"] for e in listed["data"] if e["target"] == agent["id"])
    assert datetime.fromisoformat(cutoff).timestamp() >= _iat(token), (cutoff, _iat(token))


def test_a_resume_on_a_replica_ahead_waits_for_the_databases_next_second(
    clock: Clock, pg_broker: Broker,
) -> None:
    agent = _agent(pg_broker)
    old = _token(pg_broker, agent)
    clock.offset = SKEW_S  # suspended and resumed on the replica ahead
    _admin_post(pg_broker, f"/v1/admin/workloads/{agent['id']}/suspend")
    _admin_post(pg_broker, f"/v1/admin/workloads/{agent['id']}/resume")
    clock.offset = 0  # a token from the replica on time, right after the resume answered
    fresh = _token(pg_broker, agent)
    assert _iat(fresh) > _iat(old)
    assert _active(pg_broker, fresh), "a token issued after the resume answered is live"
    assert not _active(pg_broker, old), "a token issued before the suspension stays dead"


def test_a_resume_on_a_replica_behind_waits_no_longer_than_the_databases_second(
    clock: Clock, pg_broker: Broker,
) -> None:
    agent = _agent(pg_broker)
    _admin_post(pg_broker, f"/v1/admin/workloads/{agent['id']}/suspend")
    clock.offset = -SKEW_S
    started = time.monotonic()
    _admin_post(pg_broker, f"/v1/admin/workloads/{agent['id']}/resume")
    # By its own clock the cut-off is SKEW_S seconds ahead; by the database's at most one.
    assert time.monotonic() - started < SKEW_S - 1
    assert _active(pg_broker, _token(pg_broker, agent))
