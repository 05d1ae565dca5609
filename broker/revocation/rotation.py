"""Rotation: signing keys, workload secrets and provider keys.

Signing keys move ``next`` -> ``current`` -> ``previous`` -> gone (see :mod:`broker.tokens.keys`).
A rotation promotes the key that has been published as ``next`` since the last rotation, so
verifiers that cache the JWKS already hold it when it starts signing. A ``previous`` key stays
published until every token it signed has expired (its ``retire_at``), then
:func:`retire_signing_keys` removes it. Key material never leaves Vault and this process.

Every rotation is written to the audit table and announced to the other replicas, which
re-read the keyring from Vault (they also re-read it periodically, for rotations made by the
``broker keys rotate`` command).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, update

from broker.errors import Conflict, NotFound, UpstreamError
from broker.identity.credentials import hash_secret, new_client_secret
from broker.identity.identities import Actor, WorkloadRecord, get_workload, require_may_manage
from broker.plugin import KeyAdmin, Provider
from broker.services import Services
from broker.settings import Settings
from broker.storage.audit import record
from broker.storage.bus import publish
from broker.storage.models import Workload
from broker.storage.vault import CasConflict, Vault
from broker.tokens.keys import Keyring, SigningKey

log = logging.getLogger("broker.rotation")

_workload = Workload.__table__  # type: ignore[attr-defined]

# Announced after every signing-key change, so that every replica re-reads the keyring.
KEYS_MESSAGE_TYPE = "keys"


def _states(keyring: Keyring) -> dict[str, str]:
    return {k.kid: k.state for k in keyring.keys.values()}


def rotate_signing_key(
    svc: Services, actor: str, reason: str | None = None, now: int | None = None
) -> SigningKey:
    """Promote ``next`` to ``current`` (the old current becomes ``previous``), create a new
    ``next``, and drop retired keys. Returns the new current key."""
    now = int(time.time()) if now is None else now
    key = svc.keyring.rotate(now)
    states = _states(svc.keyring)

    def txn(conn: Connection) -> None:
        record(conn, actor, "signing_key.rotate", key.kid, {"reason": reason, "keys": states}, now)
        publish(conn, KEYS_MESSAGE_TYPE)

    svc.db.transaction(txn)
    log.info("signing key rotated: current kid %s", key.kid)
    return key


def retire_signing_keys(svc: Services, actor: str = "scheduler", now: int | None = None) -> list[str]:
    """Remove ``previous`` keys whose tokens have all expired, audit it and tell the replicas;
    returns their kids."""
    now = int(time.time()) if now is None else now
    gone = svc.keyring.retire_expired(now)
    if not gone:
        return []

    def txn(conn: Connection) -> None:
        for kid in gone:
            record(conn, actor, "signing_key.retire", kid, {"reason": "its tokens have expired"}, now)
        publish(conn, KEYS_MESSAGE_TYPE)

    svc.db.transaction(txn)
    log.info("retired signing keys %s", ", ".join(gone))
    return gone


@dataclass(frozen=True)
class NewSecret:
    """A workload's new secret, shown once, and when its old one stops working."""

    workload: WorkloadRecord
    client_secret: str
    previous_expires_at: int


def rotate_workload_secret(
    conn: Connection, actor: Actor, workload_id: str, pepper: bytes, grace_s: int,
    reason: str | None, now: int,
) -> NewSecret:
    """Give a workload a new secret, shown once; the old one keeps working for ``grace_s``
    (0: it ends at once, for a secret known to have leaked).

    One UPDATE moves the current hash to the previous slot and stores the new one, so no
    reader ever sees a workload with neither secret. A second rotation inside the grace ends
    the first old secret at once (only one previous secret is kept).
    """
    view = get_workload(conn, actor, workload_id)
    require_may_manage(actor, view.roles)
    secret = new_client_secret()
    w = _workload.c
    conn.execute(
        update(_workload)
        .where(w.id == workload_id)
        .values(
            prev_secret_hash=w.secret_hash if grace_s > 0 else None,
            prev_secret_expires_at=now + grace_s if grace_s > 0 else None,
            secret_hash=hash_secret(pepper, secret),
        )
    )
    record(conn, actor.id, "workload.rotate_secret", workload_id,
           {"reason": reason, "grace_s": grace_s, "tenant_id": view.tenant_id}, now)
    return NewSecret(get_workload(conn, actor, workload_id), secret, now + grace_s)


