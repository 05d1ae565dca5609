"""The in-memory denylist: the gateway's hot-path answer to "is this verified token still live?",
from dictionary lookups only.

Keyed on ``jti`` and on identity cut-off times, never on the token string (decision 2). A
suspension is one cut-off per identity: every token of that identity issued at or before it is
dead for good, so a resume lets new tokens live but never revives an old one. Entries leave
memory once they can refuse nothing: a token's once it has expired, a cut-off's once every
token issued before it has. :mod:`broker.revocation.sync` keeps it in step with the log.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from broker.revocation.log import Entry, cutoff_relevant_until
from broker.tokens.tokens import VerifiedToken


class Denylist:
    """Answers :meth:`is_live` from memory. Implements :class:`broker.tokens.tokens.TokenGate`.

    Writers (requests, the event bus thread) hold a lock; readers take none: each check is a
    few dictionary and set lookups, which are atomic in CPython.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Told of every entry applied (outside the lock): caches keyed on an identity (the
        # gateway's policies) drop what a change of that identity made stale.
        self.listeners: list[Callable[[Entry], None]] = []
        self._tokens: dict[str, int] = {}  # jti -> relevant until
        self._grants: dict[str, int] = {}  # revoked grant id -> relevant until
        self._cutoffs: dict[tuple[str, str], tuple[int, int]] = {}  # key -> (cutoff, until)
        self._suspended: set[tuple[str, str]] = set()
        self._last_change: dict[tuple[str, str], int] = {}  # key -> id of the newest entry applied
        self.last_id = 0
        # The ids of the entries applied that were created inside the catch-up's window, so
        # that it can tell what it lacks without reading the window's entries again. Bounded
        # by time: ids leave once their creation falls behind the window.
        self._recent: set[int] = set()
        self._recent_by_second: dict[int, list[int]] = {}  # created_at -> ids
        self._recent_sum = 0
        self._horizon = 0

    def is_live(self, token: VerifiedToken) -> bool:
        if token.jti in self._tokens:
            return False
        if token.grants and not self._grants_live(token):
            return False
        # A delegated token dies with every token above it, and with their workloads.
        if token.ancestors and any(jti in self._tokens for jti in token.ancestors):
            return False
        if not self._cutoffs and not self._suspended:
            return True
        for sub in (token.sub, *token.ancestor_subs):
            if not self._identity_live(("workload", sub), token.iat):
                return False
        return self._identity_live(("tenant", token.tenant), token.iat)

    def _identity_live(self, key: tuple[str, str], iat: int) -> bool:
        if key in self._suspended:
            return False
        cut = self._cutoffs.get(key)
        return cut is None or iat > cut[0]

    def _grants_live(self, token: VerifiedToken) -> bool:
        # A grant ends at its expiry exactly, without the clock leeway of token expiry: the
        # admin chose that moment, and a stream under it must end then.
        if token.grant_exp is not None and time.time() >= token.grant_exp:
            return False
        return not any(grant in self._grants for grant in token.grants)

    def __len__(self) -> int:
        return len(self._tokens) + len(self._grants) + len(self._cutoffs) + len(self._suspended)

    def apply(self, entry: Entry) -> None:
        """Idempotent: applying an entry twice, or an older entry after a newer one for the
        same identity, leaves the state as it was."""
        self.apply_all([entry])

    def apply_all(self, entries: list[Entry]) -> None:
        """:meth:`apply` each entry, under one hold of the lock (a mass revocation brings
        100,000 at once)."""
        now = int(time.time())
        with self._lock:
            for entry in entries:
                self._apply(entry, now)
        for entry in entries:
            for listener in self.listeners:
                listener(entry)

    def _apply(self, entry: Entry, now: int) -> None:
        self.last_id = max(self.last_id, entry.id)
        if entry.created_at >= self._horizon and entry.id not in self._recent:
            self._recent.add(entry.id)
            self._recent_by_second.setdefault(entry.created_at, []).append(entry.id)
            self._recent_sum += entry.id
        if entry.kind in ("token", "grant"):
            if entry.relevant_until > now:
                held = self._tokens if entry.kind == "token" else self._grants
                held[entry.target] = max(held.get(entry.target, 0), entry.relevant_until)
            return
        key = (entry.kind, entry.target)
        if entry.cutoff is not None:
            self._raise_cutoff(key, entry.cutoff)
        if entry.action == "cut":
            return  # a cut-off alone: it neither suspends nor resumes
        if entry.id <= self._last_change.get(key, 0):
            return
        self._last_change[key] = entry.id
        if entry.action == "suspend":
            self._suspended.add(key)
        elif entry.action == "resume":
            self._suspended.discard(key)

    def _raise_cutoff(self, key: tuple[str, str], cutoff: int) -> None:
        old = self._cutoffs.get(key)
        if old is None or cutoff > old[0]:
            self._cutoffs[key] = (cutoff, cutoff_relevant_until(cutoff))

    def has_applied(self, entry_id: int) -> bool:
        """Whether an entry created inside the catch-up's window has been applied here."""
        return entry_id in self._recent

    def applied_since(self, horizon: int) -> tuple[int, int, int]:
        """Forget the applied ids of entries created before ``horizon`` (or before a later
        horizon given earlier: what is forgotten stays so) and return (how many remain, their
        sum, :attr:`last_id`), all read at once."""
        with self._lock:
            self._horizon = max(self._horizon, horizon)
            for second in [s for s in self._recent_by_second if s < self._horizon]:
                for entry_id in self._recent_by_second.pop(second):
                    self._recent.discard(entry_id)
                    self._recent_sum -= entry_id
            return len(self._recent), self._recent_sum, self.last_id

    def reset_suspended(self, suspended: dict[tuple[str, str], int]) -> None:
        """Take the suspension state of the identity tables as the truth (at load)."""
        with self._lock:
            self._suspended = set(suspended)
            for key, cutoff in suspended.items():
                self._raise_cutoff(key, cutoff)

    def prune(self, now: int) -> int:
        """Forget entries that can no longer refuse a live token; returns how many went."""
        with self._lock:
            gone = [jti for jti, until in self._tokens.items() if until <= now]
            for jti in gone:
                del self._tokens[jti]
            ended = [g for g, until in self._grants.items() if until <= now]
            for grant in ended:
                del self._grants[grant]
            gone += ended
            old = [k for k, (_c, until) in self._cutoffs.items()
                   if until <= now and k not in self._suspended]
            for key in old:
                del self._cutoffs[key]
                self._last_change.pop(key, None)
            return len(gone) + len(old)


def apply_here(gate: object, entry: Entry | None) -> None:
    """This replica need not wait for the bus: the change holds from the response on (and on
    SQLite there is no other replica to tell)."""
    if entry is not None and isinstance(gate, Denylist):
        gate.apply(entry)
