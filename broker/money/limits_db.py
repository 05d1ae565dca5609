"""Rate limits, burst windows and failed-secret counters in the database, shared by every
replica (``limits.backend = "database"``; PostgreSQL for several replicas, SQLite works too).

Every change of a limited thing (a workload, a tenant's concurrency, an event window's key)
first locks its ``limit_state`` row (an upsert that bumps its version), then reads what counts,
decides as :mod:`broker.money.limits` does, and writes back with an ``UPDATE ... WHERE
version = :read`` that cannot apply over a change it did not see. Rows are locked in one order
(sorted by id), so two admissions never wait on each other in a cycle. The semantics are the
in-memory limiter's, counting more in two places, as in :mod:`broker.money.limits_redis`: the
logs are bucketed (a sixtieth of the window; an amount counts until its bucket's end plus a
six-hundredth), and a running request is a lease (``limit_lease``) that stops counting after
``sweeper.max_request_s`` if its replica died without settling it.

Expired leases and buckets are dropped as their keys are used; :func:`prune_once` (a
scheduled job) drops what idle keys left behind. A database that does not answer refuses the
request with :class:`broker.errors.LimitsUnavailable`; a settle it does not take is logged and
left to the lease.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from broker.errors import BrokerError, LedgerUnavailable, LimitsUnavailable
from broker.identity.policy import Policy
from broker.money.limits import (
    WINDOW_S,
    Usage,
    burst_name,
    concurrency_refusals,
    rate_limited,
    refusal,
    rpm_name,
    tpm_name,
)
from broker.storage.db import Database, Sql

log = logging.getLogger("broker.limits")

T = TypeVar("T")

MINUTE_MS = math.ceil(WINDOW_S * 1000)
PRUNE_BATCH = 500

_LOCK = Sql("""
    INSERT INTO limit_state (id, requests, tokens, micros, held_tokens, held_micros, running,
                             version, keep_until_ms)
    VALUES (:id, 0, 0, 0, 0, 0, 0, 0, :keep)
    ON CONFLICT (id) DO UPDATE SET version = limit_state.version + 1
    RETURNING requests, tokens, micros, held_tokens, held_micros, running, version,
              keep_until_ms""")
_WRITE = Sql("""
    UPDATE limit_state
    SET requests = :requests, tokens = :tokens, micros = :micros, held_tokens = :held_tokens,
        held_micros = :held_micros, running = :running, keep_until_ms = :keep_until_ms,
        version = version + 1
    WHERE id = :id AND version = :version""")
# Leases a dead replica left, of this key or this tenant. PostgreSQL skips the ones another
# transaction is already dropping (it adjusts their rows), so no two wait on each other here.
_EXPIRE = "WHERE expires_ms <= :now AND (state_id = :key OR group_id = :grp)"
_EXPIRE_ALL = "WHERE expires_ms <= :now"
_EXPIRE_SQLITE = """
    DELETE FROM limit_lease WHERE id IN (SELECT id FROM limit_lease {where} LIMIT :batch)
    RETURNING state_id, group_id, tokens, micros"""
_EXPIRE_PG = """
    DELETE FROM limit_lease WHERE id IN (
        SELECT id FROM limit_lease {where} LIMIT :batch FOR UPDATE SKIP LOCKED)
    RETURNING state_id, group_id, tokens, micros"""
_EXPIRE_KEY = (Sql(_EXPIRE_SQLITE.format(where=_EXPIRE)), Sql(_EXPIRE_PG.format(where=_EXPIRE)))
_EXPIRE_ANY = (Sql(_EXPIRE_SQLITE.format(where=_EXPIRE_ALL)),
               Sql(_EXPIRE_PG.format(where=_EXPIRE_ALL)))
_INSERT_LEASE = Sql("""
    INSERT INTO limit_lease (id, state_id, group_id, tokens, micros, expires_ms)
    VALUES (:id, :state_id, :group_id, :tokens, :micros, :expires_ms)""")
_DELETE_LEASE = Sql("""
    DELETE FROM limit_lease WHERE id = :id RETURNING state_id, group_id, tokens, micros""")
_TRIM = Sql("""
    DELETE FROM limit_bucket
    WHERE state_id = :id AND ((dim IN ('r', 't') AND last_ms <= :cut)
                              OR (dim = 's' AND last_ms <= :cut_spend))
    RETURNING dim, amount""")
_TAIL = Sql("SELECT max(last_ms) FROM limit_bucket WHERE state_id = :id AND dim = :dim")
_ADD = Sql("""
    INSERT INTO limit_bucket (state_id, dim, last_ms, amount) VALUES (:id, :dim, :last, :amount)
    ON CONFLICT (state_id, dim, last_ms) DO UPDATE SET amount = limit_bucket.amount + :amount""")
_BUCKETS = Sql("""
    SELECT last_ms, amount FROM limit_bucket WHERE state_id = :id AND dim = :dim
    ORDER BY last_ms""")
_NEWEST_EVENTS = Sql("""
    SELECT last_ms, amount FROM limit_bucket
    WHERE state_id = :id AND dim = 'e' AND last_ms > :cut
    ORDER BY last_ms DESC LIMIT :limit""")
_TRIM_EVENTS = Sql("""
    DELETE FROM limit_bucket WHERE state_id = :id AND dim = 'e' AND last_ms <= :cut""")
_PRUNE_STATES = Sql("""
    DELETE FROM limit_state
    WHERE keep_until_ms < :now
      AND id IN (SELECT id FROM limit_state WHERE keep_until_ms < :now LIMIT :batch)
    RETURNING id""")
_PRUNE_BUCKETS = Sql("DELETE FROM limit_bucket WHERE state_id = :id")


def _ms(now: float) -> int:
    # Rounded down: a window then ends no earlier than exactly.
    return math.floor(now * 1000)


def _bucket_end(now_ms: int, window_ms: int) -> int:
    """Where an amount counted at ``now_ms`` is kept: the end of its bucket of a sixtieth of
    the window, plus the in-memory log's merge margin (a six-hundredth), so it never leaves the
    window before the in-memory limiter would let it."""
    width = max(1, math.ceil(window_ms / 60))
    return (now_ms // width + 1) * width + math.ceil(window_ms / 600)


def _kept_for(window_ms: int) -> int:
    """How long after an amount is added its bucket may still count."""
    return window_ms + math.ceil(window_ms / 60) + math.ceil(window_ms / 600) + 1000


@dataclass(frozen=True)
class _State:
    id: str
    requests: int
    tokens: int
    micros: int
    held_tokens: int
    held_micros: int
    running: int
    version: int
    keep_until_ms: int


def _lock(conn: Connection, state_id: str, now_ms: int) -> _State:
    row = _LOCK.run(conn, id=state_id, keep=now_ms).one()
    return _State(state_id, *(int(v) for v in row))


def _write(conn: Connection, state: _State) -> None:
    done = _WRITE.run(conn, id=state.id, requests=max(0, state.requests),
                      tokens=max(0, state.tokens), micros=max(0, state.micros),
                      held_tokens=max(0, state.held_tokens),
                      held_micros=max(0, state.held_micros), running=max(0, state.running),
                      keep_until_ms=state.keep_until_ms, version=state.version)
    if done.rowcount != 1:
        # The row is locked since it was read: this cannot happen unless the lock was lost.
        raise LimitsUnavailable("a rate-limit row changed while it was locked")


def _pg(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


def _release_expired(conn: Connection, now_ms: int, key: str | None, group: str | None,
                     batch: int) -> dict[str, tuple[int, int, int]]:
    """Drop ended leases (of ``key`` or ``group``, or any when ``key`` is None); what each
    state they counted in must give back: (tokens, micros, requests running)."""
    if key is None:
        rows = _EXPIRE_ANY[_pg(conn)].run(conn, now=now_ms, batch=batch).all()
    else:
        rows = _EXPIRE_KEY[_pg(conn)].run(conn, now=now_ms, key=key, grp=group,
                                          batch=batch).all()
    back: dict[str, tuple[int, int, int]] = {}
    for state_id, group_id, tokens, micros in rows:
        t, m, n = back.get(state_id, (0, 0, 0))
        back[state_id] = (t + int(tokens), m + int(micros), n + 1)
        if group_id is not None:
            t, m, n = back.get(group_id, (0, 0, 0))
            back[group_id] = (t, m, n + 1)
    return back


def _lock_all(conn: Connection, ids: set[str], back: dict[str, tuple[int, int, int]],
              now_ms: int) -> dict[str, _State]:
    """Lock every row in id order, each less what its ended leases held."""
    states: dict[str, _State] = {}
    for state_id in sorted(ids | set(back)):
        state = _lock(conn, state_id, now_ms)
        t, m, n = back.get(state_id, (0, 0, 0))
        states[state_id] = replace(state, held_tokens=max(0, state.held_tokens - t),
                                   held_micros=max(0, state.held_micros - m),
                                   running=max(0, state.running - n))
    return states


def _trim(conn: Connection, state: _State, now_ms: int, burst_ms: int) -> _State:
    """The state less its amounts that left their windows (spend with no burst limit is
    dropped, as in memory)."""
    freed = {"r": 0, "t": 0, "s": 0}
    for dim, amount in _TRIM.run(conn, id=state.id, cut=now_ms - MINUTE_MS,
                                 cut_spend=now_ms - burst_ms).all():
        freed[str(dim)] += int(amount)
    return replace(state, requests=state.requests - freed["r"], tokens=state.tokens - freed["t"],
                   micros=state.micros - freed["s"])


def _add(conn: Connection, state_id: str, dim: str, amount: int, now_ms: int,
         window_ms: int) -> int:
    """Count ``amount`` in its bucket (one that arrives after a later bucket exists joins that
    one, so nothing leaves early); returns when the bucket stops counting."""
    if amount <= 0:
        return 0
    last = _bucket_end(now_ms, window_ms)
    tail = _TAIL.run(conn, id=state_id, dim=dim).scalar()
    if tail is not None and int(tail) > last:
        last = int(tail)
    _ADD.run(conn, id=state_id, dim=dim, last=last, amount=amount)
    return last + window_ms


def _frees_at(conn: Connection, state_id: str, dim: str, window_ms: int,
              now_ms: int) -> Callable[[int], float]:
    def at(need: int) -> float:
        freed = 0
        for last, amount in _BUCKETS.run(conn, id=state_id, dim=dim).all():
            freed += int(amount)
            if freed >= need:
                return (int(last) + window_ms) / 1000
        # A total above its buckets (rows edited by hand): the whole window, never sooner.
        return (now_ms + window_ms) / 1000
    return at


@dataclass(frozen=True)
class _Admission:
    key: str
    policy: Policy
    tokens: int
    micros: int
    now: float
    group: str | None
    group_cap: int | None
    ticket: str
    lease_ms: int


def _burst_ms(policy: Policy) -> int:
    return policy.burst.window_s * 1000 if policy.burst is not None else 0


def _open(conn: Connection, key_id: str, group_id: str | None, now_ms: int,
          burst_ms: int) -> dict[str, _State]:
    """Lock the key's (and the group's) rows, their ended leases dropped and the key's logs
    trimmed; the caller writes every state back (or rolls back)."""
    back = _release_expired(conn, now_ms, key_id, group_id, PRUNE_BATCH)
    ids = {key_id} if group_id is None else {key_id, group_id}
    states = _lock_all(conn, ids, back, now_ms)
    states[key_id] = _trim(conn, states[key_id], now_ms, burst_ms)
    return states


def _admit(conn: Connection, a: _Admission) -> None:
    now_ms, policy = _ms(a.now), a.policy
    burst_ms = _burst_ms(policy)
    key_id = "k:" + a.key
    group_id = "g:" + a.group if a.group is not None else None
    states = _open(conn, key_id, group_id, now_ms, burst_ms)
    state = states[key_id]
    group = states[group_id] if group_id is not None else None
    checks = concurrency_refusals(policy, state.running,
                                  group.running if group is not None else None, a.group_cap)
    rate, burst = policy.rate, policy.burst
    for found in (
        refusal(state.requests, 0, 1, rate.rpm, WINDOW_S, a.now, rpm_name(rate.rpm),
                _frees_at(conn, key_id, "r", MINUTE_MS, now_ms))
        if rate is not None and rate.rpm is not None else None,
        refusal(state.tokens, state.held_tokens, a.tokens, rate.tpm, WINDOW_S, a.now,
                tpm_name(rate.tpm), _frees_at(conn, key_id, "t", MINUTE_MS, now_ms))
        if rate is not None and rate.tpm is not None else None,
        refusal(state.micros, state.held_micros, a.micros, burst.limit_micros, burst.window_s,
                a.now, burst_name(burst.limit_micros, burst.window_s),
                _frees_at(conn, key_id, "s", burst_ms, now_ms))
        if burst is not None else None,
    ):
        if found is not None:
            checks.append(found)
    if checks:
        raise rate_limited(checks)  # the transaction rolls back: nothing counted
    ends = now_ms + a.lease_ms
    counted_until = _add(conn, key_id, "r", 1, now_ms, MINUTE_MS)
    _write(conn, replace(
        state, requests=state.requests + 1, held_tokens=state.held_tokens + a.tokens,
        held_micros=state.held_micros + a.micros, running=state.running + 1,
        keep_until_ms=max(state.keep_until_ms, counted_until, ends,
                          now_ms + _kept_for(max(MINUTE_MS, burst_ms)))))
    if group is not None:
        _write(conn, replace(group, running=group.running + 1,
                             keep_until_ms=max(group.keep_until_ms, ends)))
    _INSERT_LEASE.run(conn, id=a.ticket, state_id=key_id, group_id=group_id, tokens=a.tokens,
                      micros=a.micros, expires_ms=ends)
    for other in set(states) - {key_id, group_id}:
        _write(conn, states[other])


def _settle(conn: Connection, key: str, ticket: str, used_tokens: int, used_micros: int,
            now_ms: int, burst_ms: int) -> None:
    key_id = "k:" + key
    lease = _DELETE_LEASE.run(conn, id=ticket).first()
    # Only what this admission still holds is released: a settle whose lease already ended
    # cannot bank credit.
    back: dict[str, tuple[int, int, int]] = {}
    if lease is not None:
        back[str(lease[0])] = (int(lease[2]), int(lease[3]), 1)
        if lease[1] is not None:
            back[str(lease[1])] = (0, 0, 1)
    states = _lock_all(conn, {key_id}, back, now_ms)
    state = _trim(conn, states[key_id], now_ms, burst_ms)
    until = _add(conn, key_id, "t", used_tokens, now_ms, MINUTE_MS)
    if burst_ms:
        until = max(until, _add(conn, key_id, "s", used_micros, now_ms, burst_ms))
    states[key_id] = replace(
        state, tokens=state.tokens + used_tokens,
        micros=state.micros + (used_micros if burst_ms else 0),
        keep_until_ms=max(state.keep_until_ms, until))
    for state in states.values():
        _write(conn, state)


class DatabaseLimiter:
    """The :class:`broker.money.limits.Limiter` of replicas sharing one database."""

    def __init__(self, db: Database, *, lease_s: float, timeout_s: float):
        self.db = db
        self.lease_ms = math.ceil(lease_s * 1000)
        self.timeout_ms = math.ceil(timeout_s * 1000)

    async def admit(self, key: str, policy: Policy, *, tokens: int, cost_micros: int, now: float,
                    group: str | None = None, group_cap: int | None = None) -> str:
        if tokens < 0 or cost_micros < 0:
            raise ValueError("tokens and cost_micros must not be negative")
        admission = _Admission(key, policy, tokens, cost_micros, now, group,
                               group_cap if group is not None else None, secrets.token_hex(12),
                               self.lease_ms)
        await run_bounded(self.db, lambda conn: _admit(conn, admission), self.timeout_ms)
        return admission.ticket

    async def settle(
        self,
        key: str,
        policy: Policy,
        *,
        ticket: str,
        held_tokens: int,
        used_tokens: int,
        held_micros: int,
        used_micros: int,
        now: float,
        group: str | None = None,
    ) -> None:
        if min(held_tokens, used_tokens, held_micros, used_micros) < 0:
            raise ValueError("settled amounts must not be negative")
        burst_ms = _burst_ms(policy)
        try:
            await run_bounded(self.db, lambda conn: _settle(
                conn, key, ticket, used_tokens, used_micros, _ms(now), burst_ms), self.timeout_ms)
        except BrokerError:
            # The request has run; its answer is not withheld. Its lease ends the hold.
            log.warning("a settle of workload %s was not counted; its lease will end it", key)

    async def usage(self, key: str, policy: Policy, now: float) -> Usage:
        """What counts against the key's limits at ``now`` (running requests at their holds)."""
        def read(conn: Connection) -> Usage:
            key_id = "k:" + key
            states = _open(conn, key_id, None, _ms(now), _burst_ms(policy))
            for state in states.values():
                _write(conn, state)  # what ended is dropped for good, as in memory
            state = states[key_id]
            return Usage(requests=state.requests, tokens=state.tokens + state.held_tokens,
                         micros=state.micros + state.held_micros)

        return await run_bounded(self.db, read, self.timeout_ms)


