"""What the broker checks at the provider on a schedule (``rotation.provider_watch_interval_s``).

- **Watched keys** (a plugin with :class:`broker.plugin.KeyWatch`, e.g. Anthropic, whose admin
  API cannot create keys): the status and expiry of the key in use. An archived, inactive or
  expired key, or one expiring within ``rotation.provider_expiry_warning_s``, marks the
  provider unhealthy and raises one alert per condition; a person makes the next key in the
  provider's console and writes it to Vault.
- **Federated tokens**: the exchange is tried as a call would (a valid token is reused), so a
  provider whose exchange fails raises one alert even while no call needs it.
- **Project spend limits** (``providers.<name>.project_spend_limit_micros`` on a plugin with
  :class:`broker.plugin.SpendLimiter`, e.g. OpenAI): the provider's hard limit is set, and set
  again whenever someone changed it, so that a bug in the broker's own ledger still meets a
  ceiling at the provider.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
from sqlalchemy import Connection

from broker.credentials import health
from broker.credentials.contract import KeyStatus, KeyWatch, SpendLimiter
from broker.credentials.rotating import admin_key
from broker.errors import BrokerError, Unavailable
from broker.gateway.provider_keys import KEY_FIELD
from broker.services import Services

log = logging.getLogger("broker.credentials")

ACTIVE = "active"
CENT_MICROS = 10_000


def watched(svc: Services, provider: str) -> KeyWatch | None:
    settings = svc.settings.providers.get(provider)
    candidate = svc.providers.get(provider)
    if (settings is None or settings.admin_vault_path is None or settings.vault_path is None
            or not isinstance(candidate, KeyWatch)):
        return None
    return candidate


def limited(svc: Services, provider: str) -> SpendLimiter | None:
    settings = svc.settings.providers.get(provider)
    candidate = svc.providers.get(provider)
    if (settings is None or settings.project_spend_limit_micros is None
            or not isinstance(candidate, SpendLimiter)):
        return None
    return candidate


def watch_all(svc: Services) -> None:
    """The scheduled checks of every provider (one provider's failure stops no other)."""
    for provider, settings in svc.settings.providers.items():
        if watched(svc, provider) is not None:
            watch_provider(svc, provider)
        if limited(svc, provider) is not None:
            sync_spend_limit(svc, provider)
        if settings.credential == "federated":
            probe_exchange(svc, provider)


def probe_exchange(svc: Services, provider: str, now: int | None = None) -> bool:
    """Get a token of a federated provider as a call would (reusing a valid one): a provider
    whose exchange fails is alerted on even while no call needs it. Whether a token was had."""
    now = int(time.time()) if now is None else now
    tokens = svc.provider_tokens
    if tokens is None:
        return False
    try:
        anyio.run(tokens.get, provider)
    except Unavailable as exc:
        error = health.clip(str(exc))
        svc.db.transaction(lambda conn: _alert_condition(
            conn, svc, provider, f"exchange:{provider}", "critical",
            "the token exchange fails: calls answer 503 until it works again",
            {"error": error}, now))
        return False
    svc.db.transaction(lambda conn: health.rearm(conn, provider, now))
    return True


def watch_provider(svc: Services, provider: str, now: int | None = None) -> KeyStatus | None:
    """Check the status of the provider's key in use; record it, and alert on a change for the
    worse. Returns what the provider said (None when it knows no such key, or did not answer)."""
    now = int(time.time()) if now is None else now
    watch = watched(svc, provider)
    settings = svc.settings.providers[provider]
    if watch is None or settings.vault_path is None:
        return None
    try:
        found = svc.vault.read(settings.vault_path)
        key = None if found is None else found[0].get(KEY_FIELD)
        if not isinstance(key, str) or not key:
            raise BrokerError("no key is stored in Vault")
        assert found is not None
        key_id = found[0].get("key_id")
        status = watch.key_status(admin_key(svc, settings), key,
                                  key_id if isinstance(key_id, str) and key_id else None)
    except Exception as exc:
        error = health.describe(exc)
        log.warning("provider %s: the key's status could not be checked: %s", provider, error)
        svc.db.transaction(lambda conn: health.save(conn, provider, now, watch_error=error,
                                                    key_checked_at=now))
        return None
    warning_s = svc.settings.rotation.provider_expiry_warning_s

    def txn(conn: Connection) -> None:
        if status is None:
            health.save(conn, provider, now, key_status="unknown", key_expires_at=None,
                        key_checked_at=now, watch_error="the provider knows no such key")
            _alert_condition(conn, svc, provider, f"unknown:{provider}", "critical",
                             "the key in use is unknown to the provider's admin API", {}, now)
            return
        health.save(conn, provider, now, key_status=status.status[:16],
                    key_expires_at=status.expires_at, key_checked_at=now, watch_error=None)
        evidence = {"key_id": status.key_id, "status": status.status,
                    "expires_at": status.expires_at}
        if status.status != ACTIVE:
            _alert_condition(conn, svc, provider, f"{status.status}:{status.key_id}", "critical",
                             f"the key in use is {status.status}: make a new key in the "
                             "provider's console and write it to Vault", evidence, now)
        elif status.expires_at is not None and status.expires_at - now <= warning_s:
            _alert_condition(conn, svc, provider, f"expiring:{status.key_id}", "warning",
                             "the key in use expires soon: make a new key in the provider's "
                             "console and write it to Vault", evidence, now)
        else:
            health.rearm(conn, provider, now)

    svc.db.transaction(txn)
    return status


def _alert_condition(conn: Connection, svc: Services, provider: str, condition: str,
                     severity: str, summary: str, evidence: dict[str, Any], now: int) -> None:
    health.alert_once(conn, svc.settings.alerts, provider, condition[:160], severity=severity,
                      summary=f"provider {provider}: {summary}", evidence=evidence, now=now)


def sync_spend_limit(svc: Services, provider: str, now: int | None = None) -> int | None:
    """Make the provider's project hard limit the configured one; the limit now in force."""
    now = int(time.time()) if now is None else now
    limiter = limited(svc, provider)
    settings = svc.settings.providers[provider]
    wanted = settings.project_spend_limit_micros
    if limiter is None or wanted is None or settings.project_id is None:
        return None
    try:
        key = admin_key(svc, settings)
        current = limiter.spend_limit(key, settings.project_id)
        # The provider keeps the limit in its own unit (cents): within one of it is the same.
        if current is None or not wanted <= current < wanted + CENT_MICROS:
            limiter.set_spend_limit(key, settings.project_id, wanted)
            current = limiter.spend_limit(key, settings.project_id)
            log.info("provider %s: project spend limit set", provider)
    except Exception as exc:
        error = health.describe(exc)
        log.warning("provider %s: the project spend limit could not be set: %s", provider, error)

        def failed(conn: Connection) -> None:
            row = health.load(conn).get(provider)
            health.save(conn, provider, now, spend_limit_error=error, spend_limit_checked_at=now)
            if row is None or row.spend_limit_error is None:  # one alert per outage
                health.raise_alert(conn, svc.settings.alerts, provider, severity="warning",
                                   summary=f"provider {provider}: the project spend limit "
                                           "could not be set at the provider",
                                   evidence={"error": error}, now=now)

        svc.db.transaction(failed)
        return None
    svc.db.transaction(lambda conn: health.save(
        conn, provider, now, spend_limit_micros=current, spend_limit_checked_at=now,
        spend_limit_error=None))
    return current
