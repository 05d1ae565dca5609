"""Client secrets: generation, keyed hashing, constant-time checks, and failure throttling."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque

from broker.errors import SlowDown

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


class FailureTracker:
    """Counts failed secret checks per (client, source address) in a sliding window.

    After ``limit`` failures in ``window_s`` the pair is refused with ``slow_down`` even with a
    correct secret, until the oldest failure leaves the window. Kept in memory: bounded by the
    number of distinct pairs that failed in the last window (old pairs are pruned).
    """

    def __init__(self, limit: int, window_s: int, max_pairs: int = 100_000):
        self.limit = limit
        self.window_s = window_s
        self.max_pairs = max_pairs
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def _prune(self, q: deque[float], now: float) -> None:
        while q and q[0] <= now - self.window_s:
            q.popleft()

    def blocked_for(self, client_id: str, source: str, now: float | None = None) -> int:
        """Seconds until the pair may try again; 0 when it may try now."""
        now = time.monotonic() if now is None else now
        with self._lock:
            q = self._failures.get((client_id, source))
            if not q:
                return 0
            self._prune(q, now)
            if len(q) < self.limit:
                return 0
            return max(1, int(q[-self.limit] + self.window_s - now) + 1)

    def ensure_allowed(self, client_id: str, source: str) -> None:
        """Raise ``slow_down`` (with ``Retry-After``) while the pair is throttled."""
        wait = self.blocked_for(client_id, source)
        if wait:
            raise SlowDown(headers={"retry-after": str(wait)})

    def record_failure(self, client_id: str, source: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            if len(self._failures) >= self.max_pairs:
                for key in [k for k, q in self._failures.items() if not q or q[-1] <= now - self.window_s]:
                    del self._failures[key]
                if len(self._failures) >= self.max_pairs:
                    # Under a flood of distinct pairs, forget the oldest rather than grow forever.
                    self._failures.pop(next(iter(self._failures)))
            q = self._failures.setdefault((client_id, source), deque())
            self._prune(q, now)
            q.append(now)
