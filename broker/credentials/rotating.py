"""``credential = "rotating"``: the broker creates, checks, swaps in and deletes real provider
keys through the provider's admin API (:class:`broker.plugin.KeyAdmin`).

One rotation:

1. a ``provider_key`` row is written with the name the new key will have (``creating``), so
   a key whose creation answer is lost, or whose process dies, is found again and deleted;
2. the key is created (``created``, with the provider's ids; its value only in memory);
3. it is checked with a cheap authenticated call;
4. it is written to Vault as a new KV v2 version, check-and-set over the version read at the
   start, so two rotations at once cannot both win;
5. every replica is told to re-read (``serving``); the key it replaced becomes ``retiring``
   and is deleted at the provider after ``rotation.provider_grace_s``, so no request still
   running on it fails.

A failed step leaves the old key serving, deletes the new key again (``discarded``) and raises
an alert. When even that deletion fails, the row stays ``created`` and :func:`tidy` (run by
the scheduler) deletes it later; it also finishes rotations a crash interrupted, deciding by
what Vault holds: a key Vault serves is promoted, any other is deleted. The admin key is read
from Vault (``providers.<name>.admin_vault_path``, field ``api_key``) for each run and never
leaves this process.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, insert, select, update

from broker.credentials import health
from broker.credentials.contract import KeyAdmin, KeyRef, MintedKey
from broker.errors import BrokerError, Conflict, NotFound, Unavailable, UpstreamError, VaultUnavailable
from broker.gateway.provider_keys import KEY_FIELD
from broker.plugin import KeyWatch
from broker.services import Services
from broker.settings import ProviderSettings
from broker.storage.audit import record
from broker.storage.bus import publish
from broker.storage.credential_models import ProviderKey
from broker.storage.vault import CasConflict

log = logging.getLogger("broker.credentials")

_key = ProviderKey.__table__  # type: ignore[attr-defined]

PROVIDER_MESSAGE_TYPE = "provider_key"
# A new key may take a moment to work everywhere at the provider: checked this often, waiting
# these many seconds before each retry.
CHECK_DELAYS_S: tuple[float, ...] = (1.0, 2.0)
# A rotation that has not finished after this long was interrupted (its process died): the
# tidy job decides its key's fate. Far longer than one rotation's calls can take.
STALE_S = 600
# Failed deletions of one key before an alert says a person may have to step in.
ALERT_AFTER_ATTEMPTS = 3


@dataclass(frozen=True)
class Rotation:
    """What a rotation did (never a key). ``reloaded``: the provider cannot make keys through
    its API and every replica re-read the key an operator wrote to Vault."""

    provider: str
    mode: Literal["reloaded", "rotated"]
    version: int
    key_id: str | None = None
    previous_key_id: str | None = None
    previous_key_revoke_at: int | None = None


class RotationFailed(UpstreamError):
    """A step of the rotation failed; the old key serves on."""


def key_admin(svc: Services, provider: str) -> KeyAdmin | None:
    """The provider object, when its credential rotates and its plugin implements KeyAdmin."""
    settings = svc.settings.providers.get(provider)
    candidate = svc.providers.get(provider)
    if settings is None or settings.credential != "rotating" or not isinstance(candidate, KeyAdmin):
        return None
    return candidate


def _settings(svc: Services, provider: str) -> ProviderSettings:
    settings = svc.settings.providers.get(provider)
    if settings is None:
        raise NotFound("no such provider")
    return settings


def admin_key(svc: Services, settings: ProviderSettings) -> str:
    """The admin key, read from Vault for this use only."""
    assert settings.admin_vault_path is not None
    found = svc.vault.read(settings.admin_vault_path)
    value = None if found is None else found[0].get(KEY_FIELD)
    if not isinstance(value, str) or not value:
        raise Conflict("no admin key is stored in Vault for this provider "
                       "(providers.<name>.admin_vault_path, field api_key)")
    return value


def reload_provider_key(svc: Services, provider: str) -> None:
    """Make this replica read the provider's key from Vault on its next call."""
    svc.provider_keys.invalidate(provider)


