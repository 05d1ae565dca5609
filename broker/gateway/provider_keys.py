"""Provider API keys, read from Vault (KV v2, field ``api_key``) and cached briefly in memory.

A key is fresh for :data:`FRESH_S` seconds, so a new version written to Vault is in use within
that long, without a restart. Decision 4 of the spec: when Vault does not answer, the cached key
keeps serving for at most ``vault.max_stale_s`` after it was last read, then calls answer 503.
A Vault error is "unavailable", never "absent": it never drops or replaces a cached key.

Keys never leave this module except towards a provider: they are not logged, and errors name
the provider, never the key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import anyio.to_thread

from broker.errors import Unavailable, VaultUnavailable

log = logging.getLogger("broker.provider_keys")

FRESH_S = 5.0
# Past this share of ``fresh_s``, a call still gets the cached key and starts a background read.
REFRESH_AHEAD = 0.8
KEY_FIELD = "api_key"


class SecretReader(Protocol):
    """What :class:`broker.storage.vault.Vault` offers: ``(data, version)`` at a path, or None."""

    def read(self, path: str) -> tuple[dict[str, Any], int] | None: ...


class TokenSource(Protocol):
    """What :class:`broker.credentials.federated.ProviderTokens` offers: a short-lived token
    for each federated provider, exchanged instead of read from Vault."""

    @property
    def providers(self) -> frozenset[str]: ...

    async def get(self, provider: str) -> str: ...


@dataclass
class _Cached:
    key: str = field(repr=False)
    version: int
    read_at: float  # the last successful read: the start of the staleness allowance
    fresh_until: float


class ProviderKeys:
    """The key of each provider, by provider name.

    ``paths`` maps each provider to its Vault path, or to None for a provider that takes no key
    (then :meth:`get` answers ``""`` and the plugin decides what to send). A federated provider
    (``tokens.providers``) has no path either: its token comes from ``tokens``.
    """

    def __init__(
        self,
        vault: SecretReader,
        paths: Mapping[str, str | None],
        *,
        max_stale_s: float,
        fresh_s: float = FRESH_S,
        clock: Callable[[], float] = time.monotonic,
        tokens: TokenSource | None = None,
    ) -> None:
        self.vault = vault
        self.tokens = tokens
        self.fresh_s = fresh_s
        self.max_stale_s = max_stale_s
        self._paths = dict(paths)
        self._clock = clock
        self._cache: dict[str, _Cached] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._ahead: dict[str, asyncio.Task[None]] = {}  # background reads running (kept alive)

    async def get(self, provider: str) -> str:
        """The provider's current key; :class:`Unavailable` (503) when none can be served."""
        path = self._paths[provider]
        if path is None:
            if self.tokens is not None and provider in self.tokens.providers:
                return await self.tokens.get(provider)
            return ""
        now = self._clock()
        cached = self._cache.get(provider)
        if cached is not None and now < cached.fresh_until:
            if now - cached.read_at >= self.fresh_s * REFRESH_AHEAD and provider not in self._ahead:
                self._refresh_ahead(provider, path)
            return cached.key
        lock = self._locks.setdefault(provider, anyio.Lock())
        if lock.locked() and cached is not None and now - cached.read_at <= self.max_stale_s:
            return cached.key  # a refresh is on its way: do not queue behind a slow Vault
        async with lock:
            cached = self._cache.get(provider)
            if cached is not None and self._clock() < cached.fresh_until:
                return cached.key
            return await self._refresh(provider, path, cached)

    def _refresh_ahead(self, provider: str, path: str) -> None:
        """Read Vault in the background while the cached key is still fresh, so that under
        steady traffic no call waits for Vault. Without traffic, or if this read has not
        finished, the call that finds the key stale reads Vault itself, as before."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        lock = self._locks.setdefault(provider, anyio.Lock())
        if lock.locked():
            return

        async def refresh() -> None:
            try:
                async with lock:
                    cached = self._cache.get(provider)
                    if cached is not None and self._clock() - cached.read_at < self.fresh_s * REFRESH_AHEAD:
                        return  # someone else just read it
                    await self._refresh(provider, path, cached)
            except Exception as exc:  # the next call past freshness reads (and reports) again
                log.warning("provider %s: background key read failed: %s", provider,
                            type(exc).__name__)
            finally:
                self._ahead.pop(provider, None)

        self._ahead[provider] = loop.create_task(refresh())

    async def _refresh(self, provider: str, path: str, cached: _Cached | None) -> str:
        try:
            found = await anyio.to_thread.run_sync(self.vault.read, path)
        except VaultUnavailable:
            if cached is not None and self._clock() - cached.read_at <= self.max_stale_s:
                log.warning("Vault unavailable: provider %s keeps its cached key", provider)
                return cached.key
            raise VaultUnavailable(f"the key of provider {provider!r} cannot be read") from None
        key = found[0].get(KEY_FIELD) if found is not None else None
        if not isinstance(key, str) or not key:
            # Deleted or never written: an operator's decision, unlike an outage.
            self._cache.pop(provider, None)
            raise Unavailable(f"no key is configured for provider {provider!r}")
        assert found is not None
        now = self._clock()
        self._cache[provider] = _Cached(key, found[1], now, now + self.fresh_s)
        if cached is not None and cached.version != found[1]:
            log.info("provider %s: key version %d now in use", provider, found[1])
        return key

    def invalidate(self, provider: str) -> None:
        """Read Vault again on the next call (after a rotation wrote a new version). The cached
        key stays as the fallback should Vault not answer."""
        cached = self._cache.get(provider)
        if cached is not None:
            cached.fresh_until = float("-inf")

    def version(self, provider: str) -> int | None:
        """The Vault version of the cached key, if any."""
        cached = self._cache.get(provider)
        return None if cached is None else cached.version
