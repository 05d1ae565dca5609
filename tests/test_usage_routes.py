"""Usage reporting: totals by workload, tenant or model over a half-open time range, and usage
events newest first through an opaque cursor; tenant-scoped like every admin route. Runs on
SQLite and PostgreSQL, with events written straight into the broker's database."""

from __future__ import annotations

import base64
import secrets
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import insert

from broker.storage.models import UsageEvent
from tests.conftest import Broker
from tests.support import assert_problem

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z
MODELS = ("gpt-4o-mini", "claude-3-5-haiku")
SPEC_FIELDS = {"request_id", "ts", "tenant_id", "workload_id", "jti", "model", "provider",
               "prompt_tokens", "completion_tokens", "cost_micros", "status", "latency_ms",
               "stream", "client_ip"}


@dataclass
class World:
    tenant_a: str
    tenant_b: str
    a1: str
    a2: str
    b1: str
    events: list[dict[str, Any]]


def _event(workload: dict[str, Any], i: int, ts: int) -> dict[str, Any]:
    return {
        "id": f"hd_{secrets.token_hex(8)}",
        "request_id": f"req_{i:04d}",
        "ts": ts,
        "tenant_id": workload["tenant_id"],
        "workload_id": workload["id"],
        "jti": f"jti_{i % 4}",
        "model": MODELS[i % 2],
        "provider": "openai" if i % 2 == 0 else "anthropic",
        "prompt_tokens": 10 + i,
        "completion_tokens": 3 * i,
        "cost_micros": 100 * i + 7,
        "status": "ok" if i % 5 else "upstream_error",
        "latency_ms": 20 + i,
        "stream": i % 3 == 0,
        "estimated": i % 7 == 0,
        "client_ip": "10.0.0.1" if i % 2 else None,
    }


