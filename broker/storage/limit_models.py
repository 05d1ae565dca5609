"""Tables of the rate limits shared through the database (``limits.backend = "database"``):
see :mod:`broker.money.limits_db`. Times are integer UNIX milliseconds: a limit's window is
counted to the millisecond, like the in-memory limiter's."""

from __future__ import annotations

from sqlalchemy import BigInteger, Index
from sqlmodel import Field, SQLModel


class LimitState(SQLModel, table=True):
    """One limited thing: a workload (``k:<id>``), a tenant's concurrency (``g:<id>``) or an
    event window's key (``e:<window>:<digest>``). Holds the running totals of its logs and what
    its running requests hold; every change locks this row first, and is written back only if
    ``version`` is still the one read."""

    __tablename__ = "limit_state"

    id: str = Field(primary_key=True, max_length=200)
    requests: int = Field(default=0, sa_type=BigInteger)
    tokens: int = Field(default=0, sa_type=BigInteger)
    micros: int = Field(default=0, sa_type=BigInteger)
    held_tokens: int = Field(default=0, sa_type=BigInteger)
    held_micros: int = Field(default=0, sa_type=BigInteger)
    running: int = Field(default=0, sa_type=BigInteger)
    version: int = Field(default=0, sa_type=BigInteger)
    # Nothing of the row counts after this: the periodic prune deletes it (and its buckets).
    keep_until_ms: int = Field(sa_type=BigInteger, index=True)


class LimitBucket(SQLModel, table=True):
    """An amount of one log of a state (``dim``: ``r`` requests, ``t`` tokens, ``s`` spend,
    ``e`` events), counted until ``last_ms`` plus the log's window."""

    __tablename__ = "limit_bucket"

    state_id: str = Field(primary_key=True, max_length=200)
    dim: str = Field(primary_key=True, max_length=1)
    last_ms: int = Field(primary_key=True, sa_type=BigInteger)
    amount: int = Field(sa_type=BigInteger)


class LimitLease(SQLModel, table=True):
    """A running request (its admission's ticket): counted in its workload's and its tenant's
    concurrency, and holding its worst case, until it settles or ``expires_ms`` passes (its
    replica died)."""

    __tablename__ = "limit_lease"
    __table_args__ = (
        Index("ix_limit_lease_state", "state_id", "expires_ms"),
        Index("ix_limit_lease_group", "group_id", "expires_ms"),
    )

    id: str = Field(primary_key=True, max_length=40)
    state_id: str = Field(max_length=200)
    group_id: str | None = Field(default=None, max_length=200)
    tokens: int = Field(sa_type=BigInteger)
    micros: int = Field(sa_type=BigInteger)
    expires_ms: int = Field(sa_type=BigInteger, index=True)
