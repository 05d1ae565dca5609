"""Bindings: the rules that map a verified external identity to exactly one workload.

A rule names an issuer (``auth.issuers.<name>``, or ``vault``) and claims that must all match:
an exact value, or a glob where ``*`` is any run of characters and ``?`` one character.
Claim names are dotted paths into the token's claims (``kubernetes.io.namespace``; a key that
itself holds dots, such as ``kubernetes.io``, is found too).

A rule must pin a workload within its issuer: it names ``sub``, or every claim of one of the
sets the issuer type documents as identifying (Kubernetes namespace and service account, GitHub
``repository_id``, ...), each with more than wildcards. Otherwise one careless rule would hand
a workload to every token of a cluster or of GitHub.

An exchange that matches no workload, or more than one, is refused the same way as a wrong
secret; a clash is logged and audited for the admins, who alone can resolve it.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import ColumnElement, Connection, delete, insert, select

from broker.errors import Conflict, ValidationFailed
from broker.plugin import ExternalIdentity
from broker.storage.db import Sql
from broker.storage.models import WorkloadBinding

log = logging.getLogger(__name__)

_binding = WorkloadBinding.__table__  # type: ignore[attr-defined]

MAX_BINDINGS = 16
MAX_CLAIMS = 16
_MAX_DEPTH = 8
_WILDCARDS = frozenset("*?")

# Each usable issuer's name -> the claim sets that pin a workload within it (besides ``sub``).
Pinning = Mapping[str, tuple[tuple[str, ...], ...]]


class BindingRule(BaseModel):
    """One rule as the admin API takes it."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    issuer: str = Field(min_length=1, max_length=64)
    claims: dict[str, str] = Field(max_length=MAX_CLAIMS)

    @field_validator("claims")
    @classmethod
    def _claims(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("a binding needs at least one claim")
        for name, pattern in value.items():
            if not (0 < len(name) <= 256 and name.isprintable() and name.strip() == name):
                raise ValueError("claim names are 1 to 256 printable characters")
            if not (0 < len(pattern) <= 1024 and pattern.isprintable()):
                raise ValueError(f"the value for {name!r} must be 1 to 1024 printable characters")
        return value


def check_rules(rules: Sequence[BindingRule], pinning: Pinning) -> None:
    """Refuse (422) a rule for an issuer that is not configured, or one that does not pin a
    workload. ``pinning`` holds each usable issuer's identifying claim sets."""
    if len(rules) > MAX_BINDINGS:
        raise ValidationFailed(f"at most {MAX_BINDINGS} bindings per workload")
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for index, rule in enumerate(rules):
        where = f"bindings[{index}]"
        sets = pinning.get(rule.issuer)
        if sets is None:
            raise ValidationFailed(f"{where}.issuer: no issuer {rule.issuer!r} is configured")
        if not any(_pins(rule.claims, names) for names in (("sub",), *sets)):
            wanted = " or ".join(" + ".join(names) for names in (("sub",), *sets))
            raise ValidationFailed(
                f"{where}: the rule must pin one workload: name {wanted}, not only wildcards")
        key = (rule.issuer, tuple(sorted(rule.claims.items())))
        if key in seen:
            raise ValidationFailed(f"{where}: the same rule is given twice")
        seen.add(key)


def _pins(claims: Mapping[str, str], names: tuple[str, ...]) -> bool:
    return all(name in claims and set(claims[name]) - _WILDCARDS for name in names)


@dataclass(frozen=True)
class Binding:
    id: str
    workload_id: str
    issuer: str
    claims: dict[str, str]
    tenant_id: str = ""


def replace(conn: Connection, workload_id: str, tenant_id: str, rules: Sequence[BindingRule],
            now: int) -> list[Binding]:
    """Make ``rules`` the workload's bindings. A rule identical to another workload's is a
    conflict (409): every exchange it matches would be refused as a clash."""
    b = _binding.c
    conn.execute(delete(_binding).where(b.workload_id == workload_id))
    for position, rule in enumerate(rules):
        for other in conn.execute(
                select(b.workload_id, b.claims).where(
                    b.issuer == rule.issuer, b.workload_id != workload_id,
                    _sub_filter(rule.claims.get("sub")))):
            if dict(_json(other.claims)) == rule.claims:
                raise Conflict(f"bindings[{position}] is identical to another workload's binding")
        sub = rule.claims.get("sub")
        conn.execute(insert(_binding).values(
            id=f"bd_{secrets.token_hex(8)}", workload_id=workload_id, tenant_id=tenant_id, issuer=rule.issuer,
            claims=dict(rule.claims), match_sub=sub if sub and not set(sub) & _WILDCARDS else None,
            position=position, created_at=now))
    return of_workloads(conn, [workload_id]).get(workload_id, [])


def _sub_filter(sub: str | None) -> Any:
    b = _binding.c
    if sub is None or set(sub) & _WILDCARDS:
        return b.match_sub.is_(None)
    return b.match_sub == sub


def of_workloads(conn: Connection, workload_ids: Sequence[str]) -> dict[str, list[Binding]]:
    """The bindings of each workload, in the order they were given."""
    if not workload_ids:
        return {}
    b = _binding.c
    rows = conn.execute(select(_binding).where(b.workload_id.in_(list(workload_ids)))
                        .order_by(b.workload_id, b.position)).all()
    out: dict[str, list[Binding]] = {}
    for row in rows:
        out.setdefault(row.workload_id, []).append(
            Binding(row.id, row.workload_id, row.issuer, dict(_json(row.claims)), row.tenant_id))
    return out


def list_page(conn: Connection, scope: Callable[[ColumnElement[Any]], ColumnElement[bool]],
              issuer: str | None, cursor: str | None,
              limit: int) -> tuple[list[Binding], str | None]:
    """Bindings by id, within ``scope`` (a ``WHERE`` clause on the tenant column, from
    :meth:`broker.identity.identities.Actor.scope`) and of one issuer if named."""
    b = _binding.c
    stmt = select(_binding).where(scope(b.tenant_id)).order_by(b.id).limit(limit + 1)
    if issuer is not None:
        stmt = stmt.where(b.issuer == issuer)
    if cursor:
        stmt = stmt.where(b.id > cursor)
    rows = conn.execute(stmt).all()
    more = len(rows) > limit
    rows = rows[:limit]
    found = [Binding(r.id, r.workload_id, r.issuer, dict(_json(r.claims)), r.tenant_id) for r in rows]
    return found, (found[-1].id if more else None)


def delete_for(conn: Connection, workload_id: str) -> None:
    conn.execute(delete(_binding).where(_binding.c.workload_id == workload_id))


def matching_workloads(conn: Connection, identity: ExternalIdentity) -> list[tuple[str, str]]:
    """(workload id, binding id) of every rule the identity matches, one per workload."""
    found: dict[str, str] = {}
    for binding_id, workload_id, claims in _CANDIDATES.run(conn, issuer=identity.issuer,
                                                           sub=identity.sub):
        if workload_id not in found and matches(_json(claims), identity.claims):
            found[workload_id] = binding_id
    return list(found.items())


# A fixed statement: it runs on every exchange.
_CANDIDATES = Sql("""
    SELECT id, workload_id, claims FROM workload_binding
    WHERE issuer = :issuer AND (match_sub IS NULL OR match_sub = :sub)
    ORDER BY workload_id, position""")


def matches(rule: Mapping[str, str], claims: Mapping[str, object]) -> bool:
    """Whether every claim the rule names is present, a string or an integer, and matches."""
    for name, pattern in rule.items():
        value = claim_at(claims, name)
        if isinstance(value, bool) or not isinstance(value, str | int):
            return False
        if not glob_match(pattern, str(value)):
            return False
    return True


def glob_match(pattern: str, value: str) -> bool:
    """Whether ``value`` matches ``pattern`` (``*`` any run, ``?`` one character).

    Not one regular expression: ``a*a*a*...b`` against a long run of ``a`` would backtrack
    for ever, and a pattern is an admin's input checked against a token's claims on every
    exchange. The literal pieces between stars are found left to right instead, each by a
    fixed-length search, which is the leftmost match glob needs."""
    first, *rest = pattern.split("*")
    if not rest:
        return len(value) == len(first) and _piece(first).match(value) is not None
    *middle, last = rest
    end = len(value) - len(last)
    if end < len(first) or not _piece(first).match(value) or not _piece(last).match(value, end):
        return False
    pos = len(first)
    for piece in middle:
        if piece:
            found = _piece(piece).search(value, pos, end)
            if found is None:
                return False
            pos = found.end()
    return True


_MISSING = object()


def claim_at(claims: Mapping[str, object], path: str) -> object:
    """The claim at a dotted path; None when absent. Keys holding dots are tried longest
    first (``kubernetes.io`` before ``kubernetes``)."""
    value = _walk(claims, path.split("."), 0)
    return None if value is _MISSING else value


def _walk(node: object, parts: list[str], depth: int) -> object:
    if not parts:
        return node
    if not isinstance(node, Mapping) or depth > _MAX_DEPTH:
        return _MISSING
    for cut in range(len(parts), 0, -1):
        key = ".".join(parts[:cut])
        if key in node:
            found = _walk(node[key], parts[cut:], depth + 1)
            if found is not _MISSING:
                return found
    return _MISSING


@functools.lru_cache(maxsize=1024)
def _piece(text: str) -> re.Pattern[str]:
    """A star-free piece of a glob: fixed length, so matching it cannot backtrack."""
    return re.compile("".join("." if ch == "?" else re.escape(ch) for ch in text), re.DOTALL)


def _json(raw: Any) -> Mapping[str, str]:
    value = json.loads(raw) if isinstance(raw, str) else raw
    return value if isinstance(value, dict) else {}

