"""Signed checkpoints of the audit chain: ``{seq, hash, ts}`` signed with the audit key.

A database administrator can rewrite every entry and recompute every hash after it; what they
cannot do is sign. The audit key is an Ed25519 key of its own (never the token signing key),
held in Vault's KV and read into memory, and its public part is published
(``GET /v1/admin/audit/keys``). Each checkpoint is also written, when configured, where the
database administrator cannot reach: appended to a file and/or POSTed to a webhook.

Before signing, the entries added since the last checkpoint are verified against it: a chain
edited in between is reported and never blessed by a signature.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Connection

from broker.metrics import Metrics
from broker.settings.audit import AuditSettings
from broker.storage import audit
from broker.storage.db import Database, Sql
from broker.storage.vault import CasConflict, Vault

log = logging.getLogger(__name__)

_LAST = Sql("SELECT seq, hash, ts, kid, sig FROM audit_checkpoint ORDER BY seq DESC LIMIT 1")
_INSERT = Sql("INSERT INTO audit_checkpoint (seq, hash, ts, kid, sig, file_written, webhook_sent) "
              "VALUES (:seq, :hash, :ts, :kid, :sig, FALSE, FALSE)")
_PAGE = Sql("SELECT seq, hash, ts, kid, sig FROM audit_checkpoint WHERE seq > :after "
            "ORDER BY seq LIMIT :limit")
_WEBHOOK_TIMEOUT_S = 5.0


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def signed_payload(checkpoint: dict[str, Any]) -> bytes:
    """The bytes a checkpoint's ``sig`` covers: RFC 8785 JSON of ``{seq, hash, ts}``."""
    return rfc8785.dumps({"seq": checkpoint["seq"], "hash": checkpoint["hash"],
                          "ts": checkpoint["ts"]})


def signature_ok(checkpoint: dict[str, Any], keys: dict[str, Ed25519PublicKey]) -> bool:
    key = keys.get(str(checkpoint.get("kid")))
    if key is None:
        return False
    try:
        key.verify(_unb64url(str(checkpoint["sig"])), signed_payload(checkpoint))
    except (InvalidSignature, ValueError, KeyError, TypeError):
        return False
    return True


def public_jwk(kid: str, key: Ed25519PublicKey) -> dict[str, str]:
    raw = key.public_bytes(encoding=serialization.Encoding.Raw,
                           format=serialization.PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw), "kid": kid, "alg": "EdDSA",
            "use": "sig"}


def keys_from_jwks(jwks: dict[str, Any]) -> dict[str, Ed25519PublicKey]:
    """The Ed25519 keys of a JWKS by ``kid``; entries of another type are skipped."""
    out: dict[str, Ed25519PublicKey] = {}
    for jwk in jwks.get("keys", ()):
        if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            continue
        try:
            out[str(jwk["kid"])] = Ed25519PublicKey.from_public_bytes(_unb64url(str(jwk["x"])))
        except (KeyError, ValueError):
            continue
    return out


@dataclass(frozen=True)
class _Key:
    kid: str
    private: Ed25519PrivateKey


