"""What a provider plugin implements so that the broker can manage its credentials without a
static key (re-exported by :mod:`broker.plugin`, the one module plugins import).

Three optional capabilities, each checked structurally on the provider object:

- :class:`KeyAdmin`: the provider's admin API creates and deletes API keys (OpenAI service
  accounts, OpenRouter's management API). The broker then rotates keys itself
  (``credential = "rotating"``).
- :class:`KeyWatch`: the admin API can only report a key's status (Anthropic). The broker
  watches it and alerts before the key expires or when it is archived.
- :class:`SpendLimiter`: the admin API sets a project's hard spend limit (OpenAI), a ceiling
  at the provider in case the broker's own ledger is wrong.
- :class:`Federated`: the provider exchanges a short assertion signed by the broker for a
  minutes-long token (``credential = "federated"``). The plugin only builds the exchange
  request and reads the answer; the broker signs, sends, caches and refreshes.

Admin calls are blocking (the broker runs them off the event loop) and take the admin key as
an argument: a plugin never stores it. No method may log, or raise an error whose text
contains, an admin key, an API key or a token: errors name the step and the HTTP status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from broker.errors import UpstreamError


class ProviderAdminError(UpstreamError):
    """An admin-API or token-exchange call failed. The message names the step and the HTTP
    status (or the network error's type), never a key or a token."""

    title = "The provider's admin API failed"


@dataclass(frozen=True)
class MintedKey:
    """A key the provider just created: its value is shown once, here."""

    key_id: str  # the provider's id of the key (OpenAI ``key_…``, OpenRouter's hash)
    key: str = field(repr=False)
    account_id: str | None = None  # OpenAI: the service account that holds the key
    expires_at: int | None = None  # Unix seconds, when the provider set an expiry


@dataclass(frozen=True)
class KeyRef:
    """A key to delete: by its ids when known, else found by the name the broker gave it."""

    name: str
    key_id: str | None = None
    account_id: str | None = None


@runtime_checkable
class KeyAdmin(Protocol):
    """A provider whose admin API creates and deletes keys."""

    def create_key(self, admin_key: str, name: str) -> MintedKey:
        """Create a key called ``name`` (unique per rotation: the broker finds it again by
        this name if the answer is lost)."""
        ...

    def check_key(self, key: str) -> bool:
        """Whether the provider accepts ``key``, by a cheap authenticated call: False when it
        is refused (401/403); :class:`ProviderAdminError` when the call itself fails."""
        ...

    def delete_key(self, admin_key: str, ref: KeyRef) -> None:
        """Delete a key (and, for OpenAI, the service account made for it). A key or account
        that is already gone counts as deleted."""
        ...

    def find_keys(self, admin_key: str, name: str) -> list[KeyRef]:
        """The keys (with their ids) called ``name``: how a rotation whose answer was lost
        finds the key it may have created."""
        ...


@dataclass(frozen=True)
class KeyStatus:
    """What a provider's admin API says of a key."""

    key_id: str
    status: str  # active | inactive | archived | expired, as the provider names it
    expires_at: int | None = None  # Unix seconds; None when it does not expire
    name: str | None = None


@runtime_checkable
class KeyWatch(Protocol):
    """A provider whose admin API reports key status (but cannot create keys)."""

    def key_status(self, admin_key: str, key: str, key_id: str | None) -> KeyStatus | None:
        """The status of ``key``: by ``key_id`` when known, else by matching the key against
        the provider's hints; None when the provider knows no such key."""
        ...


@runtime_checkable
class SpendLimiter(Protocol):
    """A provider whose admin API holds a project's hard spend limit."""

    def spend_limit(self, admin_key: str, project_id: str) -> int | None:
        """The project's hard limit in micro-dollars, None when none is set."""
        ...

    def set_spend_limit(self, admin_key: str, project_id: str, limit_micros: int) -> None:
        """Set the project's hard limit (rounded up to the provider's unit)."""
        ...


@dataclass(frozen=True)
class FederationTarget:
    """The provider-side identifiers of a federated provider (``providers.<name>.*``)."""

    token_url: str
    identity_provider_id: str | None = None  # OpenAI
    service_account_id: str | None = None  # OpenAI and Anthropic
    federation_rule_id: str | None = None  # Anthropic
    organization_id: str | None = None  # Anthropic
    workspace_id: str | None = None  # Anthropic, optional


@dataclass(frozen=True)
class ExchangeRequest:
    """The token-exchange request to send (JSON body)."""

    url: str
    headers: dict[str, str]
    body: dict[str, str] = field(repr=False)


@dataclass(frozen=True)
class ProviderToken:
    """A provider access token and when it expires (Unix seconds)."""

    token: str = field(repr=False)
    expires_at: float


@runtime_checkable
class Federated(Protocol):
    """A provider that exchanges the broker's signed assertion for a short-lived token."""

    def exchange_request(self, assertion: str, target: FederationTarget) -> ExchangeRequest:
        """The request that exchanges ``assertion`` (a JWT the broker signed)."""
        ...

    def read_exchange(self, status: int, body: bytes, now: float) -> ProviderToken:
        """The token in the provider's answer; :class:`ProviderAdminError` for a refusal or a
        malformed answer (naming the provider's error code, never the token)."""
        ...
