"""``broker admin …``: the admin API from a terminal.

The credential comes from the environment, never from an argument (other users of the host can
read a process's arguments): ``BROKER_TOKEN`` (an admin token, used as it is), else
``BROKER_CLIENT_ID`` and ``BROKER_CLIENT_SECRET`` (a token is got from ``/v1/token`` for the
run). ``BROKER_URL`` names the broker (default ``http://127.0.0.1:8080``).

Output is a table (or ``key: value`` lines) for people, or with ``--json`` the API's JSON as one
document for scripts. A failure is one line on standard error, never a traceback, and the exit
status says what kind (docs/cli.md): 0 done; 1 refused or failed (the broker answered an error,
or the audit chain does not verify); 2 usage (bad arguments, no credential in the environment);
3 the broker could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from broker import admin_commands as cmd
from broker.admin_http import (
    DEFAULT_URL,
    ENV_URL,
    EXIT_FAILED,
    EXIT_USAGE,
    MAX_PAGE,
    AdminCliError,
    AdminSession,
    Credentials,
    printable,
)

EXIT_STATUSES = """\
environment:
  BROKER_URL            the broker (default http://127.0.0.1:8080)
  BROKER_TOKEN          an admin token, used as it is; else
  BROKER_CLIENT_ID and BROKER_CLIENT_SECRET   an admin identity's credentials

exit status:
  0  done
  1  refused or failed: the broker answered an error (the line gives its status), or the
     audit chain does not verify
  2  usage: bad arguments, or no admin credential in the environment
  3  the broker could not be reached (connection refused, DNS, TLS, timeout)
"""

PERIODS = ("hour", "day", "month", "total")
KINDS = ("agent", "service", "interactive", "admin")
ROLES = ("org-admin", "tenant-admin", "auditor")


class _AdminParser(argparse.ArgumentParser):
    """Usage errors in one line (``broker admin: <what> (see: <command> --help)``), exit 2;
    arguments left over are such an error here, not at the top-level parser."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"broker admin: {printable(message)} (see: {self.prog} --help)\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


# --- argument values ---------------------------------------------------------------------------


def _count(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise argparse.ArgumentTypeError("must be a whole number of at least 1")
    return int(raw)


def _page_size(raw: str) -> int:
    size = _count(raw)
    if size > MAX_PAGE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_PAGE}")
    return size


def _natural(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()):
        raise argparse.ArgumentTypeError("must be a whole number")
    return int(raw)


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 3600 seconds")
    return value


def _budget(raw: str) -> dict[str, Any]:
    """``PERIOD=MICROS``: ``day=5000000`` is five dollars a day."""
    period, sep, amount = raw.partition("=")
    if not sep or period not in PERIODS or not (amount.isascii() and amount.isdigit()):
        raise argparse.ArgumentTypeError(
            f"a budget is PERIOD=MICROS with PERIOD one of {', '.join(PERIODS)} "
            "(day=5000000 is $5 a day)")
    return {"period": period, "limit_micros": int(amount)}


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A repeated key would be dropped silently, and a policy must say exactly what it says.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"the key {key!r} is repeated")
        obj[key] = value
    return obj


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _json_of(kind: type[dict[str, Any]] | type[list[Any]]) -> Callable[[str], Any]:
    """JSON given inline, or ``@FILE`` (``@-``: standard input)."""
    noun = "object" if kind is dict else "array"

    def parse(raw: str) -> Any:
        text = raw
        if raw.startswith("@"):
            source = raw[1:]
            try:
                text = sys.stdin.read() if source == "-" else Path(source).read_text("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise argparse.ArgumentTypeError(f"cannot read {source}: {why}") from None
        try:
            value = json.loads(text, object_pairs_hook=_strict_object, parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(
                f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
        if not isinstance(value, kind):
            raise argparse.ArgumentTypeError(f"must be a JSON {noun}")
        return value

    return parse


# --- the parser --------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--json``, ``--url`` and ``--timeout``, before the resource or after the action: given
    after it (where ``top`` is false) they override what was given before."""

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print the API's JSON (one document) instead of a table")
    parser.add_argument("--url", default=default(None),
                        help=f"the broker (default: ${ENV_URL} or {DEFAULT_URL})")
    parser.add_argument("--timeout", type=_seconds, default=default(30.0), metavar="S",
                        help="seconds to wait for each answer (default 30)")


def _resource(resources: Any, name: str, help_text: str) -> Any:
    parser = resources.add_parser(name, help=help_text, description=help_text)
    return parser.add_subparsers(dest="admin_action", required=True, metavar="ACTION")


def _leaf(actions: Any, name: str, handler: cmd.Handler, help_text: str, *,
          paged: bool = False) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = actions.add_parser(name, help=help_text,
                                                         description=help_text)
    _common(parser, top=False)
    if paged:
        how_many = parser.add_mutually_exclusive_group()
        how_many.add_argument("--limit", type=_count, default=100, metavar="N",
                              help="show at most N items (default 100)")
        how_many.add_argument("--all", action="store_true", help="show every item")
        parser.add_argument("--cursor", help="start where a previous list stopped (its "
                            "next_cursor)")
        parser.add_argument("--page-size", type=_page_size, default=MAX_PAGE, metavar="N",
                            help=f"items asked for per request (default {MAX_PAGE})")
    parser.set_defaults(admin_func=handler)
    return parser


def _id(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("id", metavar="ID", help=f"the {what}'s id")


def _reason(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", help="why (kept in the audit trail)")


def _add_tenants(resources: Any) -> None:
    actions = _resource(resources, "tenants", "tenants and their budgets")
    _leaf(actions, "list", cmd.tenants_list, "list tenants", paged=True)
    _id(_leaf(actions, "get", cmd.tenants_get, "show a tenant"), "tenant")
    create = _leaf(actions, "create", cmd.tenants_create, "create a tenant")
    create.add_argument("name", metavar="NAME")
    create.add_argument("--budget", type=_budget, action="append", metavar="PERIOD=MICROS",
                        help="a budget (may be repeated): day=5000000 is $5 a day")
    patch = _leaf(actions, "patch", cmd.tenants_patch, "rename a tenant or replace its budgets")
    _id(patch, "tenant")
    patch.add_argument("--name")
    budgets = patch.add_mutually_exclusive_group()
    budgets.add_argument("--budget", type=_budget, action="append", metavar="PERIOD=MICROS",
                         help="the new budgets (may be repeated; they replace all the others)")
    budgets.add_argument("--no-budgets", action="store_true", help="remove every budget")
    _id(_leaf(actions, "delete", cmd.tenants_delete, "delete a tenant (it must have no "
                                                     "workloads)"), "tenant")
    for verb, handler, help_text in (
            ("suspend", cmd.tenants_suspend, "suspend a tenant: every token of its workloads dies"),
            ("resume", cmd.tenants_resume, "resume a suspended tenant")):
        leaf = _leaf(actions, verb, handler, help_text)
        _id(leaf, "tenant")
        _reason(leaf)


def _workload_fields(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--role", action="append", choices=ROLES,
                        help="an admin's role (may be repeated; replaces the roles)")
    parser.add_argument("--policy", type=_json_of(dict), metavar="JSON|@FILE",
                        help="the policy object (API.md), inline or @FILE (@- for stdin)")
    parser.add_argument("--bindings", type=_json_of(list), metavar="JSON|@FILE",
                        help="the binding rules, a JSON array (replaces every binding)")


def _add_workloads(resources: Any) -> None:
    actions = _resource(resources, "workloads", "workloads and admin identities")
    listing = _leaf(actions, "list", cmd.workloads_list, "list workloads", paged=True)
    listing.add_argument("--tenant", metavar="ID", help="only this tenant's")
    _id(_leaf(actions, "get", cmd.workloads_get, "show a workload"), "workload")
    create = _leaf(actions, "create", cmd.workloads_create,
                   "create a workload; its client secret is printed this once")
    create.add_argument("--tenant", metavar="ID", required=True)
    create.add_argument("--name", required=True)
    create.add_argument("--kind", choices=KINDS, required=True)
    _workload_fields(create)
    patch = _leaf(actions, "patch", cmd.workloads_patch,
                  "change a workload (a new policy or roles end its live tokens)")
    _id(patch, "workload")
    patch.add_argument("--name")
    _workload_fields(patch)
    _id(_leaf(actions, "delete", cmd.workloads_delete, "delete a workload (its tokens die)"),
        "workload")
    for verb, handler, help_text in (
            ("suspend", cmd.workloads_suspend, "suspend a workload: its live tokens die"),
            ("resume", cmd.workloads_resume, "resume a suspended workload")):
        leaf = _leaf(actions, verb, handler, help_text)
        _id(leaf, "workload")
        _reason(leaf)
    rotate = _leaf(actions, "rotate-secret", cmd.workloads_rotate_secret,
                   "give a workload a new client secret, printed this once")
    _id(rotate, "workload")
    rotate.add_argument("--grace-s", type=_natural, metavar="S",
                        help="seconds the old secret keeps working (0: none; default: the "
                        "broker's auth.secret_grace_s)")
    _reason(rotate)


def _add_small(resources: Any) -> None:
    actions = _resource(resources, "bindings", "external identities bound to workloads")
    listing = _leaf(actions, "list", cmd.bindings_list, "list bindings", paged=True)
    listing.add_argument("--tenant", metavar="ID")
    listing.add_argument("--issuer", metavar="NAME")

    actions = _resource(resources, "tokens", "broker tokens")
    revoke = _leaf(actions, "revoke", cmd.tokens_revoke,
                   "revoke a token by its jti; its unspent budget returns")
    revoke.add_argument("jti", metavar="JTI")
    _reason(revoke)

    actions = _resource(resources, "revocations", "the revocation log")
    listing = _leaf(actions, "list", cmd.revocations_list,
                    "list revocations, suspensions and resumes, newest first", paged=True)
    listing.add_argument("--tenant", metavar="ID")
    listing.add_argument("--kind", help="token, workload, tenant, …")


def _add_approvals_and_alerts(resources: Any) -> None:
    actions = _resource(resources, "approvals", "workloads' requests for models or capacity")
    listing = _leaf(actions, "list", cmd.approvals_list, "list approval requests", paged=True)
    listing.add_argument("--status", choices=("pending", "approved", "denied", "expired",
                                              "revoked"))
    listing.add_argument("--tenant", metavar="ID")
    listing.add_argument("--workload", metavar="ID")
    _id(_leaf(actions, "get", cmd.approvals_get, "show an approval request"), "approval")
    approve = _leaf(actions, "approve", cmd.approvals_approve,
                    "approve a pending request (values may lower, never raise, what was asked)")
    _id(approve, "approval")
    approve.add_argument("--ttl-s", type=_count, metavar="S")
    approve.add_argument("--budget-micros", type=_natural, metavar="MICROS")
    approve.add_argument("--rpm", type=_count, metavar="N")
    approve.add_argument("--tpm", type=_count, metavar="N")
    _reason(approve)
    deny = _leaf(actions, "deny", cmd.approvals_deny, "deny a pending request")
    _id(deny, "approval")
    _reason(deny)

    actions = _resource(resources, "alerts", "what the monitor raised")
    listing = _leaf(actions, "list", cmd.alerts_list, "list alerts, newest first", paged=True)
    listing.add_argument("--status", choices=("open", "cleared"))
    listing.add_argument("--tenant", metavar="ID")
    listing.add_argument("--workload", metavar="ID")
    _id(_leaf(actions, "get", cmd.alerts_get, "show an alert"), "alert")
    clear = _leaf(actions, "clear", cmd.alerts_clear,
                  "clear an alert (lifts its throttle; a suspension is lifted by resume)")
    _id(clear, "alert")
    _reason(clear)


def _range(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="start", metavar="TIME",
                        help="from this RFC 3339 time (2025-01-31T00:00:00Z)")
    parser.add_argument("--to", dest="end", metavar="TIME", help="until this RFC 3339 time")


def _add_usage(resources: Any) -> None:
    actions = _resource(resources, "usage", "what was spent")
    totals = _leaf(actions, "totals", cmd.usage_totals, "requests, tokens and cost, grouped")
    series = _leaf(actions, "series", cmd.usage_series, "the same per hour or day")
    series.add_argument("--interval", choices=("hour", "day"), required=True)
    for parser in (totals, series):
        parser.add_argument("--group-by", choices=("workload", "tenant", "model"))
        _range(parser)
    events = _leaf(actions, "events", cmd.usage_events, "usage events, newest first", paged=True)
    events.add_argument("--workload", metavar="ID")
    events.add_argument("--tenant", metavar="ID")
    export = _leaf(actions, "export", cmd.usage_export, "usage events as CSV")
    _range(export)
    export.add_argument("--output", metavar="FILE", help="write to FILE (default: stdout)")


def _add_audit(resources: Any) -> None:
    actions = _resource(resources, "audit", "the tamper-evident audit trail")
    listing = _leaf(actions, "list", cmd.audit_list, "list audit entries", paged=True)
    listing.add_argument("--tenant", metavar="ID")
    listing.add_argument("--action", help="only this action (workload.create, …)")
    listing.add_argument("--order", choices=("asc", "desc"), help="by seq (the broker's "
                         "default order when not given)")
    _leaf(actions, "checkpoints", cmd.audit_checkpoints, "list the signed checkpoints",
          paged=True)
    _leaf(actions, "keys", cmd.audit_keys, "the audit keys (JWKS)")
    _leaf(actions, "verify", cmd.audit_verify,
          "fetch the whole chain, its checkpoints and keys, and verify them here")
    _leaf(actions, "status", cmd.audit_status,
          "the broker's own verification of the chain (org-admin or auditor)")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    admin = sub.add_parser(
        "admin", help="administer a running broker through its admin API",
        description="Administer a running broker through its admin API, with an admin "
                    "credential from the environment.",
        epilog=EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The top-level parser makes plain parsers; this one's errors are one line, like the rest.
    admin.__class__ = _AdminParser
    _common(admin, top=True)
    resources = admin.add_subparsers(dest="admin_resource", required=True, metavar="RESOURCE",
                                     parser_class=_AdminParser)
    _add_tenants(resources)
    _add_workloads(resources)
    _add_small(resources)
    _add_approvals_and_alerts(resources)
    _add_usage(resources)
    _add_audit(resources)
    admin.set_defaults(func=run)


# --- running a command -------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run the parsed command: its exit status, having printed at most one line on standard
    error."""
    session: AdminSession | None = None
    try:
        credentials = Credentials.from_env(os.environ)
        url = args.url or os.environ.get(ENV_URL) or DEFAULT_URL
        session = AdminSession(url, credentials, timeout_s=args.timeout)
        with session:
            code: int = args.admin_func(cmd.Context(session, args.json, sys.stdout, sys.stderr),
                                        args)
            return code
    except AdminCliError as exc:
        message = session.scrub(exc.message) if session is not None else exc.message
        print(f"broker admin: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): nothing more to say, and no traceback at exit.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_FAILED
    except Exception as exc:  # a bug here must still end in one line, never a traceback
        text = f"{type(exc).__name__}: {exc}"
        message = session.scrub(text) if session is not None else text
        print(f"broker admin: unexpected error ({printable(message)})", file=sys.stderr)
        return EXIT_FAILED