def rotate_signing_key_from_cli(settings: Settings) -> SigningKey:
    """``broker keys rotate``: rotate in Vault, then audit and announce it through the database
    (running replicas also find it at their next periodic keyring read, if the database does
    not answer)."""
    from broker.storage.db import Database, make_engine

    vault = Vault(settings.vault)
    vault.check()
    ring = Keyring(vault, settings.tokens.max_ttl_s)
    ring.load()
    now = int(time.time())
    key = ring.rotate(now)
    states = _states(ring)

    def txn(conn: Connection) -> None:
        record(conn, "cli", "signing_key.rotate", key.kid, {"reason": "broker keys rotate",
                                                           "keys": states}, now)
        publish(conn, KEYS_MESSAGE_TYPE)

    db = Database(make_engine(settings.database.url, 1))
    try:
        db.transaction(txn)
    except Exception as exc:
        log.warning("the rotation is done but could not be audited: %s", type(exc).__name__)
    finally:
        db.dispose()
    return key


# --- provider keys --------------------------------------------------------------------------
#
# A provider's Vault document (KV v2, at ``providers.<name>.vault_path``) holds ``api_key``,
# the key in use. When the provider can mint and revoke keys through an admin API, the
# document also holds ``admin_key`` (the credential for that API), ``key_id`` (the provider's
# id of ``api_key``) and ``retiring`` (replaced keys and when to revoke them). A rotation
# creates a key, checks it works, writes it as a new version (check-and-set) and tells every
# replica to re-read; the old key keeps working for ``rotation.provider_grace_s``, so no
# request running on it fails, and is then revoked by a scheduled job. The pending revocations
# live in Vault with the key, so a restart forgets none.


PROVIDER_MESSAGE_TYPE = "provider_key"


def key_admin(providers: Mapping[str, Provider], provider: str) -> KeyAdmin | None:
    """The provider object itself, when its plugin implements :class:`KeyAdmin`."""
    candidate = providers.get(provider)
    return candidate if isinstance(candidate, KeyAdmin) else None


def _provider_path(svc: Services, provider: str) -> str:
    settings = svc.settings.providers.get(provider)
    if settings is None:
        raise NotFound("no such provider")
    if settings.vault_path is None:
        raise Conflict("this provider takes no key")
    return settings.vault_path


def reload_provider_key(svc: Services, provider: str) -> None:
    """Make this replica read the provider's key from Vault on its next call."""
    svc.provider_keys.invalidate(provider)


def _announce(svc: Services, actor: str, action: str, provider: str, detail: dict[str, Any],
              now: int) -> None:
    reload_provider_key(svc, provider)

    def txn(conn: Connection) -> None:
        record(conn, actor, action, provider, detail, now)
        publish(conn, PROVIDER_MESSAGE_TYPE, {"provider": provider})

    svc.db.transaction(txn)


@dataclass(frozen=True)
class ProviderKeyRotation:
    """What a provider-key rotation did (never the key): ``reloaded`` when the provider has no
    key admin API and every replica re-reads the key an operator wrote to Vault."""

    provider: str
    mode: Literal["reloaded", "rotated"]
    version: int
    key_id: str | None = None
    previous_key_id: str | None = None
    previous_key_revoke_at: int | None = None


