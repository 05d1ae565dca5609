"""The audit trail as a hash chain: who did what to which object, when and why. Never holds a
secret.

Entry ``n`` stores ``prev_hash`` (entry ``n-1``'s hash, 64 zeros for the first) and ``hash`` =
lowercase hex SHA-256 of ``prev_hash + "\\n" + RFC 8785 JSON of the entry without "hash"``. The
entry hashed is exactly the one ``GET /v1/admin/audit`` shows (:func:`entry_view`), so anyone
holding the API's output can recompute the chain without the broker's code.

Appends are serialised by a lock on the one ``audit_head`` row, taken in the caller's
transaction: the change and its record land together or not at all, and an entry always links
to the one committed before it, whichever replica wrote that. ``seq`` is also unique, so even a
lost lock could never fork the chain: the second writer's commit would fail instead.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from typing import Any

import rfc8785
from sqlalchemy import Connection

from broker.storage.db import BEFORE_COMMIT, Sql

GENESIS = "0" * 64
# RFC 8785 numbers are IEEE doubles: an integer beyond this could not be written exactly, so it
# is kept as a string (a detail is data a person reads, and must hash the same everywhere).
_MAX_SAFE_INT = 2**53 - 1

_HEAD = Sql("SELECT seq, hash FROM audit_head WHERE id = 1")
# FOR UPDATE: a second replica's append waits here until ours commits, then reads our entry as
# the head (READ COMMITTED re-reads a row that changed while it waited).
_HEAD_LOCKED = Sql("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
_INSERT = Sql("""
    INSERT INTO audit_event (seq, ts, actor, action, target, tenant_id, detail, prev_hash, hash)
    VALUES (:seq, :ts, :actor, :action, :target, :tenant_id, :detail, :prev_hash, :hash)""")
_MOVE_HEAD = Sql("UPDATE audit_head SET seq = :seq, hash = :hash WHERE id = 1")
# Only a database made without the migrations (which write the head) lacks the row; two
# replicas racing to write it collide on its primary key, and one append fails whole.
_FIRST_HEAD = Sql("INSERT INTO audit_head (id, seq, hash) VALUES (1, :seq, :hash)")
_PENDING = "broker.audit.pending"
_ENTRY_COLUMNS = "seq, ts, actor, action, target, tenant_id, detail, prev_hash, hash"
_ASCENDING = Sql(f"SELECT {_ENTRY_COLUMNS} FROM audit_event WHERE seq > :after "  # noqa: S608
                 "ORDER BY seq LIMIT :limit")


def rfc3339(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def plain(value: Any) -> Any:
    """``value`` as JSON that RFC 8785 writes the same way everywhere: integers beyond 2**53,
    NaN and infinities become strings, tuples lists, keys strings."""
    if isinstance(value, str):
        # A lone surrogate (JSON may carry "\ud800" from an outside token's claims) is no
        # UTF-8: RFC 8785 could not write it, and the change it records would fail with it.
        return value if value.isascii() else value.encode("utf-8", "replace").decode()
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if abs(value) <= _MAX_SAFE_INT else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return str(value)


def canonical(entry: dict[str, Any]) -> bytes:
    """RFC 8785 JSON of ``entry`` without its ``hash``."""
    return rfc8785.dumps({k: v for k, v in entry.items() if k != "hash"})


def entry_hash(entry: dict[str, Any]) -> str:
    """The hash an entry (as :func:`entry_view` shows it) must carry."""
    return hashlib.sha256(str(entry["prev_hash"]).encode() + b"\n" + canonical(entry)).hexdigest()


def entry_view(row: Any) -> dict[str, Any]:
    """An entry as the API shows it and as it is hashed; ``row`` has the columns of
    :data:`_ENTRY_COLUMNS` (``detail`` as stored: JSON text or already parsed)."""
    detail = row.detail
    if isinstance(detail, str | bytes):
        detail = json.loads(detail)
    return {"seq": int(row.seq), "ts": rfc3339(int(row.ts)), "actor": row.actor,
            "action": row.action, "target": row.target, "tenant_id": row.tenant_id,
            "detail": detail, "prev_hash": row.prev_hash, "hash": row.hash}


def record(
    conn: Connection, actor: str, action: str, target: str, detail: dict[str, Any], now: int,
    *, tenant_id: str | None = None,
) -> None:
    """Append one entry in the caller's transaction: the change and its record commit together
    or not at all. The tenant is the one named, else the detail's ``tenant_id`` (what a
    tenant-admin may later read). Inside :meth:`Database.transaction` the append waits for the
    transaction's end (:data:`broker.storage.db.BEFORE_COMMIT`)."""
    detail = plain(detail)
    if tenant_id is None and isinstance(detail.get("tenant_id"), str):
        tenant_id = detail["tenant_id"]
    # Clipped to their columns before hashing, so what is stored is what was hashed (an
    # outside issuer's URL as a target can be longer than any id).
    fields = {"ts": now, "actor": plain(actor)[:64], "action": plain(action)[:64],
              "target": plain(target)[:128], "tenant_id": tenant_id, "detail": detail}
    hooks = conn.info.get(BEFORE_COMMIT)
    if hooks is None:  # a transaction the Database did not open: append at once
        _append(conn, [fields])
        return
    if _flush not in hooks:  # the transaction's first entry (what a failed one left goes)
        conn.info[_PENDING] = []
        hooks.append(_flush)
    conn.info[_PENDING].append(fields)


