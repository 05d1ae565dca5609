"""The console's pages (GET): tenants and workloads, approvals, alerts, audit, providers. Each
reads through the same domain functions as the admin API, with the signed-in user's
:class:`Actor`, so a tenant-admin sees its own tenant only and anything else is "not found"."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio.to_thread
from sqlalchemy import Connection
from starlette.responses import Response

from broker.api.http import path_id
from broker.approvals import requests as approval_store
from broker.console.context import Ctx
from broker.console.overview import budget_rows
from broker.console.queries import CounterKey, LiveToken, counters, live_tokens
from broker.console.render import html, query_id, query_int
from broker.credentials import status as credential_status
from broker.errors import InvalidRequest
from broker.identity import identities as ids
from broker.monitoring import alerts as alert_store
from broker.storage import audit as audit_store

log = logging.getLogger("broker.console")

PAGE = 100


# --- tenants and workloads ----------------------------------------------------------------


async def tenants(ctx: Ctx) -> Response:
    after = query_id(ctx.request, "after")
    found, nxt = await ctx.svc.db.read(lambda conn: ids.list_tenants(conn, ctx.actor, after, PAGE))
    rows = [{"tenant": t, "manage": ctx.actor.can_write() and t.id != ctx.actor.tenant_id}
            for t in found]
    return html("tenants.html", {**ctx.base("Tenants"), "rows": rows, "next": nxt})


@dataclass(frozen=True)
class _TenantRead:
    tenant: ids.TenantRecord
    workloads: list[ids.WorkloadRecord]
    next: str | None
    found: dict[CounterKey, tuple[int, int]]


async def tenant(ctx: Ctx) -> Response:
    tid = path_id(ctx.request)
    after = query_id(ctx.request, "after")
    now = int(time.time())

    def read(conn: Connection) -> _TenantRead:
        record = ids.get_tenant(conn, ctx.actor, tid)
        workloads, nxt = ids.list_workloads(conn, ctx.actor, tid, after, PAGE)
        keys: list[CounterKey] = [("tenant", tid, str(b["period"])) for b in record.budgets]
        return _TenantRead(record, workloads, nxt, counters(conn, keys, now))

    got = await ctx.svc.db.read(read)
    rows = [{"workload": w, "manage": ctx.may_manage(w.roles) and w.id != ctx.actor.id}
            for w in got.workloads]
    context = {**ctx.base(f"Tenant {got.tenant.name}"), "tenant": got.tenant, "rows": rows,
               "next": got.next,
               "budgets": budget_rows("tenant", tid, got.tenant.budgets, got.found),
               "manage": ctx.actor.can_write() and tid != ctx.actor.tenant_id}
    return html("tenant.html", context)


@dataclass(frozen=True)
class _WorkloadRead:
    workload: ids.WorkloadRecord
    tenant_name: str
    tokens: list[LiveToken]
    more_tokens: bool
    found: dict[CounterKey, tuple[int, int]]
    alerts: list[alert_store.AlertRecord]


async def workload(ctx: Ctx) -> Response:
    wid = path_id(ctx.request)
    now = int(time.time())

    def read(conn: Connection) -> _WorkloadRead:
        record = ids.get_workload(conn, ctx.actor, wid)
        tenant_name = ids.get_tenant(conn, ctx.actor, record.tenant_id).name
        tokens, more = live_tokens(conn, wid, now)
        keys: list[CounterKey] = [("workload", wid, str(b["period"]))
                                  for b in record.policy.get("budgets", [])]
        open_alerts, _more = alert_store.list_alerts(
            conn, ctx.actor, tenant_id=None, workload_id=wid, status="open", before=None,
            limit=20)
        return _WorkloadRead(record, tenant_name, tokens, more, counters(conn, keys, now),
                             open_alerts)

    got = await ctx.svc.db.read(read)
    w = got.workload
    manage = ctx.may_manage(w.roles)
    context = {
        **ctx.base(f"Workload {w.name}"), "workload": w, "tenant_name": got.tenant_name,
        "tokens": got.tokens, "more_tokens": got.more_tokens, "alerts": got.alerts,
        "budgets": budget_rows("workload", wid, w.policy.get("budgets", []), got.found),
        "policy": _policy_summary(w.policy),
        # An admin may not suspend itself; everything else is the domain's to refuse.
        "manage": manage, "may_suspend": manage and w.id != ctx.actor.id,
        "grace_s": ctx.svc.settings.auth.secret_grace_s,
    }
    return html("workload.html", context)


def _policy_summary(policy: dict[str, Any]) -> list[tuple[str, str]]:
    """The policy's settings as (name, value) lines: what a reader checks first."""
    out: list[tuple[str, str]] = []
    for key in ("models", "approval_models", "tools", "approval_tools"):
        if policy.get(key):
            out.append((key, ", ".join(str(m) for m in policy[key])))
    for key in ("token_ttl_s", "token_budget_micros", "max_live_tokens", "max_concurrent"):
        if policy.get(key) is not None:
            out.append((key, str(policy[key])))
    rate = policy.get("rate") or {}
    if rate:
        out.append(("rate", ", ".join(f"{k} {v}" for k, v in sorted(rate.items()))))
    if policy.get("batch"):
        out.append(("batch", str(policy["batch"])))
    return out


