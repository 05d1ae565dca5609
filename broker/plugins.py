"""The line around what plugins may use: their Protocols, and the entry-point registry.

Plugins are found through entry points, so a third party adds one by installing a package.
A duplicate name is refused and a plugin that fails to load stops the start: a broker that
silently runs without an auth method or a provider it was configured for is worse than none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol, TypeVar, runtime_checkable

from broker.errors import ConfigError

AUTH_METHODS_GROUP = "broker.auth_methods"

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


# --- auth methods ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientCredentials:
    """What a caller presented; ``client_id`` keys the failure throttle."""

    client_id: str
    secret: str


class AuthContext(Protocol):
    """What the broker lends an auth method, inside the issuance transaction."""

    def check_client_secret(self, client_id: str, secret: str) -> Any | None:
        """The live identity whose secret matches (constant time, keyed hash), else None."""
        ...


@runtime_checkable
class AuthMethod(Protocol):
    """Turns the parameters of one OAuth grant into a broker identity."""

    grant_type: str

    def credentials(
        self, params: Mapping[str, Any], basic: tuple[str, str] | None
    ) -> ClientCredentials:
        """Read the caller's credentials; raise ``InvalidClient``/``InvalidRequest`` if absent."""
        ...

    def authenticate(self, ctx: AuthContext, creds: ClientCredentials) -> Any | None:
        """The identity the credentials prove, or None (one answer for every failure)."""
        ...