def _flush(conn: Connection) -> None:
    _append(conn, conn.info.pop(_PENDING, []))


def _append(conn: Connection, items: list[dict[str, Any]]) -> None:
    if not items:
        return
    head = (_HEAD_LOCKED if conn.dialect.name == "postgresql" else _HEAD).run(conn).first()
    seq, prev_hash = (0, GENESIS) if head is None else (int(head[0]), str(head[1]))
    for fields in items:
        seq += 1
        entry: dict[str, Any] = {"seq": seq, **fields, "ts": rfc3339(fields["ts"]),
                                 "prev_hash": prev_hash}
        digest = entry_hash(entry)
        _INSERT.run(conn, seq=seq, ts=fields["ts"], actor=fields["actor"],
                    action=fields["action"], target=fields["target"],
                    tenant_id=fields["tenant_id"], detail=json.dumps(fields["detail"]),
                    prev_hash=prev_hash, hash=digest)
        prev_hash = digest
    (_FIRST_HEAD if head is None else _MOVE_HEAD).run(conn, seq=seq, hash=prev_hash)


def head(conn: Connection) -> tuple[int, str]:
    """The chain's last ``(seq, hash)``; ``(0, 64 zeros)`` while it is empty."""
    row = _HEAD.run(conn).first()
    return (0, GENESIS) if row is None else (int(row[0]), str(row[1]))


PAGE = 5000


def entries(conn: Connection, after: int = 0, limit: int = PAGE) -> list[dict[str, Any]]:
    """Entries with ``seq > after`` in chain order, at most ``limit``."""
    return [entry_view(r) for r in _ASCENDING.run(conn, after=after, limit=limit).all()]


def page(
    conn: Connection, *, tenant_id: str | None, action: str | None, before: int | None,
    after: int | None = None, limit: int,
) -> tuple[list[dict[str, Any]], int | None]:
    """One page of entries, filtered by tenant and action: newest first below ``before``, or
    oldest first above ``after`` (what a verifier reads). The second value is the ``seq`` the
    next page starts from, None on the last page."""
    where: list[str] = []
    params: dict[str, Any] = {"limit": limit + 1}
    if tenant_id is not None:
        where.append("tenant_id = :tenant_id")
        params["tenant_id"] = tenant_id
    if action is not None:
        where.append("action = :action")
        params["action"] = action
    if after is not None:
        where.append("seq > :after")
        params["after"] = after
        order = "seq"
    else:
        if before is not None:
            where.append("seq < :before")
            params["before"] = before
        order = "seq DESC"
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    # The clauses are fixed strings chosen above; every value is a bound parameter.
    rows = Sql(f"SELECT {_ENTRY_COLUMNS} FROM audit_event{clause} "  # noqa: S608
               f"ORDER BY {order} LIMIT :limit").run(conn, **params).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return [entry_view(r) for r in rows], (int(rows[-1].seq) if more else None)
