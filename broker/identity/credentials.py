"""Client secrets: generation, keyed hashing, constant-time checks, and failure throttling."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Protocol

from broker.errors import SlowDown

if TYPE_CHECKING:
    from sqlalchemy import Connection

SECRET_PREFIX = "bks_"
SECRET_BYTES = 32  # 256 bits of entropy

# Hashing a secret for an unknown client keeps its timing like a known client's.
_DUMMY_HASH = "0" * 64


def new_client_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def hash_secret(pepper: bytes, secret: str) -> str:
    """HMAC-SHA-256 keyed with the pepper from Vault: a stolen database alone cannot test guesses."""
    return hmac.new(pepper, secret.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def secret_matches(pepper: bytes, secret: str, stored_hashes: list[str | None]) -> bool:
    """True when ``secret`` matches any stored hash; every candidate is compared, in constant time."""
    digest = hash_secret(pepper, secret)
    ok = False
    for stored in stored_hashes or [None]:
        ok |= hmac.compare_digest(digest, stored or _DUMMY_HASH) and stored is not None
    return ok


class EventWindow(Protocol):
    """Events per key in a sliding window of ``window_s``: at ``limit`` events in the window the
    key is blocked until the oldest of the last ``limit`` leaves it. :class:`SlidingWindow`
    counts in one process; :mod:`broker.money.limits_redis` and :mod:`broker.money.limits_db`
    count in a store every replica shares (and raise
    :class:`broker.errors.LimitsUnavailable` when it does not answer). ``now`` is in the
    window's own clock (monotonic in memory, UNIX time when shared): callers leave it out."""

    limit: int
    window_s: int

    async def blocked_for(self, key: tuple[str, str], now: float | None = None) -> int:
        """Seconds until the key may act again; 0 when it may act now."""
        ...

    async def record(self, key: tuple[str, str], now: float | None = None) -> None:
        ...

    async def take(self, key: tuple[str, str], now: float | None = None) -> int:
        """Count one event unless the key is blocked: 0 when counted, else the seconds to wait
        (checked and counted at once, so concurrent callers cannot both slip in)."""
        ...

    def take_within(self, conn: Connection, key: tuple[str, str]) -> int:
        """:meth:`take`, from inside a database transaction running in a worker thread (the
        issuance's): a database store counts in that very transaction, so the count commits
        with the token it allowed; another store is called on the event loop."""
        ...


class SlidingWindow:
    """The :class:`EventWindow` of one process. Kept in memory and bounded: keys whose events
    all left the window are pruned, and under a flood of distinct keys the oldest go."""

    def __init__(self, limit: int, window_s: int, max_keys: int = 100_000):
        self.limit = limit
        self.window_s = window_s
        self.max_keys = max_keys
        self._events: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def _prune(self, q: deque[float], now: float) -> None:
        while q and q[0] <= now - self.window_s:
            q.popleft()

    def _wait(self, key: tuple[str, str], now: float) -> int:
        q = self._events.get(key)
        if not q:
            return 0
        self._prune(q, now)
        if len(q) < self.limit:
            return 0
        return max(1, int(q[-self.limit] + self.window_s - now) + 1)

    def _record(self, key: tuple[str, str], now: float) -> None:
        if len(self._events) >= self.max_keys:
            for old in [k for k, q in self._events.items() if not q or q[-1] <= now - self.window_s]:
                del self._events[old]
            if len(self._events) >= self.max_keys:
                # Under a flood of distinct keys, forget the oldest rather than grow forever.
                self._events.pop(next(iter(self._events)))
        q = self._events.setdefault(key, deque())
        self._prune(q, now)
        q.append(now)

    async def blocked_for(self, key: tuple[str, str], now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        with self._lock:
            return self._wait(key, now)

    async def record(self, key: tuple[str, str], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._record(key, now)

    async def take(self, key: tuple[str, str], now: float | None = None) -> int:
        return self._take(key, now)

    def take_within(self, conn: Connection, key: tuple[str, str]) -> int:
        return self._take(key)

    def _take(self, key: tuple[str, str], now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        with self._lock:
            wait = self._wait(key, now)
            if not wait:
                self._record(key, now)
            return wait


class FailureTracker:
    """Failed secret checks per (client, source address), counted in ``window``: after its
    ``limit`` failures in its ``window_s`` the pair is refused with ``slow_down`` even with a
    correct secret, until the oldest failure leaves the window."""

    def __init__(self, window: EventWindow):
        self.window = window

    @classmethod
    def in_memory(cls, limit: int, window_s: int) -> FailureTracker:
        return cls(SlidingWindow(limit, window_s))

    async def ensure_allowed(self, client_id: str, source: str) -> None:
        """Raise ``slow_down`` (with ``Retry-After``) while the pair is throttled."""
        wait = await self.window.blocked_for((client_id, source))
        if wait:
            raise SlowDown(headers={"retry-after": str(wait)})

    async def record_failure(self, client_id: str, source: str, now: float | None = None) -> None:
        await self.window.record((client_id, source), now)