def rotate_provider_key(
    svc: Services, provider: str, actor: str, reason: str | None = None, now: int | None = None
) -> ProviderKeyRotation:
    """Rotate a provider's key through its admin API; for a provider without one, make every
    replica re-read the key an operator wrote to Vault. Returns what happened (never a key)."""
    now = int(time.time()) if now is None else now
    path = _provider_path(svc, provider)
    found = svc.vault.read(path)
    if found is None:
        raise Conflict("no key is stored in Vault for this provider")
    doc, version = found
    admin = key_admin(svc.providers, provider)
    if admin is None:
        _announce(svc, actor, "provider_key.reload", provider,
                  {"reason": reason, "version": version}, now)
        return ProviderKeyRotation(provider, "reloaded", version)
    admin_key = doc.get("admin_key")
    if not isinstance(admin_key, str) or not admin_key:
        raise Conflict("no admin_key is stored in Vault for this provider")

    key_id, key = admin.create_key(admin_key)
    if not admin.check_key(key):
        admin.revoke_key(admin_key, key_id)
        raise UpstreamError("the provider refused the new key; the old one stays in use")
    grace = svc.settings.rotation.provider_grace_s
    retiring = [r for r in doc.get("retiring", []) if isinstance(r, dict)]
    old_id = doc.get("key_id")
    if isinstance(old_id, str) and old_id:
        retiring.append({"key_id": old_id, "revoke_at": now + grace})
    new_doc = {**doc, "api_key": key, "key_id": key_id, "retiring": retiring, "rotated_at": now}
    try:
        new_version = svc.vault.write(path, new_doc, cas=version)
    except CasConflict:
        admin.revoke_key(admin_key, key_id)  # ours lost the race: leave no stray key behind
        raise Conflict("the provider's key changed meanwhile; try again") from None
    _announce(svc, actor, "provider_key.rotate", provider,
              {"reason": reason, "key_id": key_id, "previous_key_id": old_id,
               "version": new_version, "grace_s": grace}, now)
    log.info("provider %s: key rotated to version %d", provider, new_version)
    return ProviderKeyRotation(
        provider, "rotated", new_version, key_id, old_id if isinstance(old_id, str) else None,
        now + grace if old_id else None,
    )


def revoke_retired_provider_keys(svc: Services, now: int | None = None) -> list[str]:
    """Revoke upstream every replaced provider key whose grace is over; returns their ids.
    Idempotent: a revocation whose record could not be written is simply made again."""
    now = int(time.time()) if now is None else now
    revoked: list[str] = []
    for provider, settings in svc.settings.providers.items():
        admin = key_admin(svc.providers, provider)
        if admin is None or settings.vault_path is None:
            continue
        found = svc.vault.read(settings.vault_path)
        if found is None:
            continue
        doc, version = found
        retiring = [r for r in doc.get("retiring", []) if isinstance(r, dict)]
        due = [r for r in retiring if int(r.get("revoke_at", 0)) <= now]
        if not due:
            continue
        done: list[str] = []
        for entry in due:
            try:
                admin.revoke_key(str(doc.get("admin_key", "")), str(entry["key_id"]))
                done.append(str(entry["key_id"]))
            except Exception as exc:  # retried at the next run
                log.warning("provider %s: revoking an old key failed: %s", provider,
                            type(exc).__name__)
        left = [r for r in retiring if str(r.get("key_id")) not in done]
        # On a conflict a rotation wrote meanwhile: the next run re-reads and revokes again.
        with contextlib.suppress(CasConflict):
            svc.vault.write(settings.vault_path, {**doc, "retiring": left}, cas=version)
        for key_id in done:
            _announce(svc, "scheduler", "provider_key.revoke", provider,
                      {"key_id": key_id, "reason": "its grace is over"}, now)
        revoked += done
    return revoked


def rotate_all_provider_keys(svc: Services) -> None:
    """The scheduled rotation: every provider whose plugin can mint keys."""
    for provider, settings in svc.settings.providers.items():
        if settings.vault_path is not None and key_admin(svc.providers, provider) is not None:
            try:
                rotate_provider_key(svc, provider, "scheduler", "scheduled")
            except Exception as exc:  # one provider's failure must not stop the others
                log.warning("provider %s: scheduled rotation failed: %s", provider,
                            type(exc).__name__)