async def run_bounded(db: Database, fn: Callable[[Connection], T], timeout_ms: int, *,
                      read: bool = False) -> T:
    """``fn`` in a transaction of its own, whose statements PostgreSQL cancels past the
    timeout; a database that fails is :class:`LimitsUnavailable` (a 503), never a 500."""
    def bounded(conn: Connection) -> T:
        if _pg(conn):
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(timeout_ms)}")
        return fn(conn)

    try:
        return await (db.read(bounded) if read else db.run(bounded))
    except (LedgerUnavailable, SQLAlchemyError) as exc:
        cause = exc.__cause__ if isinstance(exc, LedgerUnavailable) else exc
        log.error("the rate-limit store (database) failed: %s", type(cause).__name__)
        raise LimitsUnavailable("the rate-limit store does not answer") from None


def _window_wait(conn: Connection, state_id: str, now_ms: int, window_ms: int, limit: int) -> int:
    """Seconds until the key may act again: 0 under ``limit`` events in the window, else until
    the limit-th newest leaves it."""
    seen = 0
    for last, amount in _NEWEST_EVENTS.run(conn, id=state_id, cut=now_ms - window_ms,
                                          limit=limit).all():
        seen += int(amount)
        if seen >= limit:
            return max(1, (int(last) + window_ms - now_ms) // 1000 + 1)
    return 0


def _record_event(conn: Connection, state: _State, now_ms: int, window_ms: int) -> None:
    """Count one event of a locked key; its row is kept (and pruned with its events) until the
    event leaves the window."""
    _TRIM_EVENTS.run(conn, id=state.id, cut=now_ms - window_ms)
    _ADD.run(conn, id=state.id, dim="e", last=now_ms, amount=1)
    _write(conn, replace(state, keep_until_ms=max(state.keep_until_ms, now_ms + window_ms)))


class DatabaseWindow:
    """The :class:`broker.identity.credentials.EventWindow` of replicas sharing one database;
    ``now`` is UNIX time. Keys are digests: a client id is the caller's to choose."""

    def __init__(self, db: Database, name: str, limit: int, window_s: int, *, timeout_s: float):
        self.db = db
        self.name = name
        self.limit = limit
        self.window_s = window_s
        self.timeout_ms = math.ceil(timeout_s * 1000)

    def _id(self, key: tuple[str, str]) -> str:
        digest = hashlib.sha256("\0".join(key).encode("utf-8", "surrogatepass")).hexdigest()
        return f"e:{self.name}:{digest[:40]}"

    async def blocked_for(self, key: tuple[str, str], now: float | None = None) -> int:
        at, state_id = _ms(time.time() if now is None else now), self._id(key)
        return await run_bounded(
            self.db, lambda conn: _window_wait(conn, state_id, at, self.window_s * 1000,
                                               self.limit), self.timeout_ms, read=True)

    async def record(self, key: tuple[str, str], now: float | None = None) -> None:
        at, state_id = _ms(time.time() if now is None else now), self._id(key)
        await run_bounded(self.db, lambda conn: _record_event(
            conn, _lock(conn, state_id, at), at, self.window_s * 1000), self.timeout_ms)

    async def take(self, key: tuple[str, str], now: float | None = None) -> int:
        at = _ms(time.time() if now is None else now)
        return await run_bounded(self.db, lambda conn: self._take(conn, key, at),
                                 self.timeout_ms)

    def take_within(self, conn: Connection, key: tuple[str, str]) -> int:
        # Counted in the caller's transaction: it commits with the token it allowed.
        return self._take(conn, key, _ms(time.time()))

    def _take(self, conn: Connection, key: tuple[str, str], now_ms: int) -> int:
        state_id, window_ms = self._id(key), self.window_s * 1000
        state = _lock(conn, state_id, now_ms)  # one taker of this key at a time
        wait = _window_wait(conn, state_id, now_ms, window_ms, self.limit)
        if not wait:
            _record_event(conn, state, now_ms, window_ms)
        return wait


def prune_once(db: Database, *, now: float | None = None, batch: int = PRUNE_BATCH) -> int:
    """Drop what no longer counts: ended leases (giving back what they held), and the keys
    nothing in counts any more, with their logs. For the scheduler; returns how many leases
    and keys went."""
    now_ms = _ms(time.time() if now is None else now)

    def leases(conn: Connection) -> int:
        back = _release_expired(conn, now_ms, None, None, batch)
        for state in _lock_all(conn, set(), back, now_ms).values():
            _write(conn, state)
        # Each lease gave back one running request to its workload's state.
        return sum(n for state_id, (_, _, n) in back.items() if state_id.startswith("k:"))

    def idle(conn: Connection) -> int:
        gone = [str(row[0]) for row in _PRUNE_STATES.run(conn, now=now_ms, batch=batch).all()]
        for state_id in gone:
            _PRUNE_BUCKETS.run(conn, id=state_id)
        return len(gone)

    return db.transaction(leases) + db.transaction(idle)