# --- approvals and alerts -----------------------------------------------------------------


async def approvals(ctx: Ctx) -> Response:
    status = ctx.request.query_params.get("status") or "pending"
    if status not in approval_store.STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(approval_store.STATUSES)}")
    after = query_id(ctx.request, "after")
    now = int(time.time())
    found, nxt = await ctx.svc.db.read(lambda conn: approval_store.list_approvals(
        conn, ctx.actor, status=status, tenant_id=None, workload_id=None, cursor=after,
        limit=PAGE, now=now))
    context = {**ctx.base("Approvals"), "approvals": found, "status": status,
               "statuses": approval_store.STATUSES, "next": nxt, "now": now}
    return html("approvals.html", context)


async def alerts(ctx: Ctx) -> Response:
    status = ctx.request.query_params.get("status") or "open"
    if status not in (*alert_store.STATUSES, "all"):
        raise InvalidRequest("status must be open, cleared or all")
    found, more = await ctx.svc.db.read(lambda conn: alert_store.list_alerts(
        conn, ctx.actor, tenant_id=None, workload_id=None,
        status=None if status == "all" else status, before=None, limit=PAGE))
    context = {**ctx.base("Alerts"), "alerts": found, "status": status, "more": more}
    return html("alerts.html", context)


# --- audit and providers ------------------------------------------------------------------


async def audit(ctx: Ctx) -> Response:
    """Entries newest first; the chain verified on the first page (org-wide roles: a
    tenant-admin sees its own tenant's entries only, which say nothing of the chain)."""
    actor = ctx.actor
    before = query_int(ctx.request, "before")
    action = ctx.request.query_params.get("action") or None
    if action is not None and (len(action) > 64 or not action.isprintable()):
        raise InvalidRequest("The action filter is not valid.")
    tenant_id = query_id(ctx.request, "tenant_id") if actor.org_wide else actor.tenant_id
    entries, nxt = await ctx.svc.db.read(lambda conn: audit_store.page(
        conn, tenant_id=tenant_id, action=action, before=before, limit=PAGE))
    status = await _chain_status(ctx) if actor.org_wide and before is None else None
    context = {**ctx.base("Audit"), "entries": entries, "next": nxt, "action": action or "",
               "tenant_id": tenant_id if actor.org_wide else None, "status": status,
               "org_wide": actor.org_wide}
    return html("audit.html", context)


async def _chain_status(ctx: Ctx) -> dict[str, Any]:
    """The chain's verification, as ``broker audit verify`` reports it; "unknown" when this
    build has no verifier or it could not run (the entries still show)."""
    try:
        from broker.audit.verify import chain_status
    except ImportError:
        return {"state": "unknown", "text": "The chain verifier is not available in this build."}
    try:
        report = await chain_status(ctx.svc)
    except Exception as exc:
        log.warning("console: the audit chain could not be verified (%s)", type(exc).__name__)
        return {"state": "unknown", "text": "The chain could not be verified just now."}
    if report.ok:
        return {"state": "ok", "text": f"Intact: {report.entries} entries and "
                                       f"{report.checkpoints} signed checkpoints verified "
                                       f"(head {report.head_seq})."}
    where = f" at entry {report.seq}" if report.seq is not None else ""
    return {"state": "broken", "text": f"Broken{where}: {report.kind or 'problem'}: "
                                       f"{report.problem or 'see broker audit verify'}"}


def _public_url(url: str | None) -> str:
    """A provider's base URL without anything that could be a credential in it."""
    if not url:
        return ""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


async def providers(ctx: Ctx) -> Response:
    """The configured providers and models: names, endpoints and prices. Keys live in Vault,
    and nothing here reads them."""
    settings = ctx.svc.settings
    # Credential health is organisation-wide information, as in GET /v1/admin/providers.
    health = ({v["name"]: v for v in await anyio.to_thread.run_sync(
        functools.partial(credential_status.provider_views, ctx.svc))}
        if ctx.actor.org_wide else {})
    rows = [{"name": name, "plugin": p.plugin or name, "base_url": _public_url(p.base_url),
             "timeout_s": p.timeout_s, "max_connections": p.max_connections,
             "credential": p.credential, "health": health.get(name, {}).get("health"),
             "health_reason": health.get(name, {}).get("health_reason"),
             "models": sorted(m for m, ms in settings.models.items() if ms.provider == name)}
            for name, p in sorted(settings.providers.items())]
    models = [{"name": name, "provider": m.provider, "upstream": m.upstream_model or name,
               "input": m.input_micros_per_mtok, "output": m.output_micros_per_mtok,
               "batch_discount": m.batch_discount_percent}
              for name, m in sorted(settings.models.items())]
    return html("providers.html", {**ctx.base("Providers"), "providers": rows, "models": models})
