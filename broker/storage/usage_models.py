"""Tables of the usage rollups (:mod:`broker.money.rollups`)."""

from __future__ import annotations

from sqlalchemy import BigInteger
from sqlmodel import Field, SQLModel


class UsageRollup(SQLModel, table=True):
    """The usage events of one hour or one day (UTC) of one workload and model, summed: what
    usage totals and series read once raw events are rolled up (and, past
    ``usage.raw_retention_days``, deleted). Each event is counted exactly once in its hour's
    row and once in its day's row, in the transaction that marks it ``rolled_up``.

    The key starts with ``(period, bucket)`` so a time range is one range scan."""

    __tablename__ = "usage_rollup"
    # On SQLite the rows live in the key's own b-tree (no rowid and second copy of the key).
    __table_args__ = {"sqlite_with_rowid": False}

    period: str = Field(primary_key=True, max_length=4)  # "hour" | "day"
    bucket: int = Field(primary_key=True, sa_type=BigInteger)  # its start, UNIX seconds (UTC)
    tenant_id: str = Field(primary_key=True, max_length=40)
    workload_id: str = Field(primary_key=True, max_length=40)
    model: str = Field(primary_key=True, max_length=256)
    requests: int = Field(default=0, sa_type=BigInteger)
    prompt_tokens: int = Field(default=0, sa_type=BigInteger)
    completion_tokens: int = Field(default=0, sa_type=BigInteger)
    cost_micros: int = Field(default=0, sa_type=BigInteger)
