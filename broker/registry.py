"""The plugin registry: every installed plugin, found through its entry point and checked
against its Protocol in :mod:`broker.plugin`.

A duplicate name is refused and a plugin that fails to load stops the start: a broker that
silently runs without an auth method or a provider it was configured for is worse than none.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import TypeVar

from broker.errors import ConfigError
from broker.plugin import (
    AUTH_METHODS_GROUP,
    PROVIDERS_GROUP,
    AuthMethod,
    IssuerType,
    Provider,
    ProviderConfig,
    ProviderPlugin,
)
from broker.settings import ProviderSettings

T = TypeVar("T")


class PluginError(ConfigError):
    """A plugin could not be loaded, or two plugins claim one name."""


def load_plugins(group: str, kind: type[T]) -> dict[str, T]:
    """Every plugin registered under the entry-point ``group``, checked against ``kind``."""
    found: dict[str, T] = {}
    for ep in entry_points(group=group):
        if ep.name in found:
            raise PluginError(f"{group}: two plugins are named {ep.name!r}")
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginError(
                f"{group}: plugin {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(plugin, kind):
            raise PluginError(f"{group}: plugin {ep.name!r} does not implement {kind.__name__}")
        found[ep.name] = plugin
    return found


def load_auth_methods() -> tuple[dict[str, AuthMethod], dict[str, IssuerType]]:
    """Every installed auth method: the grant methods by the grant type they serve, and the
    issuer types (for the token-exchange grant) by their type name."""
    plugins = load_plugins(AUTH_METHODS_GROUP, object)
    grants: dict[str, AuthMethod] = {}
    issuers: dict[str, IssuerType] = {}
    for name, plugin in plugins.items():
        if isinstance(plugin, IssuerType):
            if plugin.issuer_type in issuers:
                raise PluginError(f"{AUTH_METHODS_GROUP}: two plugins verify {plugin.issuer_type!r}")
            issuers[plugin.issuer_type] = plugin
        elif isinstance(plugin, AuthMethod):
            grants[plugin.grant_type] = plugin
        else:
            raise PluginError(f"{AUTH_METHODS_GROUP}: plugin {name!r} implements neither "
                              "AuthMethod nor IssuerType")
    return grants, issuers


def load_provider_plugins() -> dict[str, ProviderPlugin]:
    """Every installed provider plugin by entry-point name (a duplicate or a plugin that fails
    to load is a :class:`ConfigError`)."""
    return load_plugins(PROVIDERS_GROUP, ProviderPlugin)  # type: ignore[type-abstract]


def build_providers(
    providers: Mapping[str, ProviderSettings],
    plugins: Mapping[str, ProviderPlugin] | None = None,
) -> dict[str, Provider]:
    """Build every configured provider through its plugin; a missing plugin or a bad table is
    a :class:`ConfigError` naming the key."""
    plugins = load_provider_plugins() if plugins is None else plugins
    built: dict[str, Provider] = {}
    for name, settings in providers.items():
        plugin = settings.plugin or name
        factory = plugins.get(plugin)
        if factory is None:
            known = ", ".join(sorted(plugins)) or "none installed"
            raise ConfigError(
                f"invalid configuration: providers.{name}.plugin: no provider plugin {plugin!r} "
                f"(known: {known})"
            )
        config = ProviderConfig(
            name=name,
            plugin=plugin,
            base_url=settings.base_url,
            timeout_s=settings.timeout_s,
            has_key=settings.vault_path is not None,
            credential=settings.credential,
            project_id=settings.project_id,
        )
        built[name] = factory.create(config)
    return built
