"""Settings of provider credentials without static keys: the federation section and the
cross-field rules of ``providers.<name>.credential``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from pydantic import Field, StrictInt

from broker.errors import ConfigError
from broker.settings.base import Section

if TYPE_CHECKING:
    from broker.settings import ProviderSettings

# The longest life of an assertion: the provider must not be able to replay one for long.
MAX_ASSERTION_TTL_S = 300
# Which plugins can do what (a third-party plugin is checked structurally at start).
ROTATING_PLUGINS = ("openai", "openrouter", "anthropic")
FEDERATED_PLUGINS = ("openai", "anthropic")


class FederationSettings(Section):
    """The broker as an OIDC issuer toward providers (``credential = "federated"``)."""

    # ``exp - iat`` of an assertion.
    assertion_ttl_s: StrictInt = Field(default=120, ge=10, le=MAX_ASSERTION_TTL_S)
    # RS256 is what every relying party accepts; ES256 is smaller.
    assertion_alg: Literal["RS256", "ES256"] = "RS256"
    # A provider token is refreshed once this share of its life has passed (and at the latest
    # ``refresh_margin_s`` before it expires).
    refresh_at: float = Field(default=0.75, gt=0, lt=1)
    refresh_margin_s: StrictInt = Field(default=60, ge=1, le=3600)
    # Time limit of one exchange call.
    timeout_s: float = Field(default=10.0, gt=0, le=60)


def _missing(name: str, provider: ProviderSettings, *fields: str) -> None:
    for field in fields:
        if not getattr(provider, field):
            raise ConfigError(f"invalid configuration: providers.{name}.{field}: required "
                              f"with credential = {provider.credential!r}")


def _check_token_url(name: str, url: str) -> None:
    """The assertion and the token travel to it: https, or http to this host only."""
    parts = urlsplit(url)
    local = parts.hostname in ("127.0.0.1", "::1", "localhost")
    if not parts.hostname or parts.query or parts.fragment or not (
            parts.scheme == "https" or (parts.scheme == "http" and local)):
        raise ConfigError(f"invalid configuration: providers.{name}.token_url: must be an "
                          "https URL (http only to this host) without query or fragment")


def check_credentials(providers: Mapping[str, ProviderSettings]) -> None:
    """Each credential mode has the keys it needs, and none that would contradict it."""
    for name, p in providers.items():
        plugin = p.plugin or name
        if p.credential == "rotating":
            _missing(name, p, "vault_path", "admin_vault_path")
            if plugin == "openai":
                _missing(name, p, "project_id")
        elif p.credential == "federated":
            _missing(name, p, "token_url", "audience")
            _check_token_url(name, str(p.token_url))
            if p.vault_path is not None:
                raise ConfigError(f"invalid configuration: providers.{name}.vault_path: a "
                                  "federated provider stores no key")
            if plugin == "openai":
                _missing(name, p, "identity_provider_id", "service_account_id")
            elif plugin == "anthropic":
                _missing(name, p, "federation_rule_id", "organization_id")
        if p.project_spend_limit_micros is not None:
            _missing(name, p, "admin_vault_path", "project_id")
        if p.admin_vault_path is not None and p.admin_vault_path == p.vault_path:
            raise ConfigError(f"invalid configuration: providers.{name}.admin_vault_path: the "
                              "admin key must live apart from the key it makes")
