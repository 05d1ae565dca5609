"""What each ``broker admin`` command does: one admin API call (or a list followed through its
cursors), shown as a table or a listing for people, or as the API's JSON with ``--json``.

Each handler takes the :class:`Context` and the parsed arguments and returns the exit status;
failures are raised as :class:`~broker.admin_http.AdminCliError` and printed by
:func:`broker.admin_cli.run`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TextIO, cast
from urllib.parse import quote

from broker import admin_tables as tables
from broker.admin_http import (
    EXIT_FAILED,
    EXIT_OK,
    AdminSession,
    Refused,
    UsageError,
    dumps,
    printable,
)
from broker.admin_tables import Column

Handler = Callable[["Context", argparse.Namespace], int]

# The audit chain is read in pages of this many entries (and checkpoints).
AUDIT_PAGE = 500


@dataclass
class Context:
    session: AdminSession
    json: bool
    out: TextIO
    err: TextIO

    def print(self, text: str) -> None:
        print(text, file=self.out)

    def rows(self, document: Mapping[str, Any], columns: list[Column], noun: str) -> int:
        """A list: the document with ``--json``, else a table and where the list goes on."""
        if self.json:
            self.print(dumps(document))
            return EXIT_OK
        data = document.get("data") or []
        self.print(tables.table(data, columns) if data else f"no {noun}")
        nxt = document.get("next_cursor")
        if nxt:
            self.print(f"(more {noun} follow: --all, --limit N, or --cursor {printable(nxt, 300)})")
        return EXIT_OK

    def record(self, obj: Mapping[str, Any], *, after: str | None = None) -> int:
        """One object: the API's JSON with ``--json``, else ``key: value`` lines."""
        if self.json:
            self.print(dumps(obj))
        else:
            self.print(tables.listing(obj))
            if after:
                self.print(after)
        return EXIT_OK

    def done(self, obj: Any, line: str) -> int:
        """An action: the API's JSON with ``--json``, else one line saying what was done."""
        self.print(dumps(obj) if self.json else line)
        return EXIT_OK


def seg(value: str) -> str:
    """A path segment: whatever an id holds, it stays one segment."""
    return quote(value, safe="")


def named(value: str) -> str:
    """An id from the command line, as an error message shows it."""
    return printable(value, 80)


def paging(args: argparse.Namespace) -> dict[str, Any]:
    return {"limit": None if args.all else args.limit, "page_size": args.page_size,
            "cursor": args.cursor}


def reason(args: argparse.Namespace) -> dict[str, Any]:
    return {"reason": args.reason} if args.reason is not None else {}


