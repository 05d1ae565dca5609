"""What ``broker admin`` shows people: aligned tables of lists and ``key: value`` listings of
single objects, money in dollars (the ``--json`` output keeps the API's micro-dollars).

Every value is printed on one line: text from the broker (names, reasons, alert summaries) has
its control and bidirectional characters replaced, so it cannot break a row or steer the
terminal.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from broker.admin_http import printable

Row = Mapping[str, Any]
Column = tuple[str, Callable[[Row], str]]

# A cell longer than this is cut; ``get`` shows the whole value.
MAX_CELL = 60
_MICROS = 1_000_000


def dollars(micros: object) -> str:
    """Micro-dollars as dollars with six decimals (``$0.001234``); anything else as it is."""
    if isinstance(micros, bool) or not isinstance(micros, int):
        return text(micros)
    whole, part = divmod(abs(micros), _MICROS)
    return f"{'-' if micros < 0 else ''}${whole}.{part:06d}"


def _is_budget(value: object) -> bool:
    return isinstance(value, dict) and set(value) == {"period", "limit_micros"}


def text(value: object) -> str:
    """One value on one line: ``-`` for nothing, lists joined with commas, budgets in dollars,
    other structures as compact JSON."""
    if value is None or value == [] or value == {}:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list) and all(_is_budget(v) for v in value):
        return ", ".join(f"{v['period']} {dollars(v['limit_micros'])}" for v in value)
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return printable(", ".join(str(v) for v in value), 10_000)
    if isinstance(value, dict | list):
        return printable(json.dumps(value, separators=(",", ":")), 10_000)
    return printable(str(value), 10_000)


def _cut(cell: str) -> str:
    return cell if len(cell) <= MAX_CELL else cell[: MAX_CELL - 1] + "…"


# --- columns ---------------------------------------------------------------------------------


def col(header: str, key: str) -> Column:
    return header, lambda row: text(row.get(key))


def money(header: str, key: str) -> Column:
    return header, lambda row: dollars(row.get(key))


def table(rows: Sequence[Row], columns: Sequence[Column]) -> str:
    """An aligned table with a header row (just the header when there is no row)."""
    cells = [[header for header, _ in columns]]
    cells += [[_cut(get(row)) for _, get in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in cells)


# --- single objects ----------------------------------------------------------------------------


def _flatten(prefix: str, value: object, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    elif prefix.endswith("_micros") and isinstance(value, int) and not isinstance(value, bool):
        out.append((prefix.removesuffix("_micros"), dollars(value)))
    else:
        out.append((prefix, text(value)))


def listing(obj: Mapping[str, Any], *, skip: Iterable[str] = ()) -> str:
    """``key: value`` lines, nested objects as dotted keys, amounts in dollars."""
    pairs: list[tuple[str, str]] = []
    skipped = set(skip)
    for key, value in obj.items():
        if key not in skipped:
            _flatten(str(key), value, pairs)
    width = max((len(printable(k, 80)) for k, _ in pairs), default=0)
    return "\n".join(f"{printable(k, 80) + ':':<{width + 1}} {v}" for k, v in pairs)


# --- the columns of each list --------------------------------------------------------------------

TENANTS: list[Column] = [
    col("ID", "id"), col("NAME", "name"), col("SUSPENDED", "suspended"),
    col("BUDGETS", "budgets"), col("CREATED", "created_at"),
]
WORKLOADS: list[Column] = [
    col("ID", "id"), col("TENANT", "tenant_id"), col("NAME", "name"), col("KIND", "kind"),
    col("ROLES", "roles"), col("SUSPENDED", "suspended"), col("CREATED", "created_at"),
]
BINDINGS: list[Column] = [
    col("ID", "id"), col("WORKLOAD", "workload_id"), col("TENANT", "tenant_id"),
    col("ISSUER", "issuer"), col("CLAIMS", "claims"),
]
REVOCATIONS: list[Column] = [
    col("ID", "id"), col("CREATED", "created_at"), col("KIND", "kind"), col("ACTION", "action"),
    col("TARGET", "target"), col("TENANT", "tenant_id"), col("ACTOR", "actor"),
    col("REASON", "reason"),
]
APPROVALS: list[Column] = [
    col("ID", "id"), col("STATUS", "status"), col("WORKLOAD", "workload_id"),
    col("MODEL", "model"), col("TOOL", "tool"), money("BUDGET", "budget_micros"),
    col("TTL_S", "ttl_s"), col("CREATED", "created_at"), col("REASON", "reason"),
]
ALERTS: list[Column] = [
    col("ID", "id"), col("TS", "ts"), col("STATUS", "status"), col("SEVERITY", "severity"),
    col("DETECTOR", "detector"), col("ACTION", "action"), col("WORKLOAD", "workload_id"),
    col("SUMMARY", "summary"),
]
USAGE_TOTALS: list[Column] = [
    col("KEY", "key"), col("REQUESTS", "requests"), col("PROMPT_TOKENS", "prompt_tokens"),
    col("COMPLETION_TOKENS", "completion_tokens"), money("COST", "cost_micros"),
]
USAGE_SERIES: list[Column] = [col("BUCKET", "bucket"), *USAGE_TOTALS]
USAGE_EVENTS: list[Column] = [
    col("TS", "ts"), col("WORKLOAD", "workload_id"), col("MODEL", "model"),
    col("STATUS", "status"), col("PROMPT_TOKENS", "prompt_tokens"),
    col("COMPLETION_TOKENS", "completion_tokens"), money("COST", "cost_micros"),
    col("LATENCY_MS", "latency_ms"), col("REQUEST_ID", "request_id"),
]
AUDIT: list[Column] = [
    col("SEQ", "seq"), col("TS", "ts"), col("ACTOR", "actor"), col("ACTION", "action"),
    col("TARGET", "target"), col("TENANT", "tenant_id"),
]
CHECKPOINTS: list[Column] = [
    col("SEQ", "seq"), col("TS", "ts"), col("KID", "kid"), col("HASH", "hash"),
]
AUDIT_KEYS: list[Column] = [
    col("KID", "kid"), col("KTY", "kty"), col("CRV", "crv"), col("X", "x"),
]
