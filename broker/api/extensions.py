"""The capabilities that plug routes into the app beyond the token service."""

from __future__ import annotations

from collections.abc import Callable

from starlette.routing import BaseRoute

from broker.api.gateway import gateway_extension
from broker.api.monitoring import monitoring_extension
from broker.api.revocation import revocation_extension
from broker.services import Services

# Each extension (gateway, revocation, ...) contributes routes and a startup hook.
Extension = Callable[[Services], list[BaseRoute]]

DEFAULT_EXTENSIONS: tuple[Extension, ...] = (
    revocation_extension, monitoring_extension, gateway_extension)
