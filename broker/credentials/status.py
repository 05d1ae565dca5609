"""``GET /v1/admin/providers``: each provider's credential mode, key version or token expiry,
last rotation and health. Ids and times only: never a key or a token."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from broker.api.views import iso_or_none
from broker.credentials import health, rotating, watch
from broker.errors import VaultUnavailable
from broker.gateway.provider_keys import KEY_FIELD
from broker.services import Services
from broker.settings import ProviderSettings

Health = Literal["ok", "degraded", "unhealthy", "unknown"]
_RANK: dict[Health, int] = {"ok": 0, "unknown": 1, "degraded": 2, "unhealthy": 3}


@dataclass
class _Verdict:
    """The worst finding wins; its reason is the one shown."""

    health: Health = "ok"
    reason: str | None = None

    def worse(self, health: Health, reason: str) -> None:
        if _RANK[health] > _RANK[self.health]:
            self.health, self.reason = health, reason


def _stored_key(svc: Services, settings: ProviderSettings
                ) -> tuple[int | None, str | None, str | None]:
    """(version, key id, problem) of the key in Vault; the key itself is dropped at once."""
    if settings.vault_path is None:
        return None, None, None
    try:
        found = svc.vault.read(settings.vault_path)
    except VaultUnavailable:
        return None, None, "Vault did not answer"
    if found is None or not found[0].get(KEY_FIELD):
        return None, None, "no key is stored in Vault"
    key_id = found[0].get("key_id")
    return found[1], key_id if isinstance(key_id, str) else None, None


def provider_views(svc: Services) -> list[dict[str, Any]]:
    """Every configured provider, by name (blocking: it reads Vault and the database)."""
    rows = svc.db.read_transaction(health.load)
    now = time.time()
    return [_view(svc, name, settings, rows.get(name), now)
            for name, settings in sorted(svc.settings.providers.items())]


def _view(svc: Services, name: str, settings: ProviderSettings, row: Any,
          now: float) -> dict[str, Any]:
    verdict = _Verdict()
    view: dict[str, Any] = {
        "name": name, "plugin": settings.plugin or name, "credential": settings.credential,
        "key_version": None, "key_id": None, "token_expires_at": None,
        "last_rotation": None, "pending_deletions": [], "key_status": None,
        "spend_limit": None,
    }
    if settings.credential == "federated":
        _federated(svc, name, view, verdict, now)
    else:
        version, key_id, problem = _stored_key(svc, settings)
        view["key_version"], view["key_id"] = version, key_id
        if problem is not None:
            verdict.worse("unknown" if "answer" in problem else "unhealthy", problem)
        elif settings.vault_path is None:
            view["key_version"] = None  # a local server that takes no key
    if row is not None and row.rotation_result is not None:
        view["last_rotation"] = {"at": iso_or_none(row.rotated_at), "result": row.rotation_result,
                                 "actor": row.rotation_actor, "error": row.rotation_error}
        if row.rotation_result == "failed":
            verdict.worse("degraded", "the last rotation failed; the previous key serves on")
    if rotating.key_admin(svc, name) is not None:
        view["pending_deletions"] = [
            {**p, "retire_at": iso_or_none(p["retire_at"])} for p in rotating.pending(svc, name)]
        if any(p["attempts"] >= rotating.ALERT_AFTER_ATTEMPTS or p["state"] == "abandoned"
               for p in view["pending_deletions"]):
            verdict.worse("degraded", "a replaced key could not be deleted at the provider")
    if watch.watched(svc, name) is not None:
        _watched(svc, view, verdict, row, now)
    if settings.project_spend_limit_micros is not None:
        view["spend_limit"] = {
            "limit_micros": settings.project_spend_limit_micros,
            "provider_limit_micros": None if row is None else row.spend_limit_micros,
            "checked_at": None if row is None else iso_or_none(row.spend_limit_checked_at),
            "error": None if row is None else row.spend_limit_error}
        if row is not None and row.spend_limit_error:
            verdict.worse("degraded", "the project spend limit could not be set")
    view["health"], view["health_reason"] = verdict.health, verdict.reason
    return view


def _federated(svc: Services, name: str, view: dict[str, Any], verdict: _Verdict,
               now: float) -> None:
    tokens = svc.provider_tokens
    status = None if tokens is None else tokens.status(name)
    if status is None or status.last_exchange_at is None:
        verdict.worse("unknown", "no token has been exchanged on this replica yet")
        return
    view["token_expires_at"] = iso_or_none(None if status.expires_at is None
                                           else int(status.expires_at))
    view["last_exchange_at"] = iso_or_none(int(status.last_exchange_at))
    valid = status.expires_at is not None and status.expires_at > now
    if status.last_error is not None:
        verdict.worse("degraded" if valid else "unhealthy",
                      f"the last token exchange failed: {status.last_error}")
    elif not valid:
        verdict.worse("unknown", "the token has expired; the next call exchanges again")


def _watched(svc: Services, view: dict[str, Any], verdict: _Verdict, row: Any,
             now: float) -> None:
    if row is None or row.key_checked_at is None:
        verdict.worse("unknown", "the key's status has not been checked yet")
        return
    view["key_status"] = {"status": row.key_status, "expires_at": iso_or_none(row.key_expires_at),
                          "checked_at": iso_or_none(row.key_checked_at),
                          "error": row.watch_error}
    if row.watch_error is not None and row.key_status is None:
        verdict.worse("unknown", f"the key's status could not be checked: {row.watch_error}")
    elif row.key_status != watch.ACTIVE:
        verdict.worse("unhealthy", f"the key in use is {row.key_status} at the provider")
    elif row.key_expires_at is not None and (
            row.key_expires_at - now <= svc.settings.rotation.provider_expiry_warning_s):
        # Unhealthy while it still works: a person has days, not minutes, to make the next.
        verdict.worse("unhealthy", "the key in use expires soon" if row.key_expires_at > now
                      else "the key in use has expired")
    if row.watch_error is not None and row.key_status is not None:
        verdict.worse("degraded", f"the last status check failed: {row.watch_error}")
