"""JSON views: how the API shows what the domain returns. Times are RFC 3339 UTC strings."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from broker.identity.bindings import Binding
from broker.identity.identities import TenantRecord, WorkloadRecord

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def iso(ts: int) -> str:
    """RFC 3339 UTC, zero-padded for any year from 1 to 9999."""
    t = _EPOCH + timedelta(seconds=ts)
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}Z"


def iso_or_none(ts: int | None) -> str | None:
    return None if ts is None else iso(ts)


def event_view(row: Any) -> dict[str, Any]:
    """A usage event."""
    return {
        "id": row.id,
        "request_id": row.request_id,
        "ts": iso(row.ts),
        "tenant_id": row.tenant_id,
        "workload_id": row.workload_id,
        "jti": row.jti,
        "model": row.model,
        "provider": row.provider,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "cost_micros": row.cost_micros,
        "status": row.status,
        "latency_ms": row.latency_ms,
        "stream": bool(row.stream),
        "estimated": bool(row.estimated),
        "client_ip": row.client_ip,
        # Server-side tool calls by tool name (``{"web_search": 3}``); {} without any.
        "tool_calls": json.loads(row.tool_calls) if row.tool_calls else {},
    }


def tenant_view(t: TenantRecord) -> dict[str, Any]:
    return {"id": t.id, "name": t.name, "budgets": t.budgets, "created_at": iso(t.created_at),
            "suspended": t.suspended}


def workload_view(w: WorkloadRecord) -> dict[str, Any]:
    return {"id": w.id, "tenant_id": w.tenant_id, "name": w.name, "kind": w.kind, "roles": w.roles,
            "policy": w.policy, "client_id": w.client_id, "created_at": iso(w.created_at),
            "suspended": w.suspended,
            "bindings": [{"id": b.id, "issuer": b.issuer, "claims": b.claims} for b in w.bindings]}


def binding_view(b: Binding) -> dict[str, Any]:
    return {"id": b.id, "workload_id": b.workload_id, "tenant_id": b.tenant_id,
            "issuer": b.issuer, "claims": b.claims}


def identity_view(identity: TenantRecord | WorkloadRecord) -> dict[str, Any]:
    return tenant_view(identity) if isinstance(identity, TenantRecord) else workload_view(identity)
