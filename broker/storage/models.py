"""Database tables (SQLModel). Every change of money goes through :mod:`broker.money.ledger`.

Money columns are 64-bit integers of micro-dollars. Times are stored as integer UNIX seconds
(UTC) so that comparisons are exact and identical on SQLite and PostgreSQL.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, Text, UniqueConstraint, false
from sqlmodel import Field, SQLModel


def _json() -> Any:
    return Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class Tenant(SQLModel, table=True):
    __tablename__ = "tenant"
    # Unique by key, not by name: see broker.identity.names.name_key.
    __table_args__ = (UniqueConstraint("name_key", name="uq_tenant_name_key"),)

    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=128)  # as shown: broker.identity.names.normalize_name's form
    name_key: str = Field(max_length=256)  # broker.identity.names.name_key of the name
    budgets: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: int = Field(sa_type=BigInteger)
    # A suspension is a cut-off time: tokens issued at or before it are dead.
    suspended_at: int | None = Field(default=None, sa_type=BigInteger)


class Workload(SQLModel, table=True):
    __tablename__ = "workload"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name_key", name="uq_workload_tenant_name_key"),
    )

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(foreign_key="tenant.id", index=True, max_length=40)
    name: str = Field(max_length=128)
    name_key: str = Field(max_length=256)
    kind: str = Field(max_length=16)
    roles: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    policy: dict[str, Any] = _json()
    client_id: str = Field(unique=True, max_length=64)
    secret_hash: str = Field(max_length=64)
    prev_secret_hash: str | None = Field(default=None, max_length=64)
    prev_secret_expires_at: int | None = Field(default=None, sa_type=BigInteger)
    created_at: int = Field(sa_type=BigInteger)
    suspended_at: int | None = Field(default=None, sa_type=BigInteger)


class BudgetCounter(SQLModel, table=True):
    """Reserved and spent money of one budget (org, tenant or workload) in one period window.

    The limit is not stored: it comes from the policy at the moment of the conditional update,
    so a lowered limit takes effect at once. ``spent <= reserved + spent <= limit`` always.
    """

    __tablename__ = "budget_counter"
    __table_args__ = (
        UniqueConstraint("scope", "scope_id", "period", "window_start", name="uq_budget_window"),
    )

    id: int | None = Field(default=None, primary_key=True)
    scope: str = Field(max_length=16)
    scope_id: str = Field(max_length=40)
    period: str = Field(max_length=8)
    window_start: int = Field(sa_type=BigInteger)
    reserved_micros: int = Field(default=0, sa_type=BigInteger)
    spent_micros: int = Field(default=0, sa_type=BigInteger)


class TokenSlice(SQLModel, table=True):
    """One issued token and the budget slice it reserved; or a grant's extra budget (``kind``
    ``grant``, ``jti`` the grant's id), which the slices of the tokens it funds are carved
    from (their ``parent_jti``)."""

    __tablename__ = "token_slice"
    __table_args__ = (Index("ix_token_slice_open", "released_at", "expires_at"),)

    jti: str = Field(primary_key=True, max_length=64)
    kind: str = Field(default="token", max_length=8)  # token | grant
    parent_jti: str | None = Field(default=None, index=True, max_length=64)
    workload_id: str = Field(index=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    budget_micros: int = Field(sa_type=BigInteger)
    spent_micros: int = Field(default=0, sa_type=BigInteger)
    held_micros: int = Field(default=0, sa_type=BigInteger)
    issued_at: int = Field(sa_type=BigInteger)
    expires_at: int = Field(sa_type=BigInteger)
    # Set once the unspent part went back to the budgets; never released twice.
    released_at: int | None = Field(default=None, sa_type=BigInteger)
    revoked_at: int | None = Field(default=None, sa_type=BigInteger)


class LiveSlices(SQLModel, table=True):
    """How many token slices of a workload are not yet released: bounded by
    ``policy.max_live_tokens`` with a conditional update at issuance, decremented when a slice is
    released (see :mod:`broker.money.ledger`).

    A row of its own, not a column of ``workload``: every transaction takes it after the budget
    counters, while suspensions and edits lock the workload row first; on the workload row the
    two orders would meet and deadlock."""

    __tablename__ = "live_slices"

    workload_id: str = Field(primary_key=True, max_length=40)
    count: int = Field(default=0, sa_type=BigInteger)


class SliceCounter(SQLModel, table=True):
    """Which budget counters a token's slice was reserved from."""

    __tablename__ = "slice_counter"

    jti: str = Field(primary_key=True, foreign_key="token_slice.jti", max_length=64)
    counter_id: int = Field(primary_key=True, foreign_key="budget_counter.id")


