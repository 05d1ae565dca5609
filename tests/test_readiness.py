"""Health, readiness and metrics.

``/healthz`` answers while the process serves; ``/readyz`` answers 200 only while the database
and Vault both answer, and 503 (problem+json) as soon as either stops; ``/metrics`` is
Prometheus text whose labels hold route templates and codes, never ids or tokens.
"""

from __future__ import annotations

import jwt
from prometheus_client.parser import text_string_to_metric_families

from broker.settings import VaultSettings
from broker.storage.db import Database, make_engine
from broker.storage.vault import Vault
from tests.conftest import SECRETS, Broker, BrokerFactory, _pg_admin

DEAD_PG = "postgresql://postgres@127.0.0.1:1/gone"


def assert_ready(broker: Broker) -> None:
    resp = broker.client.get("/readyz")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"status": "ready", "database": "ok", "vault": "ok"}


def assert_not_ready(broker: Broker, down: str) -> None:
    resp = broker.client.get("/readyz")
    assert resp.status_code == 503, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.headers["x-request-id"]
    body = resp.json()
    assert body["status"] == 503 and {"type", "title", "detail"} <= body.keys()
    assert f"'{down}': 'down'" in body["detail"], body["detail"]
    # Liveness is not readiness: the process still serves.
    assert broker.client.get("/healthz").status_code == 200


def test_healthz_and_readyz_answer_when_everything_is_up(broker: Broker) -> None:
    resp = broker.client.get("/healthz")
    assert resp.status_code == 200 and resp.headers["x-request-id"]
    assert_ready(broker)


def test_readyz_fails_when_the_postgresql_database_is_dropped(make_broker: BrokerFactory,
                                                             pg_url: str) -> None:
    broker = make_broker(pg_url)
    assert_ready(broker)
    name = pg_url.rsplit("/", 1)[1]
    with _pg_admin() as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    assert_not_ready(broker, "database")


def test_readyz_fails_when_the_database_stops_answering(broker: Broker) -> None:
    svc = broker.services
    # The live database is set aside, not disposed: the broker's background jobs may hold one
    # of its connections right now, and a pool disposed under them orphans it.
    live = svc.db
    svc.db = Database(make_engine(DEAD_PG))
    try:
        assert_not_ready(broker, "database")
    finally:
        svc.db.dispose()
        svc.db = live
    assert_ready(broker)  # and back once it answers again


def test_readyz_fails_when_vault_stops_answering(broker: Broker) -> None:
    svc = broker.services
    live = svc.vault
    svc.vault = Vault(VaultSettings(addr="http://127.0.0.1:1", token=live.settings.token,
                                    timeout_s=2))
    try:
        assert_not_ready(broker, "vault")
    finally:
        svc.vault = live
    assert_ready(broker)


def test_metrics_are_prometheus_text_without_ids_or_tokens(broker: Broker) -> None:
    tenant = broker.create_tenant()
    agent = broker.create_workload(tenant["id"], policy={"models": ["gpt-4o-mini"]})
    token = broker.token(agent["client_id"], agent["client_secret"])
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    h = broker.admin()
    broker.client.get(f"/v1/admin/tenants/{tenant['id']}", headers=h)
    broker.client.get(f"/v1/admin/workloads/{agent['id']}", headers=h)
    broker.client.get("/v1/admin/tenants/tn_0123456789abcdef", headers=h)  # 404 with an id
    broker.client.get(f"/no/such/{agent['id']}")
    broker.client.post("/v1/token", data={"grant_type": "client_credentials",
                                          "client_id": agent["client_id"],
                                          "client_secret": "bks_wrong"})
    broker.client.post("/v1/introspect", data={"token": token}, headers=h)

    resp = broker.client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    families = {f.name: f for f in text_string_to_metric_families(text)}  # parses: valid text
    assert "broker_http_requests" in families
    routes = {s.labels["route"] for s in families["broker_http_requests"].samples}
    assert "/v1/admin/tenants/{id}" in routes and "/v1/token" in routes
    for secret in (tenant["id"], agent["id"], agent["client_id"], agent["client_secret"], token,
                   jti, "tn_0123456789abcdef", *SECRETS.values):
        assert secret not in text, secret
