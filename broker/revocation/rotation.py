"""Rotation: signing keys and workload secrets (provider keys: :mod:`broker.credentials`).

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

import logging
import time
from dataclasses import dataclass

from sqlalchemy import Connection, update

from broker.identity.credentials import hash_secret, new_client_secret
from broker.identity.identities import Actor, WorkloadRecord, get_workload, require_may_manage
from broker.services import Services
from broker.settings import Settings
from broker.storage.audit import record
from broker.storage.bus import publish
from broker.storage.models import Workload
from broker.storage.vault import Vault
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