class Hold(SQLModel, table=True):
    """Worst-case cost held inside a token's slice while a gateway request runs."""

    __tablename__ = "hold"

    id: str = Field(primary_key=True, max_length=64)
    jti: str = Field(foreign_key="token_slice.jti", index=True, max_length=64)
    amount_micros: int = Field(sa_type=BigInteger)
    created_at: int = Field(sa_type=BigInteger, index=True)


class UsageEvent(SQLModel, table=True):
    __tablename__ = "usage_event"
    __table_args__ = (
        Index("ix_usage_event_ts", "ts"),
        # The rollup job finds the events not yet rolled up, oldest first; retention deletes
        # old ones that were (see broker.money.rollups).
        Index("ix_usage_event_rolled_up_ts", "rolled_up", "ts"),
    )

    # The hold's id: one hold settles into exactly one event, so a retry cannot write two.
    id: str = Field(primary_key=True, max_length=64)
    request_id: str = Field(index=True, max_length=64)
    ts: int = Field(sa_type=BigInteger)
    tenant_id: str = Field(index=True, max_length=40)
    workload_id: str = Field(index=True, max_length=40)
    jti: str = Field(max_length=64)
    model: str = Field(max_length=256)
    provider: str = Field(max_length=64)
    prompt_tokens: int = Field(default=0, sa_type=BigInteger)
    completion_tokens: int = Field(default=0, sa_type=BigInteger)
    cost_micros: int = Field(default=0, sa_type=BigInteger)
    status: str = Field(max_length=32)
    latency_ms: int = Field(default=0, sa_type=BigInteger)
    stream: bool = False
    estimated: bool = False
    client_ip: str | None = Field(default=None, max_length=64)
    # The server-side tool calls the provider billed, by tool name, as compact JSON.
    tool_calls: str | None = Field(default=None, max_length=1024)
    # Counted in the usage rollups (broker.money.rollups): set once, in the rollup's
    # transaction. A database default, as the ledger's INSERT does not name it.
    rolled_up: bool = Field(default=False, sa_column_kwargs={"server_default": false()})


class AuditEvent(SQLModel, table=True):
    """One entry of the hash chain (see :mod:`broker.storage.audit`): ``hash`` covers
    ``prev_hash`` and the entry's canonical JSON, so an edit, a deletion, an insertion or a
    reordering shows."""

    __tablename__ = "audit_event"

    id: int | None = Field(default=None, primary_key=True)
    # The position in the chain: 1, 2, 3... without a gap; unique, so two replicas that both
    # appended after the same head could not both commit.
    seq: int = Field(sa_type=BigInteger, unique=True, index=True)
    ts: int = Field(sa_type=BigInteger, index=True)
    actor: str = Field(max_length=64)
    action: str = Field(max_length=64, index=True)
    target: str = Field(max_length=128)
    tenant_id: str | None = Field(default=None, max_length=64, index=True)
    detail: dict[str, Any] = _json()
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


class AuditHead(SQLModel, table=True):
    """The chain's last entry (one row, ``id`` 1): every append locks it, so appends are
    serialised across replicas and each one links to the entry committed before it."""

    __tablename__ = "audit_head"

    id: int = Field(primary_key=True)
    seq: int = Field(sa_type=BigInteger)
    hash: str = Field(max_length=64)


class AuditCheckpoint(SQLModel, table=True):
    """A signed statement that the chain's entry ``seq`` had ``hash`` at ``ts``; signed with the
    audit key held in Vault, so whoever can write the database cannot forge one."""

    __tablename__ = "audit_checkpoint"

    seq: int = Field(sa_type=BigInteger, primary_key=True)
    hash: str = Field(max_length=64)
    ts: int = Field(sa_type=BigInteger)
    kid: str = Field(max_length=64)
    sig: str = Field(max_length=128)
    # Copied out of the database (audit.checkpoint_file, audit.checkpoint_webhook): a copy
    # that failed is tried again at the next checkpoint, oldest first.
    file_written: bool = False
    webhook_sent: bool = False


class Revocation(SQLModel, table=True):
    """One revocation, suspension or resume: the log every replica replays into its in-memory
    denylist (see :mod:`broker.revocation.log`). Entries are pruned once they can change nothing."""

    __tablename__ = "revocation"

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=16)  # token | workload | tenant
    action: str = Field(max_length=16)  # revoke | suspend | resume | cut
    target: str = Field(max_length=64)  # a jti, a workload id or a tenant id
    tenant_id: str = Field(index=True, max_length=40)
    # Suspensions: tokens issued at or before this time are dead, even after a resume.
    cutoff: int | None = Field(default=None, sa_type=BigInteger)
    # Token revocations: the token's own expiry.
    expires_at: int | None = Field(default=None, sa_type=BigInteger)
    # After this time the entry can no longer refuse any live token.
    relevant_until: int = Field(sa_type=BigInteger, index=True)
    created_at: int = Field(sa_type=BigInteger, index=True)
    actor: str = Field(max_length=64)
    reason: str | None = Field(default=None, max_length=512)