def _seed(broker: Broker) -> World:
    """Two tenants, three workloads, 30 events over 15 minutes (pairs share a second)."""
    a, b = broker.create_tenant(), broker.create_tenant()
    a1, a2 = broker.create_workload(a["id"]), broker.create_workload(a["id"])
    b1 = broker.create_workload(b["id"])
    owners = (a1, a2, b1)
    events = [_event(owners[i % 3], i, T0 + (i // 2) * 60) for i in range(30)]
    with broker.services.db.engine.begin() as conn:
        conn.execute(insert(UsageEvent.__table__), events)  # type: ignore[attr-defined]
    return World(a["id"], b["id"], a1["id"], a2["id"], b1["id"], events)


def _expected_totals(events: list[dict[str, Any]], column: str) -> list[dict[str, Any]]:
    sums: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_micros": 0})
    for e in events:
        row = sums[e[column]]
        row["requests"] += 1
        for field in ("prompt_tokens", "completion_tokens", "cost_micros"):
            row[field] += e[field]
    return [{"key": k, **v} for k, v in sorted(sums.items())]


def _get(broker: Broker, path: str, headers: dict[str, str] | None = None, /,
         **params: Any) -> Any:
    resp = broker.client.get(path, params=params, headers=headers or broker.admin())
    assert resp.status_code == 200, resp.text
    return resp.json()


def _all_events(broker: Broker, headers: dict[str, str], **params: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    for _ in range(100):
        page = _get(broker, "/v1/admin/usage/events", headers,
                    **params, **({"cursor": cursor} if cursor else {}))
        out += page["data"]
        cursor = page["next_cursor"]
        if cursor is None:
            return out
    raise AssertionError("pagination did not end")


def _admin_with(broker: Broker, tenant_id: str, role: str) -> dict[str, str]:
    ident = broker.create_workload(tenant_id, kind="admin", roles=[role])
    return {"authorization": f"Bearer {broker.token(ident['client_id'], ident['client_secret'])}"}


def _newest_first(events: list[dict[str, Any]]) -> list[str]:
    return [e["id"] for e in sorted(events, key=lambda e: (e["ts"], e["id"]), reverse=True)]


# --- totals ---------------------------------------------------------------------------------


def test_totals_by_workload_tenant_and_model(broker: Broker) -> None:
    world = _seed(broker)
    for group_by, column in (("workload", "workload_id"), ("tenant", "tenant_id"), ("model", "model")):
        body = _get(broker, "/v1/admin/usage", group_by=group_by)
        assert body == {"data": _expected_totals(world.events, column), "next_cursor": None,
                        "group_by": group_by, "from": None, "to": None}, group_by


def test_totals_group_by_workload_when_none_is_named(broker: Broker) -> None:
    world = _seed(broker)
    body = _get(broker, "/v1/admin/usage")
    assert body["group_by"] == "workload"
    assert body["data"] == _expected_totals(world.events, "workload_id")


def test_time_range_is_half_open_from_inclusive_to_exclusive(broker: Broker) -> None:
    world = _seed(broker)
    # Seconds 120..299 hold events 4..9: from is kept, to is not.
    body = _get(broker, "/v1/admin/usage", group_by="tenant",
                **{"from": "2026-01-01T00:02:00Z", "to": "2026-01-01T00:05:00Z"})
    assert body["from"] == "2026-01-01T00:02:00Z" and body["to"] == "2026-01-01T00:05:00Z"
    assert body["data"] == _expected_totals(world.events[4:10], "tenant_id")

    only_from = _get(broker, "/v1/admin/usage", group_by="model", **{"from": "2026-01-01T00:14:00Z"})
    assert only_from["data"] == _expected_totals(world.events[28:], "model")
    only_to = _get(broker, "/v1/admin/usage", group_by="model", to="2026-01-01T00:01:00Z")
    assert only_to["data"] == _expected_totals(world.events[:2], "model")

    # A fraction of a second after an event excludes it; an offset is converted to UTC.
    later = _get(broker, "/v1/admin/usage", group_by="model",
                 **{"from": "2026-01-01T01:14:00.5+01:00"})
    assert later["from"] == "2026-01-01T00:14:00.5Z" and later["data"] == []
    empty = _get(broker, "/v1/admin/usage", **{"from": "2026-01-01T00:02:00Z",
                                               "to": "2026-01-01T00:02:00Z"})
    assert empty["data"] == []


# --- events ---------------------------------------------------------------------------------


def test_events_page_newest_first_without_duplicates_or_gaps(broker: Broker) -> None:
    world = _seed(broker)
    ids: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 7, **({"cursor": cursor} if cursor else {})}
        page = _get(broker, "/v1/admin/usage/events", **params)
        assert len(page["data"]) <= 7
        ids += [e["id"] for e in page["data"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 5  # 7 + 7 + 7 + 7 + 2
    assert ids == _newest_first(world.events)

    exact = _get(broker, "/v1/admin/usage/events", limit=30)
    assert len(exact["data"]) == 30 and exact["next_cursor"] is None
    default = _get(broker, "/v1/admin/usage/events")
    assert len(default["data"]) == 30


def test_events_carry_every_field_of_the_spec(broker: Broker) -> None:
    world = _seed(broker)
    newest = _get(broker, "/v1/admin/usage/events", limit=1)["data"][0]
    source = next(e for e in world.events if e["id"] == newest["id"])
    assert SPEC_FIELDS | {"estimated"} <= newest.keys()
    assert newest["ts"] == "2026-01-01T00:14:00Z"
    for field in SPEC_FIELDS - {"ts"} | {"estimated"}:
        assert newest[field] == source[field], field


def test_events_filter_by_workload_and_tenant(broker: Broker) -> None:
    world = _seed(broker)
    by_workload = _all_events(broker, broker.admin(), workload_id=world.a2, limit=3)
    assert [e["id"] for e in by_workload] == _newest_first(
        [e for e in world.events if e["workload_id"] == world.a2])
    by_tenant = _all_events(broker, broker.admin(), tenant_id=world.tenant_b)
    assert [e["id"] for e in by_tenant] == _newest_first(
        [e for e in world.events if e["tenant_id"] == world.tenant_b])
    assert _get(broker, "/v1/admin/usage/events", workload_id="wl_nobody")["data"] == []


# --- who sees what --------------------------------------------------------------------------


def test_a_tenant_admin_sees_only_its_own_tenant(broker: Broker) -> None:
    world = _seed(broker)
    mine = [e for e in world.events if e["tenant_id"] == world.tenant_a]
    headers = _admin_with(broker, world.tenant_a, "tenant-admin")

    events = _all_events(broker, headers, limit=4)
    assert [e["id"] for e in events] == _newest_first(mine)
    for group_by, column in (("workload", "workload_id"), ("tenant", "tenant_id"), ("model", "model")):
        body = _get(broker, "/v1/admin/usage", headers, group_by=group_by)
        assert body["data"] == _expected_totals(mine, column)

    # Another tenant's ids find nothing: no 403 that would confirm they exist.
    assert _get(broker, "/v1/admin/usage/events", headers, workload_id=world.b1)["data"] == []
    assert _get(broker, "/v1/admin/usage/events", headers, tenant_id=world.tenant_b)["data"] == []
    assert _get(broker, "/v1/admin/usage/events", headers, tenant_id=world.tenant_a,
                workload_id=world.b1)["data"] == []


def test_an_auditor_reads_everything(broker: Broker) -> None:
    world = _seed(broker)
    headers = _admin_with(broker, world.tenant_b, "auditor")
    assert [e["id"] for e in _all_events(broker, headers, limit=11)] == _newest_first(world.events)
    body = _get(broker, "/v1/admin/usage", headers, group_by="tenant")
    assert body["data"] == _expected_totals(world.events, "tenant_id")


def test_an_agent_token_is_refused_and_no_token_is_unauthorized(broker: Broker) -> None:
    world = _seed(broker)
    agent = broker.create_workload(world.tenant_a, policy={"models": ["gpt-4o-mini"]})
    headers = {"authorization": f"Bearer {broker.token(agent['client_id'], agent['client_secret'])}"}
    for path in ("/v1/admin/usage", "/v1/admin/usage/events"):
        resp = broker.client.get(path, headers=headers)
        assert_problem(resp, 403, "forbidden")
        assert_problem(broker.client.get(path), 401, "invalid_token")


# --- bad input ------------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


BAD_QUERIES: list[tuple[str, str, dict[str, str]]] = [
    ("group-by-unknown", "/v1/admin/usage", {"group_by": "provider"}),
    ("group-by-nul", "/v1/admin/usage", {"group_by": "model\x00"}),
    ("from-not-a-date", "/v1/admin/usage", {"from": "yesterday"}),
    ("from-without-offset", "/v1/admin/usage", {"from": "2026-01-01T00:00:00"}),
    ("from-date-only", "/v1/admin/usage", {"from": "2026-01-01"}),
    ("from-month-13", "/v1/admin/usage", {"from": "2026-13-01T00:00:00Z"}),
    ("from-feb-30", "/v1/admin/usage", {"from": "2026-02-30T00:00:00Z"}),
    ("from-hour-24", "/v1/admin/usage", {"from": "2026-01-01T24:00:00Z"}),
    ("from-year-0", "/v1/admin/usage", {"from": "0000-01-01T00:00:00Z"}),
    ("to-offset-out-of-range", "/v1/admin/usage", {"to": "2026-01-01T00:00:00+24:00"}),
    ("to-plus-sent-unencoded", "/v1/admin/usage", {"to": "2026-01-01T00:00:00 01:00"}),
    ("to-nul", "/v1/admin/usage", {"to": "2026-01-01T00:00:00Z\x00"}),
    ("to-too-long", "/v1/admin/usage", {"to": "2026-01-01T00:00:00." + "0" * 80 + "Z"}),
    ("from-after-to", "/v1/admin/usage", {"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}),
    ("from-after-to-by-a-fraction", "/v1/admin/usage",
     {"from": "2026-01-01T00:00:00.2Z", "to": "2026-01-01T00:00:00.1Z"}),
    ("limit-zero", "/v1/admin/usage/events", {"limit": "0"}),
    ("limit-1001", "/v1/admin/usage/events", {"limit": "1001"}),
    ("limit-negative", "/v1/admin/usage/events", {"limit": "-1"}),
    ("limit-not-a-number", "/v1/admin/usage/events", {"limit": "ten"}),
    ("cursor-garbage", "/v1/admin/usage/events", {"cursor": "not a cursor!"}),
    ("cursor-not-base64", "/v1/admin/usage/events", {"cursor": "a"}),
    ("cursor-not-json", "/v1/admin/usage/events", {"cursor": _b64(b"\xff\xfe")}),
    ("cursor-wrong-shape", "/v1/admin/usage/events", {"cursor": _b64(b'{"ts":1}')}),
    ("cursor-ts-not-int", "/v1/admin/usage/events", {"cursor": _b64(b'["1","hd_x"]')}),
    ("cursor-ts-bool", "/v1/admin/usage/events", {"cursor": _b64(b'[true,"hd_x"]')}),
    ("cursor-ts-huge", "/v1/admin/usage/events", {"cursor": _b64(b'[1e400,"hd_x"]')}),
    ("cursor-id-empty", "/v1/admin/usage/events", {"cursor": _b64(b'[1,""]')}),
    ("cursor-id-nul", "/v1/admin/usage/events", {"cursor": _b64(b'[1,"a\\u0000"]')}),
    ("cursor-too-long", "/v1/admin/usage/events", {"cursor": "A" * 300}),
    ("workload-id-nul", "/v1/admin/usage/events", {"workload_id": "wl_\x00"}),
    ("tenant-id-too-long", "/v1/admin/usage/events", {"tenant_id": "t" * 65}),
]


def test_bad_query_values_are_400_problem_json(broker: Broker) -> None:
    headers = broker.admin()
    for name, path, params in BAD_QUERIES:
        resp = broker.client.get(path, params=params, headers=headers)
        assert resp.status_code == 400, (name, resp.status_code, resp.text)
        assert resp.headers["content-type"].startswith("application/problem+json"), name
        body = resp.json()
        assert body["status"] == 400 and body["type"] == "urn:broker:error:invalid_request", name
        assert {"title", "detail"} <= body.keys(), name


def test_a_cursor_from_the_broker_round_trips_and_points_past_the_page(broker: Broker) -> None:
    world = _seed(broker)
    first = _get(broker, "/v1/admin/usage/events", limit=2)
    assert first["next_cursor"] is not None
    second = _get(broker, "/v1/admin/usage/events", limit=2, cursor=first["next_cursor"])
    order = _newest_first(world.events)
    assert [e["id"] for e in first["data"] + second["data"]] == order[:4]


@pytest.mark.parametrize("path", ["/v1/admin/usage", "/v1/admin/usage/events"])
def test_usage_routes_are_documented_in_openapi(sqlite_broker: Broker, path: str) -> None:
    spec = sqlite_broker.client.get("/openapi.json").json()
    assert "get" in spec["paths"][path]