def _given(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


# --- tenants -----------------------------------------------------------------------------------


def tenants_list(ctx: Context, args: argparse.Namespace) -> int:
    doc = ctx.session.collect("/v1/admin/tenants", what="could not list tenants", **paging(args))
    return ctx.rows(doc, tables.TENANTS, "tenants")


def tenants_get(ctx: Context, args: argparse.Namespace) -> int:
    return ctx.record(ctx.session.call("GET", f"/v1/admin/tenants/{seg(args.id)}",
                                       what=f"could not get tenant {named(args.id)}"))


def tenants_create(ctx: Context, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name}
    if args.budget:
        body["budgets"] = args.budget
    return ctx.record(ctx.session.call("POST", "/v1/admin/tenants", body=body,
                                       what="could not create the tenant"))


def tenants_patch(ctx: Context, args: argparse.Namespace) -> int:
    body = _given(name=args.name, budgets=[] if args.no_budgets else args.budget)
    if not body:
        raise UsageError("nothing to change: give --name, --budget or --no-budgets")
    return ctx.record(ctx.session.call("PATCH", f"/v1/admin/tenants/{seg(args.id)}", body=body,
                                       what=f"could not change tenant {named(args.id)}"))


def tenants_delete(ctx: Context, args: argparse.Namespace) -> int:
    ctx.session.call("DELETE", f"/v1/admin/tenants/{seg(args.id)}",
                     what=f"could not delete tenant {named(args.id)}")
    return ctx.done({"id": args.id, "deleted": True}, f"tenant {named(args.id)} deleted")


# --- suspend and resume, of tenants and workloads -------------------------------------------------


def _switch(kind: str, verb: str, past: str) -> Handler:
    def handler(ctx: Context, args: argparse.Namespace) -> int:
        obj = ctx.session.call("POST", f"/v1/admin/{kind}s/{seg(args.id)}/{verb}",
                               body=reason(args), what=f"could not {verb} {kind} {named(args.id)}")
        return ctx.done(obj, f"{kind} {named(args.id)} {past}")

    handler.__name__ = f"{kind}s_{verb}"
    return handler


tenants_suspend = _switch("tenant", "suspend", "suspended")
tenants_resume = _switch("tenant", "resume", "resumed")
workloads_suspend = _switch("workload", "suspend", "suspended: its live tokens are revoked")
workloads_resume = _switch("workload", "resume", "resumed")


# --- workloads -------------------------------------------------------------------------------------

_SECRET_NOTE = "(the client secret is shown only this once: store it now)"


def workloads_list(ctx: Context, args: argparse.Namespace) -> int:
    doc = ctx.session.collect("/v1/admin/workloads", what="could not list workloads",
                              params={"tenant_id": args.tenant}, **paging(args))
    return ctx.rows(doc, tables.WORKLOADS, "workloads")


def workloads_get(ctx: Context, args: argparse.Namespace) -> int:
    return ctx.record(ctx.session.call("GET", f"/v1/admin/workloads/{seg(args.id)}",
                                       what=f"could not get workload {named(args.id)}"))


def workloads_create(ctx: Context, args: argparse.Namespace) -> int:
    body = {"tenant_id": args.tenant, "name": args.name, "kind": args.kind,
            **_given(roles=args.role, policy=args.policy, bindings=args.bindings)}
    created = ctx.session.call("POST", "/v1/admin/workloads", body=body,
                               what="could not create the workload")
    return ctx.record(created, after=_SECRET_NOTE)


def workloads_patch(ctx: Context, args: argparse.Namespace) -> int:
    body = _given(name=args.name, roles=args.role, policy=args.policy, bindings=args.bindings)
    if not body:
        raise UsageError("nothing to change: give --name, --role, --policy or --bindings")
    return ctx.record(ctx.session.call("PATCH", f"/v1/admin/workloads/{seg(args.id)}", body=body,
                                       what=f"could not change workload {named(args.id)}"))


def workloads_delete(ctx: Context, args: argparse.Namespace) -> int:
    ctx.session.call("DELETE", f"/v1/admin/workloads/{seg(args.id)}",
                     what=f"could not delete workload {named(args.id)}")
    return ctx.done({"id": args.id, "deleted": True}, f"workload {named(args.id)} deleted")


def workloads_rotate_secret(ctx: Context, args: argparse.Namespace) -> int:
    body = {**reason(args), **_given(grace_s=args.grace_s)}
    rotated = ctx.session.call("POST", f"/v1/admin/workloads/{seg(args.id)}/rotate-secret",
                               body=body, what=f"could not rotate the secret of workload "
                               f"{named(args.id)}")
    return ctx.record(rotated, after=_SECRET_NOTE)


def bindings_list(ctx: Context, args: argparse.Namespace) -> int:
    doc = ctx.session.collect("/v1/admin/bindings", what="could not list bindings",
                              params={"tenant_id": args.tenant, "issuer": args.issuer},
                              **paging(args))
    return ctx.rows(doc, tables.BINDINGS, "bindings")


# --- revocation ----------------------------------------------------------------------------------


def tokens_revoke(ctx: Context, args: argparse.Namespace) -> int:
    done = ctx.session.call("POST", f"/v1/admin/tokens/{seg(args.jti)}/revoke", body=reason(args),
                            what=f"could not revoke token {named(args.jti)}")
    returned = done.get("returned_micros") if isinstance(done, dict) else None
    tail = f"; {tables.dollars(returned)} returned to the budgets" if returned else ""
    return ctx.done(done, f"token {named(args.jti)} revoked{tail}")


def revocations_list(ctx: Context, args: argparse.Namespace) -> int:
    doc = ctx.session.collect("/v1/admin/revocations", what="could not list revocations",
                              params={"tenant_id": args.tenant, "kind": args.kind}, **paging(args))
    return ctx.rows(doc, tables.REVOCATIONS, "revocations")


# --- approvals and alerts ----------------------------------------------------------------------


def approvals_list(ctx: Context, args: argparse.Namespace) -> int:
    doc = ctx.session.collect(
        "/v1/admin/approvals", what="could not list approvals",
        params={"status": args.status, "tenant_id": args.tenant, "workload_id": args.workload},
        **paging(args))
    return ctx.rows(doc, tables.APPROVALS, "approvals")


def approvals_get(ctx: Context, args: argparse.Namespace) -> int:
    return ctx.record(ctx.session.call("GET", f"/v1/admin/approvals/{seg(args.id)}",
                                       what=f"could not get approval {named(args.id)}"))


def approvals_approve(ctx: Context, args: argparse.Namespace) -> int:
    body = {**reason(args), **_given(ttl_s=args.ttl_s, budget_micros=args.budget_micros,
                                      rpm=args.rpm, tpm=args.tpm)}
    done = ctx.session.call("POST", f"/v1/admin/approvals/{seg(args.id)}/approve", body=body,
                            what=f"could not approve {named(args.id)}")
    grant = done.get("grant_id") if isinstance(done, dict) else None
    until = done.get("grant_expires_at") if isinstance(done, dict) else None
    tail = f": grant {tables.text(grant)} until {tables.text(until)}" if grant else ""
    return ctx.done(done, f"approval {named(args.id)} approved{tail}")


def approvals_deny(ctx: Context, args: argparse.Namespace) -> int:
    done = ctx.session.call("POST", f"/v1/admin/approvals/{seg(args.id)}/deny", body=reason(args),
                            what=f"could not deny {named(args.id)}")
    return ctx.done(done, f"approval {named(args.id)} denied")


def alerts_list(ctx: Context, args: argparse.Namespace) -> int:
    doc = ctx.session.collect(
        "/v1/admin/alerts", what="could not list alerts",
        params={"status": args.status, "tenant_id": args.tenant, "workload_id": args.workload},
        **paging(args))
    return ctx.rows(doc, tables.ALERTS, "alerts")


def alerts_get(ctx: Context, args: argparse.Namespace) -> int:
    return ctx.record(ctx.session.call("GET", f"/v1/admin/alerts/{seg(args.id)}",
                                       what=f"could not get alert {named(args.id)}"))


def alerts_clear(ctx: Context, args: argparse.Namespace) -> int:
    done = ctx.session.call("POST", f"/v1/admin/alerts/{seg(args.id)}/clear", body=reason(args),
                            what=f"could not clear alert {named(args.id)}")
    return ctx.done(done, f"alert {named(args.id)} cleared")


# --- usage -------------------------------------------------------------------------------------


def _range(args: argparse.Namespace) -> dict[str, Any]:
    return {"from": args.start, "to": args.end}


def usage_totals(ctx: Context, args: argparse.Namespace) -> int:
    doc = ctx.session.collect("/v1/admin/usage", what="could not read usage totals", sized=False,
                              params={"group_by": args.group_by, **_range(args)})
    return ctx.rows(doc, tables.USAGE_TOTALS, "usage")


def usage_series(ctx: Context, args: argparse.Namespace) -> int:
    doc = ctx.session.collect(
        "/v1/admin/usage", what="could not read the usage series", sized=False,
        params={"group_by": args.group_by, "interval": args.interval, **_range(args)})
    return ctx.rows(doc, tables.USAGE_SERIES, "usage")


def usage_events(ctx: Context, args: argparse.Namespace) -> int:
    doc = ctx.session.collect("/v1/admin/usage/events", what="could not list usage events",
                              params={"workload_id": args.workload, "tenant_id": args.tenant},
                              **paging(args))
    return ctx.rows(doc, tables.USAGE_EVENTS, "usage events")


def usage_export(ctx: Context, args: argparse.Namespace) -> int:
    """CSV to standard output, or to ``--output``: written beside it first and renamed into
    place whole, so a failed export never leaves a partial file under that name."""
    what = "could not export usage events"
    params = {"format": "csv", **_range(args)}
    if args.output is None:
        ctx.out.flush()
        sink = getattr(ctx.out, "buffer", None)
        if sink is None:
            raise UsageError("standard output takes no bytes here: use --output FILE")
        ctx.session.download("/v1/admin/usage/export", what=what, params=params, sink=sink)
        sink.flush()
        return EXIT_OK
    target = Path(args.output)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as exc:
        raise Refused(f"{what}: cannot write in {target.parent} ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as file:
            size = ctx.session.download("/v1/admin/usage/export", what=what, params=params,
                                        sink=cast(IO[bytes], file))
        os.replace(tmp, target)
    except OSError as exc:
        raise Refused(f"{what}: cannot write {target} ({exc.strerror})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    ctx.print(f"usage events written to {target} ({size} bytes)")
    return EXIT_OK


# --- audit -----------------------------------------------------------------------------------------


def audit_list(ctx: Context, args: argparse.Namespace) -> int:
    doc = ctx.session.collect(
        "/v1/admin/audit", what="could not list audit entries",
        params={"tenant_id": args.tenant, "action": args.action, "order": args.order},
        **paging(args))
    return ctx.rows(doc, tables.AUDIT, "audit entries")


def audit_checkpoints(ctx: Context, args: argparse.Namespace) -> int:
    doc = ctx.session.collect("/v1/admin/audit/checkpoints",
                              what="could not list audit checkpoints", **paging(args))
    return ctx.rows(doc, tables.CHECKPOINTS, "checkpoints")


def audit_keys(ctx: Context, args: argparse.Namespace) -> int:
    jwks = ctx.session.call("GET", "/v1/admin/audit/keys", what="could not read the audit keys")
    if ctx.json:
        ctx.print(dumps(jwks))
        return EXIT_OK
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    if not isinstance(keys, list):
        raise Refused("could not read the audit keys: the answer is not a JWKS")
    ctx.print(tables.table(keys, tables.AUDIT_KEYS) if keys else "no audit keys")
    return EXIT_OK


def _report_line(ctx: Context, report: Mapping[str, Any], *, source: str) -> int:
    """A verification's report: with ``--json`` as a document on standard output; else the
    success on standard output, or the first problem in one line on standard error."""
    if ctx.json:
        ctx.print(dumps(dict(report)))
    if report.get("ok") is True:
        if not ctx.json:
            ctx.print(f"audit chain ok: {report.get('entries')} entries, "
                      f"{report.get('checkpoints')} checkpoints, head seq {report.get('head_seq')}")
        return EXIT_OK
    where = [f"seq {report['seq']}"] if report.get("seq") is not None else []
    where += [printable(str(report["kind"]), 40)] if report.get("kind") else []
    problem = printable(str(report.get("problem") or "no reason given"))
    print(f"broker admin: {source}: {problem}" + (f" ({', '.join(where)})" if where else ""),
          file=ctx.err)
    return EXIT_FAILED


def audit_verify(ctx: Context, args: argparse.Namespace) -> int:
    """Fetch every entry (oldest first), every checkpoint and the audit keys, and check them
    here, with the verifier of ``broker audit verify``: what this machine computes, not the
    broker's word."""
    # Imported here: only this command needs the verifier (and the cryptography it brings).
    from broker.audit.verify import keys_from_jwks, verify

    session = ctx.session
    entries = session.collect("/v1/admin/audit", what="could not read the audit chain",
                              params={"order": "asc"}, page_size=AUDIT_PAGE)["data"]
    checkpoints = session.collect("/v1/admin/audit/checkpoints", page_size=AUDIT_PAGE,
                                  what="could not read the audit checkpoints")["data"]
    jwks = session.call("GET", "/v1/admin/audit/keys", what="could not read the audit keys")
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise Refused("could not read the audit keys: the answer is not a JWKS")
    report = verify(entries, checkpoints, keys_from_jwks(jwks))
    return _report_line(ctx, {
        "ok": report.ok, "entries": report.entries, "checkpoints": report.checkpoints,
        "head_seq": report.head_seq, "problem": report.problem, "seq": report.seq,
        "kind": report.kind}, source="audit chain verification failed")


def audit_status(ctx: Context, args: argparse.Namespace) -> int:
    """The broker's own verification of the chain (``GET /v1/admin/audit/status``)."""
    report = ctx.session.call("GET", "/v1/admin/audit/status",
                              what="could not read the audit chain's status")
    if not isinstance(report, dict):
        raise Refused("could not read the audit chain's status: the answer is not an object")
    return _report_line(ctx, report, source="the broker reports the audit chain broken")
