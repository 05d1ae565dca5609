"""The overview page: spend against every budget the user may see (the organisation's, each
tenant's, each workload's), with a chart of spend per day for each."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from markupsafe import Markup
from sqlalchemy import Connection
from starlette.responses import Response

from broker.console.charts import Series, bar_chart, day_label
from broker.console.context import Ctx
from broker.console.queries import DAY, CounterKey, DailySpend, counters, daily_spend
from broker.console.render import html, money
from broker.identity import identities as ids

CHART_DAYS = 14
# Enough for a real deployment's budgeted workloads; beyond, the page says how many it left out.
MAX_WORKLOAD_GROUPS = 100
_WINDOWS = {"hour": "this hour", "day": "today", "month": "this month", "total": "all time"}


@dataclass(frozen=True)
class BudgetRow:
    period: str
    window: str
    limit: int
    reserved: int
    spent: int

    @property
    def used(self) -> int:
        return self.reserved + self.spent

    @property
    def percent(self) -> int:
        return 100 if self.limit <= 0 and self.used > 0 else (
            0 if self.limit <= 0 else round(100 * self.used / self.limit))

    @property
    def meter_value(self) -> int:
        return min(self.used, self.limit) if self.limit > 0 else 0

    @property
    def summary(self) -> str:
        return (f"{money(self.used)} of {money(self.limit)} ({self.percent}%): "
                f"{money(self.spent)} spent, {money(self.reserved)} reserved by live tokens")


@dataclass
class BudgetGroup:
    """One budget holder: its budgets now, and its spend per day."""

    kind: str  # organisation | tenant | workload
    name: str
    ident: str
    link: str | None
    budgets: list[BudgetRow] = field(default_factory=list)
    days: list[tuple[str, str]] = field(default_factory=list)  # (day, amount) for the table
    chart: Markup = field(default_factory=Markup)
    total: str = ""

    @property
    def label(self) -> str:
        return "the organisation" if self.kind == "organisation" else f"{self.kind} {self.name}"


def budget_rows(scope: str, scope_id: str, budgets: list[dict[str, Any]],
                 found: dict[CounterKey, tuple[int, int]]) -> list[BudgetRow]:
    rows = []
    for b in budgets:
        period, limit = str(b["period"]), int(b["limit_micros"])
        reserved, spent = found.get((scope, scope_id, period), (0, 0))
        rows.append(BudgetRow(period, _WINDOWS.get(period, period), limit, reserved, spent))
    return rows


def _finish(group: BudgetGroup, per_day: dict[int, int], first_day: int, n: int) -> BudgetGroup:
    days = [(first_day + i * DAY, per_day.get(first_day + i * DAY, 0)) for i in range(n)]
    daily = [b.limit for b in group.budgets if b.period == "day"]
    series = Series(days, min(daily) if daily else None)
    group.days = [(day_label(d), money(m)) for d, m in days]
    group.total = money(series.total)
    chart_id = f"chart-{group.kind}-{group.ident}".replace("_", "-")
    group.chart = bar_chart(chart_id, f"Spend per day of {group.label}", series)
    return group


@dataclass(frozen=True)
class _Read:
    tenants: list[ids.TenantRecord]
    workloads: list[ids.WorkloadRecord]
    found: dict[CounterKey, tuple[int, int]]
    spend: DailySpend


async def overview(ctx: Ctx) -> Response:
    actor, svc = ctx.actor, ctx.svc
    now = int(time.time())
    today = now - now % DAY
    first_day = today - (CHART_DAYS - 1) * DAY
    org_budgets = [b.model_dump() for b in svc.settings.org.budgets] if actor.org_wide else []

    def read(conn: Connection) -> _Read:
        tenants, _ = ids.list_tenants(conn, actor, None, 500)
        workloads, _ = ids.list_workloads(conn, actor, None, None, 1000)
        keys: list[CounterKey] = [("org", "org", str(b["period"])) for b in org_budgets]
        keys += [("tenant", t.id, str(b["period"])) for t in tenants for b in t.budgets]
        keys += [("workload", w.id, str(b["period"])) for w in workloads
                 for b in w.policy.get("budgets", [])]
        return _Read(tenants, workloads, counters(conn, keys, now),
                     daily_spend(conn, actor, first_day, today + DAY))

    got = await svc.db.read(read)
    groups: list[BudgetGroup] = []
    if actor.org_wide:
        org = BudgetGroup("organisation", "", "org", None,
                          budget_rows("org", "org", org_budgets, got.found))
        groups.append(_finish(org, got.spend.total, first_day, CHART_DAYS))
    for t in got.tenants:
        # A tenant-admin's own tenant is always shown: it is their whole overview.
        if t.budgets or not actor.org_wide:
            group = BudgetGroup("tenant", t.name, t.id, f"/tenants/{t.id}",
                                budget_rows("tenant", t.id, t.budgets, got.found))
            groups.append(_finish(group, got.spend.by_tenant.get(t.id, {}), first_day, CHART_DAYS))
    budgeted = [w for w in got.workloads if w.policy.get("budgets")]
    for w in budgeted[:MAX_WORKLOAD_GROUPS]:
        group = BudgetGroup("workload", w.name, w.id, f"/workloads/{w.id}",
                            budget_rows("workload", w.id, w.policy["budgets"], got.found))
        groups.append(_finish(group, got.spend.by_workload.get(w.id, {}), first_day, CHART_DAYS))
    context = {**ctx.base("Overview"), "groups": groups, "days": CHART_DAYS,
               "left_out": max(0, len(budgeted) - MAX_WORKLOAD_GROUPS),
               "tenant_count": len(got.tenants), "workload_count": len(got.workloads)}
    return html("overview.html", context)