class ScheduledJob(SQLModel, table=True):
    """When each scheduled job last ran, so a restart neither repeats nor skips one."""

    __tablename__ = "scheduled_job"

    name: str = Field(primary_key=True, max_length=64)
    last_run_ms: int = Field(default=0, sa_type=BigInteger)
    last_status: str = Field(default="", max_length=32)
    last_runner: str = Field(default="", max_length=64)
    last_duration_ms: int = Field(default=0, sa_type=BigInteger)


class Alert(SQLModel, table=True):
    """What a detector found about a workload, and what the broker did about it. An open
    ``throttle`` alert cuts the workload's rates until an admin clears it."""

    __tablename__ = "alert"
    __table_args__ = (
        Index("ix_alert_workload_status", "workload_id", "status"),
        Index("ix_alert_tenant_ts", "tenant_id", "ts"),
    )

    id: str = Field(primary_key=True, max_length=40)
    ts: int = Field(sa_type=BigInteger)
    tenant_id: str = Field(max_length=40)
    workload_id: str = Field(max_length=40)
    detector: str = Field(max_length=16)
    severity: str = Field(max_length=16)  # info | warning | critical
    action: str = Field(max_length=16)  # suspend | throttle | alert
    summary: str = Field(max_length=512)
    evidence: dict[str, Any] = _json()
    status: str = Field(default="open", max_length=16)  # open | cleared
    cleared_at: int | None = Field(default=None, sa_type=BigInteger)
    cleared_by: str | None = Field(default=None, max_length=64)


class AlertOutbox(SQLModel, table=True):
    """One alert to deliver to one configured webhook: written in the alert's transaction, so
    a restart loses none; delivered at least once, in order per (webhook, workload)."""

    __tablename__ = "alert_outbox"
    __table_args__ = (Index("ix_alert_outbox_pending", "delivered_at", "target", "workload_id"),)

    id: int | None = Field(default=None, primary_key=True)
    alert_id: str = Field(max_length=40)
    # Which configured webhook: a digest of its URL. The URL itself is only ever read from
    # configuration, never from here.
    target: str = Field(max_length=64)
    workload_id: str = Field(max_length=40)
    body: str = Field(sa_column=Column(Text, nullable=False))  # the exact JSON posted
    created_at: int = Field(sa_type=BigInteger)
    attempts: int = Field(default=0, sa_type=BigInteger)
    next_attempt_ms: int = Field(default=0, sa_type=BigInteger)
    delivered_at: int | None = Field(default=None, sa_type=BigInteger)
    last_error: str | None = Field(default=None, max_length=128)


class MonitorState(SQLModel, table=True):
    """A workload's detector baselines (constant size), so a restart does not forget them."""

    __tablename__ = "monitor_state"

    workload_id: str = Field(primary_key=True, max_length=40)
    state: dict[str, Any] = _json()
    updated_at: int = Field(sa_type=BigInteger)


class Approval(SQLModel, table=True):
    """A workload's request for a model that needs approval, or for burst capacity."""

    __tablename__ = "approval"
    __table_args__ = (Index("ix_approval_status_created", "status", "created_at"),)

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    workload_id: str = Field(index=True, max_length=40)
    model: str | None = Field(default=None, max_length=256)
    tool: str | None = Field(default=None, max_length=64)
    budget_micros: int = Field(default=0, sa_type=BigInteger)
    rpm: int | None = Field(default=None, sa_type=BigInteger)
    tpm: int | None = Field(default=None, sa_type=BigInteger)
    ttl_s: int = Field(sa_type=BigInteger)
    reason: str | None = Field(default=None, max_length=512)
    status: str = Field(default="pending", max_length=16)  # pending | approved | denied | expired
    created_at: int = Field(sa_type=BigInteger)
    expires_at: int = Field(sa_type=BigInteger)  # while pending
    decided_at: int | None = Field(default=None, sa_type=BigInteger)
    decided_by: str | None = Field(default=None, max_length=64)
    decision_reason: str | None = Field(default=None, max_length=512)
    grant_id: str | None = Field(default=None, max_length=40)


