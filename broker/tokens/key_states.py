"""The life of a key in a keyring kept as one Vault document: ``next`` (published, not
signing) -> ``current`` (signs) -> ``previous`` (published until its ``retire_at``) -> gone.
Shared by the access-token keyring (:mod:`broker.tokens.keys`) and the federation assertion
keys (:mod:`broker.credentials.assertions`); each keeps its own document, kids and bounds."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from broker.storage.vault import CasConflict, Vault

_ORDER = {"current": 0, "next": 1, "previous": 2}


class StatefulKey(Protocol):
    @property
    def state(self) -> str: ...

    @property
    def retire_at(self) -> int | None: ...

    @property
    def created_at(self) -> int: ...

    def to_doc(self) -> dict[str, Any]: ...


def publish_order(key: StatefulKey) -> tuple[int, int]:
    """How a JWKS lists keys: current, next, then previous, oldest first."""
    return _ORDER.get(key.state, 3), key.created_at


def promoted(keys: Iterable[StatefulKey], now: int, retire_at: int,
             make: Callable[[str], dict[str, Any]]) -> list[dict[str, Any]]:
    """The documents after one rotation: next becomes current, current becomes previous until
    ``retire_at``, previous keys past their own ``retire_at`` are dropped, and ``make(state)``
    supplies the new next key (and a current one, should no next have been there to promote)."""
    docs: list[dict[str, Any]] = []
    for key in keys:
        doc = key.to_doc()
        if key.state == "current":
            doc.update(state="previous", retire_at=retire_at)
        elif key.state == "next":
            doc["state"] = "current"
        elif key.state == "previous" and (key.retire_at or 0) <= now:
            continue
        docs.append(doc)
    if not any(d["state"] == "current" for d in docs):
        docs.append(make("current"))
    docs.append(make("next"))
    return docs


def retire_expired(vault: Vault, path: str, now: int,
                   apply: Callable[[dict[str, Any], int], None]) -> list[str]:
    """Drop the previous keys past their ``retire_at`` from the document at ``path``, with a
    check-and-set write so that it cannot undo a rotation another replica makes meanwhile;
    ``apply`` receives the document kept. Returns the kids dropped."""
    while True:
        found = vault.read(path)
        if found is None:
            return []
        doc, version = found
        keys = list(doc.get("keys", []))
        gone = [k["kid"] for k in keys
                if k.get("state") == "previous" and int(k.get("retire_at") or 0) <= now]
        if not gone:
            apply(doc, version)
            return []
        kept = {**doc, "keys": [k for k in keys if k["kid"] not in gone]}
        try:
            new_version = vault.write(path, kept, cas=version)
        except CasConflict:
            continue
        apply(kept, new_version)
        return gone