def _announce(svc: Services, conn: Connection, provider: str) -> None:
    reload_provider_key(svc, provider)
    publish(conn, PROVIDER_MESSAGE_TYPE, {"provider": provider})


# Rotations of one provider in this process run one at a time (replicas race through CAS).
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(provider: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(provider, threading.Lock())


def rotate(svc: Services, provider: str, actor: str, reason: str | None = None,
           now: int | None = None) -> Rotation:
    """Rotate the provider's key now; without a key admin API, make every replica re-read the
    key an operator wrote to Vault. Raises (after an alert) when a step fails."""
    now = int(time.time()) if now is None else now
    settings = _settings(svc, provider)
    if settings.credential == "federated":
        raise Conflict("a federated provider stores no key: its token is exchanged and "
                       "refreshed on its own")
    if settings.vault_path is None:
        raise Conflict("this provider takes no key")
    admin = key_admin(svc, provider)
    if admin is None:
        return _reload(svc, provider, settings.vault_path, actor, reason, now)
    with _lock(provider):
        return _Cycle(svc, provider, settings, admin, actor, reason, now).run()


def _reload(svc: Services, provider: str, path: str, actor: str, reason: str | None,
            now: int) -> Rotation:
    found = svc.vault.read(path)
    if found is None:
        raise Conflict("no key is stored in Vault for this provider")
    version = found[1]

    def txn(conn: Connection) -> None:
        record(conn, actor, "provider_key.reload", provider, {"reason": reason, "version": version},
               now)
        _announce(svc, conn, provider)

    svc.db.transaction(txn)
    if isinstance(svc.providers.get(provider), KeyWatch):
        from broker.credentials import watch

        watch.watch_provider(svc, provider)  # the operator's new key: its status, at once
    return Rotation(provider, "reloaded", version)


class _Cycle:
    """One rotation of one provider; each method is one step."""

    def __init__(self, svc: Services, provider: str, settings: ProviderSettings, admin: KeyAdmin,
                 actor: str, reason: str | None, now: int) -> None:
        self.svc, self.provider, self.settings, self.admin = svc, provider, settings, admin
        self.actor, self.reason, self.now = actor, reason, now
        self.row_id = "pk_" + secrets.token_hex(8)
        self.name = f"broker-{provider}-{now}-{secrets.token_hex(3)}"[:128]
        assert settings.vault_path is not None
        self.path = settings.vault_path

    def run(self) -> Rotation:
        found = self.svc.vault.read(self.path)
        if found is None:
            raise Conflict("no key is stored in Vault for this provider")
        doc, version = found
        key = admin_key(self.svc, self.settings)
        self._journal(state="creating")
        minted = self._create(key)
        self._journal_update(state="created", key_id=minted.key_id, account_id=minted.account_id)
        self._check(key, minted)
        new_version = self._store(key, minted, doc, version)
        return self._serve(minted, doc, new_version)

    # --- the steps -----------------------------------------------------------------------

    def _create(self, admin_key: str) -> MintedKey:
        try:
            return self.admin.create_key(admin_key, self.name)
        except Exception as exc:
            # The answer may be lost after the key was made: look for it by its name.
            self._discard(admin_key, KeyRef(self.name), step="create", error=health.describe(exc))
            raise self._failed("create", exc) from None

    def _check(self, admin_key: str, minted: MintedKey) -> None:
        ok, error = False, "the provider refused the new key"
        for delay in (0.0, *CHECK_DELAYS_S):
            if delay:
                time.sleep(delay)
            try:
                ok = self.admin.check_key(minted.key)
            except Exception as exc:  # a failed call is retried like a refusal
                ok, error = False, health.describe(exc)
            if ok:
                return
        self._discard(admin_key, _ref(self.name, minted), step="check", error=error)
        raise self._failed("check", UpstreamError(error))

    def _store(self, admin_key: str, minted: MintedKey, doc: dict[str, Any], version: int) -> int:
        # The replaced key's ids travel with the new version: whoever finishes this rotation
        # (this process, or the tidy job after a crash) knows what to delete.
        new_doc = {KEY_FIELD: minted.key, "key_id": minted.key_id, "account_id": minted.account_id,
                   "name": self.name, "rotated_at": self.now,
                   "previous": {"key_id": _str_or_none(doc.get("key_id")),
                                "account_id": _str_or_none(doc.get("account_id")),
                                "name": _str_or_none(doc.get("name"))}}
        try:
            return self.svc.vault.write(self.path, new_doc, cas=version)
        except CasConflict:
            self._discard(admin_key, _ref(self.name, minted), step="store",
                          error="the key in Vault changed meanwhile")
            raise self._failed("store", Conflict("the provider's key changed meanwhile; try "
                                                 "again")) from None
        except VaultUnavailable as exc:
            # The write may have landed before the error: only a read tells.
            try:
                found = self.svc.vault.read(self.path)
            except VaultUnavailable:
                # Unknown: the tidy job decides by what Vault holds once it answers.
                self._journal_update(error="Vault did not answer the write")
                raise self._failed("store", exc) from None
            if found is not None and found[0].get("key_id") == minted.key_id:
                return found[1]
            self._discard(admin_key, _ref(self.name, minted), step="store", error=health.describe(exc))
            raise self._failed("store", exc) from None

    def _serve(self, minted: MintedKey, doc: dict[str, Any], version: int) -> Rotation:
        grace = self.svc.settings.rotation.provider_grace_s
        retire_at = self.now + grace
        old_id = doc.get("key_id") if isinstance(doc.get("key_id"), str) else None

        def txn(conn: Connection) -> str | None:
            k = _key.c
            conn.execute(update(_key).where(k.id == self.row_id).values(
                state="serving", version=version, updated_at=self.now, error=None))
            _retire_replaced(conn, self.provider, self.row_id, doc, retire_at, self.now)
            record(conn, self.actor, "provider_key.rotate", self.provider,
                   {"reason": self.reason, "key_id": minted.key_id, "previous_key_id": old_id,
                    "version": version, "grace_s": grace}, self.now)
            health.save(conn, self.provider, self.now, rotated_at=self.now, rotation_result="ok",
                        rotation_error=None, rotation_actor=self.actor[:64])
            _announce(self.svc, conn, self.provider)
            return old_id

        self.svc.db.transaction(txn)
        self.svc.metrics.provider_rotations.labels(self.provider, "ok").inc()
        log.info("provider %s: key rotated to version %d", self.provider, version)
        return Rotation(self.provider, "rotated", version, minted.key_id, old_id, retire_at)

    # --- bookkeeping ---------------------------------------------------------------------

    def _journal(self, **values: Any) -> None:
        self.svc.db.transaction(lambda conn: conn.execute(insert(_key).values(
            id=self.row_id, provider=self.provider, name=self.name, actor=self.actor[:64],
            created_at=self.now, updated_at=self.now, attempts=0, **values)))

    def _journal_update(self, **values: Any) -> None:
        self.svc.db.transaction(lambda conn: conn.execute(
            update(_key).where(_key.c.id == self.row_id).values(updated_at=self.now, **values)))

    def _discard(self, admin_key: str, ref: KeyRef, *, step: str, error: str) -> None:
        """Delete the new key again; if that fails too, leave the row for :func:`tidy`."""
        try:
            gone = _delete(self.admin, admin_key, ref)
        except Exception as exc:
            log.warning("provider %s: the key of a failed rotation could not be deleted yet "
                        "(%s); it will be retried", self.provider, health.describe(exc))
            self._journal_update(error=health.clip(f"{step}: {error}"), attempts=1)
            return
        state = "discarded" if gone or ref.key_id else "failed"
        self._journal_update(state=state, error=health.clip(f"{step}: {error}"))

    def _failed(self, step: str, exc: BaseException) -> BrokerError:
        error = health.clip(f"{step}: {health.describe(exc)}")

        def txn(conn: Connection) -> None:
            record(conn, self.actor, "provider_key.rotate_failed", self.provider,
                   {"reason": self.reason, "step": step, "error": error}, self.now)
            health.save(conn, self.provider, self.now, rotated_at=self.now,
                        rotation_result="failed", rotation_error=error,
                        rotation_actor=self.actor[:64])
            health.raise_alert(conn, self.svc.settings.alerts, self.provider, severity="warning",
                               summary=f"provider {self.provider}: key rotation failed at "
                                       f"{step}; the old key serves on",
                               evidence={"step": step, "error": error}, now=self.now)

        try:
            self.svc.db.transaction(txn)
        except Exception as db_exc:  # the failure itself must still reach the caller
            log.error("provider %s: a failed rotation could not be recorded: %s",
                      self.provider, type(db_exc).__name__)
        self.svc.metrics.provider_rotations.labels(self.provider, "failed").inc()
        log.warning("provider %s: key rotation failed at %s: %s", self.provider, step, error)
        if isinstance(exc, Conflict | Unavailable):
            return exc
        return RotationFailed(f"the key rotation failed at {step} ({error}); the old key "
                              "stays in use")


def _retire_replaced(conn: Connection, provider: str, row_id: str, old_doc: dict[str, Any],
                     retire_at: int, now: int) -> None:
    """The key that served before ``row_id`` is deleted after the grace: its journal row, or
    (an operator's key, never journalled) a new row made from the ids stored with it."""
    k = _key.c
    replaced = conn.execute(
        update(_key).where(k.provider == provider, k.state == "serving", k.id != row_id)
        .values(state="retiring", retire_at=retire_at, updated_at=now).returning(k.id)).all()
    if replaced:
        return
    conn.execute(insert(_key).values(
        id="pk_" + secrets.token_hex(8), provider=provider, name=str(old_doc.get("name") or ""),
        state="retiring", key_id=_str_or_none(old_doc.get("key_id")),
        account_id=_str_or_none(old_doc.get("account_id")), version=None, actor="operator",
        created_at=now, updated_at=now, retire_at=retire_at, attempts=0))


def _ref(name: str, minted: MintedKey) -> KeyRef:
    return KeyRef(name, minted.key_id, minted.account_id)


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _delete(admin: KeyAdmin, admin_key: str, ref: KeyRef) -> bool:
    """Delete the key ``ref`` names (found by its name when no id is known); whether a key was
    known to delete."""
    if ref.key_id is None and ref.account_id is None:
        found = admin.find_keys(admin_key, ref.name) if ref.name else []
        for each in found:
            admin.delete_key(admin_key, each)
        return bool(found)
    admin.delete_key(admin_key, ref)
    return True


# --- the scheduled side -----------------------------------------------------------------


def rotate_all(svc: Services) -> None:
    """The scheduled rotation: every provider whose credential rotates through a key admin."""
    for provider in svc.settings.providers:
        if key_admin(svc, provider) is None:
            continue
        try:
            rotate(svc, provider, "scheduler", "scheduled")
        except Exception as exc:  # one provider's failure must not stop the others
            log.warning("provider %s: scheduled rotation failed: %s", provider, health.describe(exc))


def tidy(svc: Services, now: int | None = None) -> list[str]:
    """Delete every replaced key whose grace is over, and finish interrupted rotations; the
    ids of the keys deleted. Idempotent: a deletion that fails is tried again next time."""
    now = int(time.time()) if now is None else now
    deleted: list[str] = []
    for provider, settings in svc.settings.providers.items():
        admin = key_admin(svc, provider)
        if admin is None or settings.vault_path is None:
            continue
        with _lock(provider):
            deleted += _tidy_provider(svc, provider, settings, admin, now)
    return deleted


def _tidy_provider(svc: Services, provider: str, settings: ProviderSettings, admin: KeyAdmin,
                   now: int) -> list[str]:
    k = _key.c
    rows = svc.db.transaction(lambda conn: conn.execute(select(_key).where(
        k.provider == provider,
        ((k.state == "retiring") & (k.retire_at <= now))
        | (k.state.in_(("creating", "created")) & (k.updated_at <= now - STALE_S)),
    ).order_by(k.created_at)).all())
    if not rows:
        return []
    assert settings.vault_path is not None
    found = svc.vault.read(settings.vault_path)
    serving_id = None if found is None else _str_or_none(found[0].get("key_id"))
    key = admin_key(svc, settings)
    deleted: list[str] = []
    for row in rows:
        if row.key_id is not None and row.key_id == serving_id:
            if row.state != "retiring":
                _promote(svc, provider, row, found, now)
            continue  # never delete the key Vault serves
        if row.state == "retiring" and row.key_id is None and row.account_id is None \
                and not row.name:
            _abandon(svc, provider, row, now)
            continue
        try:
            _delete(admin, key, KeyRef(row.name, row.key_id, row.account_id))
        except Exception as exc:
            _deletion_failed(svc, provider, row, health.describe(exc), now)
            continue
        state = "deleted" if row.state == "retiring" else "discarded"
        _finish(svc, provider, row, state, now)
        if row.key_id is not None:
            deleted.append(row.key_id)
    return deleted


def _finish(svc: Services, provider: str, row: Any, state: str, now: int) -> None:
    def txn(conn: Connection) -> None:
        conn.execute(update(_key).where(_key.c.id == row.id).values(state=state, updated_at=now))
        action = "provider_key.revoke" if state == "deleted" else "provider_key.discard"
        record(conn, "scheduler", action, provider,
               {"key_id": row.key_id, "reason": "its grace is over" if state == "deleted"
                else "a rotation that did not finish"}, now)

    svc.db.transaction(txn)


def _promote(svc: Services, provider: str, row: Any, found: Any, now: int) -> None:
    """A rotation that stored its key but died before saying so: the key serves; finish it."""
    grace = svc.settings.rotation.provider_grace_s

    previous = found[0].get("previous")

    def txn(conn: Connection) -> None:
        k = _key.c
        _retire_replaced(conn, provider, row.id, previous if isinstance(previous, dict) else {},
                         now + grace, now)
        conn.execute(update(_key).where(k.id == row.id).values(
            state="serving", version=found[1], updated_at=now, error=None))
        record(conn, "scheduler", "provider_key.rotate", provider,
               {"key_id": row.key_id, "version": found[1], "reason": "an interrupted rotation "
                "finished"}, now)
        _announce(svc, conn, provider)

    svc.db.transaction(txn)


def _abandon(svc: Services, provider: str, row: Any, now: int) -> None:
    """An operator's key the broker has no id for: it cannot delete it; a person must."""
    def txn(conn: Connection) -> None:
        conn.execute(update(_key).where(_key.c.id == row.id).values(
            state="abandoned", updated_at=now,
            error="no key_id was stored with this key: delete it at the provider by hand"))
        health.raise_alert(conn, svc.settings.alerts, provider, severity="warning",
                           summary=f"provider {provider}: the key replaced by the first "
                                   "rotation has no stored key_id; delete it by hand",
                           evidence={"row": row.id}, now=now)

    svc.db.transaction(txn)


def _deletion_failed(svc: Services, provider: str, row: Any, error: str, now: int) -> None:
    attempts = int(row.attempts) + 1
    log.warning("provider %s: deleting key %s failed (%s); retried at the next run", provider,
                row.key_id or row.name, error)

    def txn(conn: Connection) -> None:
        conn.execute(update(_key).where(_key.c.id == row.id).values(
            attempts=attempts, error=health.clip(f"delete: {error}"), updated_at=(
                row.updated_at if row.state != "retiring" else now)))
        if attempts == ALERT_AFTER_ATTEMPTS:
            health.raise_alert(conn, svc.settings.alerts, provider, severity="warning",
                               summary=f"provider {provider}: a key to delete could not be "
                                       f"deleted after {attempts} attempts",
                               evidence={"key_id": row.key_id, "error": health.clip(error)},
                               now=now)

    svc.db.transaction(txn)


def pending(svc: Services, provider: str) -> list[dict[str, Any]]:
    """The keys of ``provider`` still to delete (retiring, or left by a failed rotation)."""
    k = _key.c
    rows = svc.db.read_transaction(lambda conn: conn.execute(select(_key).where(
        k.provider == provider, k.state.in_(("retiring", "creating", "created", "abandoned")),
    ).order_by(k.created_at)).all())
    return [{"key_id": r.key_id, "state": r.state, "retire_at": r.retire_at,
             "attempts": int(r.attempts)} for r in rows]