class AuditKeys:
    """The audit key document in Vault: ``{"current": kid, "keys": {kid: {"private": b64url,
    "created_at": ts}}}``. Created on first use with a check-and-set write, so two replicas
    starting at once agree on one key."""

    def __init__(self, vault: Vault, settings: AuditSettings):
        self._vault = vault
        self._path = vault.path(settings.key_path)
        self._current: _Key | None = None
        self._public: dict[str, Ed25519PublicKey] = {}

    def _load(self, *, create: bool) -> None:
        for _ in range(3):
            found = self._vault.read(self._path)
            if found is None:
                if not create:
                    return
                kid = "audit-" + secrets.token_hex(8)
                raw = Ed25519PrivateKey.generate().private_bytes(
                    encoding=serialization.Encoding.Raw,
                    format=serialization.PrivateFormat.Raw,
                    encryption_algorithm=serialization.NoEncryption())
                doc: dict[str, Any] = {"current": kid, "keys": {kid: {"private": _b64url(raw),
                                                      "created_at": int(time.time())}}}
                try:
                    self._vault.write(self._path, doc, cas=0)
                except CasConflict:
                    continue  # another replica created it first: read theirs
                found = (doc, 1)
            data = found[0]
            keys = {kid: Ed25519PrivateKey.from_private_bytes(_unb64url(k["private"]))
                    for kid, k in data["keys"].items()}
            self._current = _Key(data["current"], keys[data["current"]])
            self._public = {kid: k.public_key() for kid, k in keys.items()}
            return
        raise CasConflict(self._path)  # pragma: no cover - three lost races in a row

    def signer(self) -> _Key:
        if self._current is None:
            self._load(create=True)
        assert self._current is not None
        return self._current

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        """Every audit key's public part by ``kid`` (none before the first checkpoint)."""
        if not self._public:
            self._load(create=False)
        return dict(self._public)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [public_jwk(kid, key) for kid, key in sorted(self.public_keys().items())]}

    def sign(self, seq: int, digest: str, ts: int) -> dict[str, Any]:
        key = self.signer()
        checkpoint: dict[str, Any] = {"seq": seq, "hash": digest, "ts": audit.rfc3339(ts)}
        checkpoint["kid"] = key.kid
        checkpoint["sig"] = _b64url(key.private.sign(signed_payload(checkpoint)))
        return checkpoint


def checkpoint_view(row: Any) -> dict[str, Any]:
    return {"seq": int(row.seq), "hash": row.hash, "ts": audit.rfc3339(int(row.ts)),
            "kid": row.kid, "sig": row.sig}


PAGE = 1000


def stored(conn: Connection, after: int = 0, limit: int = PAGE) -> list[dict[str, Any]]:
    """Checkpoints with ``seq > after`` in order, at most ``limit``."""
    rows = _PAGE.run(conn, after=after, limit=limit).all()
    return [checkpoint_view(r) for r in rows]


class ChainBroken(Exception):
    """The entries since the last checkpoint do not verify: nothing is signed."""


def _since_last(conn: Connection) -> tuple[int, str, int, str]:
    """(last checkpoint seq, its hash, head seq, head hash), checking the entries in between."""
    last = _LAST.run(conn).first()
    cp_seq, cp_hash = (0, audit.GENESIS) if last is None else (int(last[0]), str(last[1]))
    head_seq, head_hash = audit.head(conn)
    if head_seq == cp_seq:
        return cp_seq, cp_hash, head_seq, head_hash
    expected_seq, prev = cp_seq + 1, cp_hash
    after = cp_seq
    while True:
        batch = audit.entries(conn, after)
        for entry in batch:
            if (entry["seq"] != expected_seq or entry["prev_hash"] != prev
                    or audit.entry_hash(entry) != entry["hash"]):
                raise ChainBroken(f"the audit chain does not verify at entry {expected_seq}")
            prev, expected_seq = entry["hash"], expected_seq + 1
        if len(batch) < audit.PAGE:
            break
        after = batch[-1]["seq"]
    if expected_seq - 1 != head_seq or prev != head_hash:
        raise ChainBroken(f"the audit chain's head does not match its entries at {expected_seq}")
    return cp_seq, cp_hash, head_seq, head_hash


