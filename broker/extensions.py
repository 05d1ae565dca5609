"""The capabilities that plug routes into the app beyond the token service."""

from __future__ import annotations

from broker.app import Extension
from broker.settings import Settings


def default_extensions(settings: Settings) -> tuple[Extension, ...]:
    from broker.gateway_routes import gateway_extension
    from broker.revocation_routes import revocation_extension

    return (revocation_extension, gateway_extension)