class AccessGrant(SQLModel, table=True):
    """A time-bound grant: a model beyond approval, extra budget (a ``grant`` token slice of
    the same id, reserved from the tenant and organisation budgets), higher rates."""

    __tablename__ = "access_grant"
    __table_args__ = (Index("ix_access_grant_workload", "workload_id", "expires_at"),)

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    workload_id: str = Field(max_length=40)
    approval_id: str | None = Field(default=None, max_length=40)
    model: str | None = Field(default=None, max_length=256)
    tool: str | None = Field(default=None, max_length=64)
    budget_micros: int = Field(default=0, sa_type=BigInteger)
    rpm: int | None = Field(default=None, sa_type=BigInteger)
    tpm: int | None = Field(default=None, sa_type=BigInteger)
    created_at: int = Field(sa_type=BigInteger)
    expires_at: int = Field(sa_type=BigInteger)
    created_by: str = Field(max_length=64)
    reason: str | None = Field(default=None, max_length=512)
    revoked_at: int | None = Field(default=None, sa_type=BigInteger)
    revoked_by: str | None = Field(default=None, max_length=64)
    # Set once its end was recorded and its unspent budget went back (it is then history).
    ended_at: int | None = Field(default=None, sa_type=BigInteger)


class WorkloadBinding(SQLModel, table=True):
    """A rule that binds an external identity (a verified subject token's claims) to a
    workload. ``match_sub`` is the rule's ``sub`` when it names one exactly: the index that
    keeps an exchange from reading every rule of its issuer."""

    __tablename__ = "workload_binding"
    __table_args__ = (Index("ix_workload_binding_lookup", "issuer", "match_sub"),)

    id: str = Field(primary_key=True, max_length=40)
    workload_id: str = Field(foreign_key="workload.id", index=True, max_length=40)
    tenant_id: str = Field(max_length=40)
    issuer: str = Field(max_length=64)
    claims: dict[str, Any] = _json()
    match_sub: str | None = Field(default=None, max_length=1024)
    position: int = Field(sa_type=BigInteger)
    created_at: int = Field(sa_type=BigInteger)


class ResponseContext(SQLModel, table=True):
    """How many tokens a response the gateway metered left stored at its provider (OpenAI
    Responses): what a later request that continues it (``previous_response_id``) is billed
    again as input. Never the conversation itself."""

    __tablename__ = "response_context"

    id: str = Field(primary_key=True, max_length=128)
    tenant_id: str = Field(max_length=40)
    provider: str = Field(max_length=64)
    context_tokens: int = Field(sa_type=BigInteger)
    created_at: int = Field(sa_type=BigInteger, index=True)


class BatchFile(SQLModel, table=True):
    """A batch input file the broker checked and uploaded to its provider (``id``: the
    provider's file id). Its worst case is kept in token units, by model and by line, so that a
    batch made from it is held (and a line without usage charged) at the prices of its day."""

    __tablename__ = "batch_file"

    id: str = Field(primary_key=True, max_length=128)
    tenant_id: str = Field(index=True, max_length=40)
    workload_id: str = Field(max_length=40)
    provider: str = Field(max_length=64)
    filename: str = Field(max_length=256)
    bytes: int = Field(sa_type=BigInteger)  # the file as uploaded to the provider
    lines: int = Field(sa_type=BigInteger)
    models: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # model -> [prompt, completion, cached, cache write, 1-hour cache write] tokens, summed
    worst: dict[str, Any] = _json()
    # custom_id -> [model, the same five counts]: one line's worst case
    line_worst: dict[str, Any] = _json()
    created_at: int = Field(sa_type=BigInteger)


class BatchJob(SQLModel, table=True):
    """A batch job at a provider and the money it holds: a ``job`` token slice (``jti``) carved
    out of the launching token's, with one hold per model (``hold_ids``), settled once by the
    poller. ``id`` is the provider's batch id; until the provider answered the creation, it is
    the job slice's jti (``status`` ``creating``)."""

    __tablename__ = "batch_job"
    __table_args__ = (Index("ix_batch_job_open", "settled_at", "created_at"),)

    id: str = Field(primary_key=True, max_length=128)
    tenant_id: str = Field(index=True, max_length=40)
    workload_id: str = Field(max_length=40)
    jti: str = Field(unique=True, max_length=64)
    hold_ids: dict[str, Any] = _json()  # model -> the id of its hold in the job slice
    provider: str = Field(max_length=64)
    input_file_id: str = Field(max_length=128)
    status: str = Field(max_length=32)
    created_at: int = Field(sa_type=BigInteger)
    settled_at: int | None = Field(default=None, sa_type=BigInteger)


# The shared rate limits' tables are in a module of their own; importing the models registers
# them too (migrations/env.py compares every table to the migrations).
from broker.storage import console_models as _console_models  # noqa: E402, F401
from broker.storage import credential_models as _credential_models  # noqa: E402, F401
from broker.storage import limit_models as _limit_models  # noqa: E402, F401
from broker.storage import usage_models as _usage_models  # noqa: E402, F401