def checkpoint_once(db: Database, keys: AuditKeys, settings: AuditSettings,
                    now: int | None = None, metrics: Metrics | None = None,
                    ) -> dict[str, Any] | None:
    """Sign the head of the chain when it moved since the last checkpoint; the checkpoint, or
    None when there was nothing new. Also written to the configured file and webhook."""
    try:
        cp_seq, _, head_seq, head_hash = db.read_transaction(_since_last)
    except ChainBroken as exc:
        log.error("audit checkpoint refused: %s; run `broker audit verify`", exc)
        if metrics is not None:
            metrics.audit_checkpoints.labels("refused").inc()
        raise
    if head_seq == cp_seq:
        export_pending(db, settings, metrics)  # what an earlier run could not copy out
        return None
    ts = int(time.time()) if now is None else now
    checkpoint = keys.sign(head_seq, head_hash, ts)
    db.transaction(lambda conn: _INSERT.run(
        conn, seq=checkpoint["seq"], hash=checkpoint["hash"], ts=ts,
        kid=checkpoint["kid"], sig=checkpoint["sig"]))
    if metrics is not None:
        metrics.audit_checkpoints.labels("signed").inc()
    export_pending(db, settings, metrics)
    return checkpoint


_UNEXPORTED = {
    "file": Sql("SELECT seq, hash, ts, kid, sig FROM audit_checkpoint WHERE NOT file_written "
                "ORDER BY seq LIMIT :limit"),
    "webhook": Sql("SELECT seq, hash, ts, kid, sig FROM audit_checkpoint WHERE NOT webhook_sent "
                   "ORDER BY seq LIMIT :limit"),
}
_EXPORTED = {
    "file": Sql("UPDATE audit_checkpoint SET file_written = TRUE WHERE seq = :seq"),
    "webhook": Sql("UPDATE audit_checkpoint SET webhook_sent = TRUE WHERE seq = :seq"),
}
_EXPORT_BATCH = 100


def _append_line(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)  # the copy exists to outlive the database: it must be on disk
    finally:
        os.close(fd)


def _post(url: str, line: str) -> None:
    resp = httpx.post(url, content=line, headers={"content-type": "application/json"},
                      timeout=_WEBHOOK_TIMEOUT_S)
    if not 200 <= resp.status_code < 300:  # a redirect is a failure too: never followed
        raise OSError(f"the webhook answered {resp.status_code}")


def _unexported(sink: str, conn: Connection) -> list[Any]:
    return list(_UNEXPORTED[sink].run(conn, limit=_EXPORT_BATCH).all())


def _exported(sink: str, seq: int, conn: Connection) -> None:
    _EXPORTED[sink].run(conn, seq=seq)


def export_pending(db: Database, settings: AuditSettings, metrics: Metrics | None = None) -> int:
    """Copy the checkpoints not yet copied to the configured file and webhook, oldest first;
    how many copies were made. A failure stops that sink until the next run, logged, never
    fatal: the checkpoint is in the database meanwhile and is copied later, in order."""
    sinks: list[tuple[str, Callable[[str], None]]] = []
    if settings.checkpoint_file:
        sinks.append(("file", functools.partial(_append_line, settings.checkpoint_file)))
    if settings.checkpoint_webhook:
        sinks.append(("webhook", functools.partial(_post, settings.checkpoint_webhook)))
    done = 0
    for sink, send in sinks:
        rows = db.read_transaction(functools.partial(_unexported, sink))
        for row in rows:
            checkpoint = checkpoint_view(row)
            try:
                send(json.dumps(checkpoint, separators=(",", ":"), sort_keys=True))
            except (OSError, httpx.HTTPError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                if isinstance(exc, httpx.HTTPError):
                    reason = type(exc).__name__
                log.error("audit checkpoint %s not copied to the %s: %s", checkpoint["seq"],
                          sink, reason)
                if metrics is not None:
                    metrics.audit_copy_failures.labels(sink).inc()
                break
            db.transaction(functools.partial(_exported, sink, checkpoint["seq"]))
            done += 1
    return done


def read_file(path: str) -> list[dict[str, Any]]:
    """The checkpoints of an ``audit.checkpoint_file`` (one JSON object per line)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number}: not a JSON checkpoint") from None
            if not isinstance(item, dict):
                raise ValueError(f"{path}:{number}: not a JSON checkpoint")
            out.append(item)
    return out
