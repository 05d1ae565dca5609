"""The ``client_credentials`` grant: a client id and a high-entropy secret (RFC 6749 §4.4)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.plugin import (
    AuthContext,
    ClientCredentials,
    InvalidClient,
    InvalidRequest,
)


class ClientSecretAuth:
    grant_type = "client_credentials"

    def credentials(
        self, params: Mapping[str, Any], basic: tuple[str, str] | None
    ) -> ClientCredentials:
        body_id = params.get("client_id")
        body_secret = params.get("client_secret")
        for value in (body_id, body_secret):
            if value is not None and (not isinstance(value, str) or len(value) > 512):
                raise InvalidRequest("client_id and client_secret must be short strings")
        if basic is not None:
            # RFC 6749 §2.3: a client uses one authentication method per request.
            if body_secret is not None or (body_id is not None and body_id != basic[0]):
                raise InvalidRequest("use one client authentication method")
            return ClientCredentials(client_id=basic[0], secret=basic[1])
        if not body_id or body_secret is None:
            raise InvalidClient()
        return ClientCredentials(client_id=str(body_id), secret=str(body_secret))

    def authenticate(self, ctx: AuthContext, creds: ClientCredentials) -> Any | None:
        return ctx.check_client_secret(creds.client_id, creds.secret)


plugin = ClientSecretAuth()
