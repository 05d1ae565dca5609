"""What the broker last learnt about each provider's credential, and the alerts it raises.

One ``provider_status`` row per provider holds the last rotation, the provider-side status of
a watched key and the project spend limit, so that every replica lists the same thing. Alerts
about a provider are organisation-wide (no tenant: only org-wide admins see them) with
``workload_id = "provider:<name>"`` and ``detector = "provider"``; they reach the configured
webhooks like every other alert.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from broker.errors import BrokerError
from broker.monitoring import alerts, webhooks
from broker.settings.monitoring import AlertSettings
from broker.storage.credential_models import ProviderStatus

_status = ProviderStatus.__table__  # type: ignore[attr-defined]

DETECTOR = "provider"
# Error texts are clipped to their column; they name a step and a status, never a secret.
ERROR_CHARS = 256


def alert_subject(provider: str) -> str:
    return f"provider:{provider}"[:40]


def clip(text: str) -> str:
    return text[:ERROR_CHARS]


def describe(exc: BaseException) -> str:
    """An error's text for logs, the journal and the status: the broker's own errors (plugins
    raise :class:`ProviderAdminError`) never hold a key; anything else is named by its type."""
    return clip(str(exc) if isinstance(exc, BrokerError) else type(exc).__name__)


def save(conn: Connection, provider: str, now: int, **values: Any) -> None:
    """Upsert the provider's status row with ``values`` (the other columns keep theirs)."""
    ins: Any = pg_insert(_status) if conn.dialect.name == "postgresql" else sqlite_insert(_status)
    stmt = ins.values(provider=provider, updated_at=now, **values)
    conn.execute(stmt.on_conflict_do_update(
        index_elements=["provider"],
        set_={name: stmt.excluded[name] for name in (*values, "updated_at")}))


def load(conn: Connection) -> dict[str, Any]:
    """Every provider's status row, by provider."""
    return {row.provider: row for row in conn.execute(select(_status)).all()}


def raise_alert(conn: Connection, settings: AlertSettings, provider: str, *, severity: str,
                summary: str, evidence: dict[str, Any], now: int) -> None:
    """Record an alert about ``provider`` and queue it for the webhooks, in the caller's
    transaction."""
    alert = alerts.create(conn, tenant_id="", workload_id=alert_subject(provider),
                          detector=DETECTOR, severity=severity, action="alert",
                          summary=summary, evidence={"provider": provider, **evidence}, now=now)
    webhooks.enqueue(conn, settings, alerts.view(alert), now)


def alert_once(conn: Connection, settings: AlertSettings, provider: str, condition: str,
               *, severity: str, summary: str, evidence: dict[str, Any], now: int) -> bool:
    """Raise an alert for ``condition`` unless it is the one last alerted on (see
    :func:`rearm`). Whether an alert was raised."""
    row = conn.execute(select(_status.c.alerted).where(_status.c.provider == provider)).first()
    if row is not None and row.alerted == condition:
        return False
    save(conn, provider, now, alerted=condition)
    raise_alert(conn, settings, provider, severity=severity, summary=summary,
                evidence=evidence, now=now)
    return True


def rearm(conn: Connection, provider: str, now: int) -> None:
    """All is well again: the next bad condition, even the last one, alerts anew."""
    save(conn, provider, now, alerted=None)
