"""Budget reservation at issuance: concurrent requests can never reserve past a cap, and every
unspent slice returns when its token expires."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx
from sqlalchemy import text

from tests.conftest import Broker

SLICE = 100_000


async def _race(url: str, agent: dict[str, Any], n: int) -> Counter[str]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        form = {"grant_type": "client_credentials", "client_id": agent["client_id"],
                "client_secret": agent["client_secret"]}
        replies = await asyncio.gather(*(client.post("/v1/token", data=form) for _ in range(n)))
    outcome: Counter[str] = Counter()
    for r in replies:
        outcome["ok" if r.status_code == 200 else f"{r.status_code} {r.json().get('error')}"] += 1
    return outcome


def _counters(broker: Broker) -> list[tuple[str, int, int]]:
    with broker.services.db.engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT scope, reserved_micros, spent_micros FROM budget_counter ORDER BY scope")).all()
    return [(r[0], int(r[1]), int(r[2])) for r in rows]


def test_200_concurrent_requests_reserve_exactly_ten_slices(make_live_broker: Any,
                                                             db_url: str) -> None:
    # Budgets, not the per-client issuance rate, are what this test races against.
    broker = make_live_broker(db_url, auth={"issuance_rpm": 10_000})
    tenant = broker.create_tenant(budgets=[{"period": "day", "limit_micros": 50 * SLICE}])
    agent = broker.create_workload(tenant["id"], policy={
        "models": ["gpt-4o-mini"], "token_budget_micros": SLICE, "token_ttl_s": 60,
        "budgets": [{"period": "total", "limit_micros": 10 * SLICE}]})

    outcome = asyncio.run(_race(broker.url, agent, 200))

    assert outcome == Counter({"ok": 10, "403 budget_exhausted": 190})
    assert ("workload", 10 * SLICE, 0) in _counters(broker)
    assert ("tenant", 10 * SLICE, 0) in _counters(broker)

    # Once the slices expire the sweeper returns them, and the budget is whole again.
    released, _ = broker.sweep(now=int(time.time()) + 61)
    assert released == 10
    assert [(s, r) for s, r, _ in _counters(broker)] == [("tenant", 0), ("workload", 0)]
    assert broker.sweep(now=int(time.time()) + 61) == (0, 0)  # never twice
    again = asyncio.run(_race(broker.url, agent, 20))
    assert again == Counter({"ok": 10, "403 budget_exhausted": 10})


def test_org_budget_caps_every_tenant(make_broker: Any, sqlite_url: str) -> None:
    broker = make_broker(sqlite_url, org={"budgets": [{"period": "month", "limit_micros": 3 * SLICE}]})
    for _ in range(2):
        tenant = broker.create_tenant()
        agent = broker.create_workload(tenant["id"], policy={
            "models": ["m"], "token_budget_micros": SLICE})
        codes = [broker.client.post("/v1/token", data={
            "grant_type": "client_credentials", "client_id": agent["client_id"],
            "client_secret": agent["client_secret"]}).status_code for _ in range(2)]
        assert codes.count(200) >= 1
    assert ("org", 3 * SLICE, 0) in _counters(broker)


def test_a_slice_larger_than_the_policy_allows_is_refused(broker: Broker) -> None:
    tenant = broker.create_tenant()
    agent = broker.create_workload(tenant["id"], policy={"models": ["m"], "token_budget_micros": 10})
    r = broker.client.post("/v1/token", data={
        "grant_type": "client_credentials", "client_id": agent["client_id"],
        "client_secret": agent["client_secret"], "budget_micros": "11"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
