"""Tenants and workload identities: the request schemas and the store.

Functions take a ``Connection`` inside a transaction (see :class:`broker.storage.db.Database`) and an
:class:`Actor` who asks; visibility rules live here, not in the routes: a tenant-admin sees only
its own tenant, and anything else is :class:`NotFound` (never 403), so ids cannot be probed.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    delete,
    false,
    func,
    insert,
    select,
    true,
    update,
)
from sqlalchemy.exc import IntegrityError

from broker.errors import Conflict, Forbidden, NotFound, ValidationFailed
from broker.identity import bindings as binding_store
from broker.identity.bindings import MAX_BINDINGS, BindingRule, Pinning
from broker.identity.credentials import hash_secret, new_client_secret
from broker.identity.names import name_key
from broker.identity.policy import Kind, Name, Policy, Role
from broker.settings import BudgetLimit
from broker.storage.db import Sql
from broker.storage.models import Tenant, Workload
from broker.storage.paging import page

_tenant = Tenant.__table__  # type: ignore[attr-defined]
_workload = Workload.__table__  # type: ignore[attr-defined]

ROOT_TENANT_ID = "tn_root"
BOOTSTRAP_CLIENT_ID = "admin"


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


# --- request bodies ------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class TenantCreate(_Body):
    name: Name
    budgets: list[BudgetLimit] = Field(default_factory=list, max_length=8)


class TenantPatch(_Body):
    name: Name | None = None
    budgets: list[BudgetLimit] | None = Field(default=None, max_length=8)


class WorkloadCreate(_Body):
    tenant_id: str = Field(min_length=1, max_length=40)
    name: Name
    kind: Kind
    roles: list[Role] = Field(default_factory=list, max_length=3)
    policy: Policy = Policy()
    bindings: list[BindingRule] = Field(default_factory=list, max_length=MAX_BINDINGS)

    @model_validator(mode="after")
    def _roles_for_admins_only(self) -> WorkloadCreate:
        if self.roles and self.kind != "admin":
            raise ValueError("roles are only for identities of kind admin")
        if self.kind == "admin" and not self.roles:
            raise ValueError("an admin identity needs at least one role")
        return self


class WorkloadPatch(_Body):
    name: Name | None = None
    roles: list[Role] | None = Field(default=None, max_length=3)
    policy: Policy | None = None
    # Replaces every binding of the workload ([] removes them all).
    bindings: list[BindingRule] | None = Field(default=None, max_length=MAX_BINDINGS)


# --- who asks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Actor:
    """A verified admin caller."""

    id: str
    tenant_id: str
    roles: frozenset[str]

    @property
    def org_wide(self) -> bool:
        return "org-admin" in self.roles or "auditor" in self.roles

    def can_write(self) -> bool:
        return bool(self.roles & {"org-admin", "tenant-admin"})

    def sees_tenant(self, tenant_id: str) -> bool:
        return self.org_wide or tenant_id == self.tenant_id

    def require_write(self) -> None:
        if not self.can_write():
            raise Forbidden("this role is read-only")

    def require_org_admin(self) -> None:
        if "org-admin" not in self.roles:
            raise Forbidden("only an org-admin may do this")

    def scope(self, column: ColumnElement[Any], tenant_id: str | None) -> ColumnElement[bool]:
        """The ``WHERE`` clause that keeps a list to what this actor may see, and to
        ``tenant_id`` when one is asked for: a tenant out of its sight gives an empty list
        (never 403, so ids cannot be probed)."""
        if tenant_id is not None:
            return column == tenant_id if self.sees_tenant(tenant_id) else false()
        return true() if self.org_wide else column == self.tenant_id


# --- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TenantRecord:
    id: str
    name: str
    budgets: list[dict[str, Any]]
    created_at: int
    suspended: bool


@dataclass(frozen=True)
class WorkloadRecord:
    id: str
    tenant_id: str
    name: str
    kind: str
    roles: list[str]
    policy: dict[str, Any]
    client_id: str
    created_at: int
    suspended: bool
    bindings: list[binding_store.Binding] = field(default_factory=list)


@dataclass(frozen=True)
class NewWorkload:
    """A workload just created, and its client secret: shown once, only its keyed hash is kept."""

    workload: WorkloadRecord
    client_secret: str = field(repr=False)


def _tenant_record(row: Any) -> TenantRecord:
    return TenantRecord(id=row.id, name=row.name, budgets=row.budgets,
                        created_at=row.created_at, suspended=row.suspended_at is not None)


def _workload_record(row: Any) -> WorkloadRecord:
    return WorkloadRecord(
        id=row.id, tenant_id=row.tenant_id, name=row.name, kind=row.kind,
        roles=row.roles, policy=row.policy,
        client_id=row.client_id, created_at=row.created_at,
        suspended=row.suspended_at is not None)


# --- tenants -------------------------------------------------------------------------------


def create_tenant(conn: Connection, actor: Actor, body: TenantCreate, now: int) -> TenantRecord:
    actor.require_org_admin()
    tid = new_id("tn")
    budgets = [b.model_dump() for b in body.budgets]
    try:
        with conn.begin_nested():
            conn.execute(
                insert(_tenant).values(
                    id=tid, name=body.name, name_key=name_key(body.name), budgets=budgets,
                    created_at=now,
                )
            )
    except IntegrityError:
        raise Conflict("a tenant with this name exists") from None
    return get_tenant(conn, actor, tid)


def _tenant_row(conn: Connection, actor: Actor, tenant_id: str) -> Any:
    row = conn.execute(select(_tenant).where(_tenant.c.id == tenant_id)).first()
    if row is None or not actor.sees_tenant(row.id):
        raise NotFound("no such tenant")
    return row


def get_tenant(conn: Connection, actor: Actor, tenant_id: str) -> TenantRecord:
    return _tenant_record(_tenant_row(conn, actor, tenant_id))


def list_tenants(
    conn: Connection, actor: Actor, cursor: str | None, limit: int
) -> tuple[list[TenantRecord], str | None]:
    stmt = select(_tenant).order_by(_tenant.c.id).limit(limit + 1)
    if cursor:
        stmt = stmt.where(_tenant.c.id > cursor)
    if not actor.org_wide:
        stmt = stmt.where(_tenant.c.id == actor.tenant_id)
    rows, last = page(conn.execute(stmt).all(), limit)
    return [_tenant_record(r) for r in rows], None if last is None else str(last.id)


def patch_tenant(
    conn: Connection, actor: Actor, tenant_id: str, body: TenantPatch
) -> TenantRecord:
    _tenant_row(conn, actor, tenant_id)
    actor.require_org_admin()
    values: dict[str, Any] = {}
    if body.name is not None:
        values["name"] = body.name
        values["name_key"] = name_key(body.name)
    if body.budgets is not None:
        values["budgets"] = [b.model_dump() for b in body.budgets]
    if values:
        try:
            with conn.begin_nested():
                conn.execute(update(_tenant).where(_tenant.c.id == tenant_id).values(**values))
        except IntegrityError:
            raise Conflict("a tenant with this name exists") from None
    return get_tenant(conn, actor, tenant_id)


def delete_tenant(conn: Connection, actor: Actor, tenant_id: str) -> None:
    _tenant_row(conn, actor, tenant_id)
    actor.require_org_admin()
    if tenant_id == ROOT_TENANT_ID:
        raise Conflict("the root tenant cannot be deleted")
    count = conn.execute(
        select(func.count()).select_from(_workload).where(_workload.c.tenant_id == tenant_id)
    ).scalar_one()
    if count:
        raise Conflict("the tenant still has workloads; delete them first")
    conn.execute(delete(_tenant).where(_tenant.c.id == tenant_id))


# --- workloads -----------------------------------------------------------------------------


def _check_roles_grantable(actor: Actor, roles: list[str]) -> None:
    # A tenant-admin may not mint identities that see beyond its tenant.
    if "org-admin" not in actor.roles and set(roles) - {"tenant-admin"}:
        raise Forbidden("only an org-admin may grant org-admin or auditor")


def create_workload(
    conn: Connection, actor: Actor, body: WorkloadCreate, pepper: bytes, now: int,
    pinning: Pinning,
) -> NewWorkload:
    actor.require_write()
    _tenant_row(conn, actor, body.tenant_id)
    _check_roles_grantable(actor, list(body.roles))
    binding_store.check_rules(body.bindings, pinning)
    wid = new_id("wl")
    secret = new_client_secret()
    try:
        with conn.begin_nested():
            conn.execute(
                insert(_workload).values(
                    id=wid,
                    tenant_id=body.tenant_id,
                    name=body.name,
                    name_key=name_key(body.name),
                    kind=body.kind,
                    roles=list(body.roles),
                    policy=body.policy.model_dump(exclude_none=True),
                    client_id=wid,
                    secret_hash=hash_secret(pepper, secret),
                    created_at=now,
                )
            )
    except IntegrityError:
        raise Conflict("a workload with this name exists in the tenant") from None
    if body.bindings:
        binding_store.replace(conn, wid, body.tenant_id, body.bindings, now)
    return NewWorkload(get_workload(conn, actor, wid), secret)


def _workload_row(conn: Connection, actor: Actor, workload_id: str) -> Any:
    row = conn.execute(select(_workload).where(_workload.c.id == workload_id)).first()
    if row is None or not actor.sees_tenant(row.tenant_id):
        raise NotFound("no such workload")
    return row


def get_workload(conn: Connection, actor: Actor, workload_id: str) -> WorkloadRecord:
    return _with_bindings(conn, [_workload_record(_workload_row(conn, actor, workload_id))])[0]


def _with_bindings(conn: Connection, records: list[WorkloadRecord]) -> list[WorkloadRecord]:
    found = binding_store.of_workloads(conn, [r.id for r in records])
    return [dataclasses.replace(r, bindings=found.get(r.id, [])) for r in records]


def list_workloads(
    conn: Connection, actor: Actor, tenant_id: str | None, cursor: str | None, limit: int
) -> tuple[list[WorkloadRecord], str | None]:
    w = _workload.c
    stmt = select(_workload).order_by(w.id).limit(limit + 1)
    if cursor:
        stmt = stmt.where(w.id > cursor)
    stmt = stmt.where(actor.scope(w.tenant_id, tenant_id))
    rows, last = page(conn.execute(stmt).all(), limit)
    records = _with_bindings(conn, [_workload_record(r) for r in rows])
    return records, None if last is None else str(last.id)


def require_may_manage(actor: Actor, roles: list[str] | None) -> None:
    """A tenant-admin may not act on an identity that holds more than tenant-admin (an
    org-admin or auditor living in its tenant): that would let it take over or silence one."""
    if "org-admin" not in actor.roles and set(roles or []) - {"tenant-admin"}:
        raise Forbidden("only an org-admin may act on an org-admin or auditor identity")


def patch_workload(
    conn: Connection, actor: Actor, workload_id: str, body: WorkloadPatch, now: int,
    pinning: Pinning,
) -> tuple[WorkloadRecord, bool]:
    """Apply the patch; returns the workload and whether its identity changed (roles or
    policy), in which case the caller must cut its live tokens: they carry the old one."""
    row = _workload_row(conn, actor, workload_id)
    actor.require_write()
    require_may_manage(actor, list(row.roles or []))
    values: dict[str, Any] = {}
    if body.name is not None:
        values["name"] = body.name
        values["name_key"] = name_key(body.name)
    if body.roles is not None:
        if row.kind != "admin" and body.roles:
            raise ValidationFailed("roles are only for identities of kind admin")
        if row.kind == "admin" and not body.roles:
            raise ValidationFailed("an admin identity needs at least one role")
        _check_roles_grantable(actor, list(body.roles))
        values["roles"] = list(body.roles)
    if body.policy is not None:
        values["policy"] = body.policy.model_dump(exclude_none=True)
    changed = ("roles" in values and sorted(values["roles"]) != sorted(row.roles or [])) or (
        "policy" in values and values["policy"] != _json_value(row.policy)[0])
    if values:
        try:
            with conn.begin_nested():
                conn.execute(update(_workload).where(_workload.c.id == workload_id).values(**values))
        except IntegrityError:
            raise Conflict("a workload with this name exists in the tenant") from None
    if body.bindings is not None:
        binding_store.check_rules(body.bindings, pinning)
        binding_store.replace(conn, workload_id, row.tenant_id, body.bindings, now)
    return get_workload(conn, actor, workload_id), changed


def delete_workload(conn: Connection, actor: Actor, workload_id: str) -> None:
    _workload_row(conn, actor, workload_id)
    actor.require_write()
    if workload_id == actor.id:
        raise Conflict("an admin cannot delete its own identity")
    binding_store.delete_for(conn, workload_id)
    conn.execute(delete(_workload).where(_workload.c.id == workload_id))


@dataclass(frozen=True)
class Client:
    """What a credential check needs of a workload and its tenant (one joined read)."""

    id: str
    tenant_id: str
    kind: str
    roles: list[str]
    policy: dict[str, Any]
    policy_key: str  # the stored policy's text: a cache key for its parsed form
    client_id: str
    secret_hash: str
    prev_secret_hash: str | None
    prev_secret_expires_at: int | None
    suspended_at: int | None
    tenant_budgets: list[dict[str, Any]]
    tenant_suspended_at: int | None


_CLIENT_COLUMNS = """
    SELECT w.id, w.tenant_id, w.kind, w.roles, w.policy, w.client_id, w.secret_hash,
           w.prev_secret_hash, w.prev_secret_expires_at, w.suspended_at, t.budgets,
           t.suspended_at
    FROM workload w JOIN tenant t ON t.id = w.tenant_id"""
_FIND_CLIENT = Sql(_CLIENT_COLUMNS + " WHERE w.client_id = :client_id")
_FIND_BY_ID = Sql(_CLIENT_COLUMNS + " WHERE w.id = :workload_id")


def _json_value(raw: Any) -> tuple[Any, str]:
    """(value, its text) of a JSON column read through the driver: SQLite hands back text,
    psycopg the decoded value."""
    if isinstance(raw, str):
        return json.loads(raw), raw
    return raw, json.dumps(raw, sort_keys=True)


def find_by_client_id(conn: Connection, client_id: str) -> Client | None:
    return _client(_FIND_CLIENT.run(conn, client_id=client_id).first())


def find_by_workload_id(conn: Connection, workload_id: str) -> Client | None:
    return _client(_FIND_BY_ID.run(conn, workload_id=workload_id).first())


def _client(row: Any) -> Client | None:
    if row is None:
        return None
    policy, policy_key = _json_value(row[4])
    return Client(
        id=row[0], tenant_id=row[1], kind=row[2], roles=list(_json_value(row[3])[0] or []),
        policy=policy, policy_key=policy_key, client_id=row[5], secret_hash=row[6],
        prev_secret_hash=row[7], prev_secret_expires_at=row[8], suspended_at=row[9],
        tenant_budgets=list(_json_value(row[10])[0] or []), tenant_suspended_at=row[11],
    )


def bootstrap_admin(conn: Connection, secret: str, pepper: bytes, now: int) -> bool:
    """Create the ``admin`` org-admin once, when no admin identity exists yet."""
    exists = conn.execute(
        select(_workload.c.id).where(
            and_(_workload.c.kind == "admin", _workload.c.roles.isnot(None))
        )
    ).first()
    if exists is not None:
        return False
    # Replicas starting together on an empty database race here: the loser's inserts hit the
    # primary keys and it simply finds the admin the winner created.
    try:
        with conn.begin_nested():
            _insert_bootstrap_admin(conn, secret, pepper, now)
    except IntegrityError:
        return False
    return True


def _insert_bootstrap_admin(conn: Connection, secret: str, pepper: bytes, now: int) -> None:
    if conn.execute(select(_tenant.c.id).where(_tenant.c.id == ROOT_TENANT_ID)).first() is None:
        conn.execute(insert(_tenant).values(
            id=ROOT_TENANT_ID, name="root", name_key=name_key("root"), budgets=[], created_at=now
        ))
    conn.execute(
        insert(_workload).values(
            id="wl_admin",
            tenant_id=ROOT_TENANT_ID,
            name="admin",
            name_key=name_key("admin"),
            kind="admin",
            roles=["org-admin"],
            policy={},
            client_id=BOOTSTRAP_CLIENT_ID,
            secret_hash=hash_secret(pepper, secret),
            created_at=now,
        )
    )
