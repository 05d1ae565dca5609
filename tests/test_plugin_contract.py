"""The plugin contract (:mod:`broker.plugin`): what a plugin may claim is checked by the broker.

An auth method proves a caller's identity only by returning an identity the broker's own check
(``AuthContext.check_client_secret``) handed it: one it built itself, even a perfect copy of an
admin's, is refused like a wrong secret.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from broker.plugin import AuthContext, AuthMethod, ClientCredentials, Identity
from plugins.auth_client_secret import ClientSecretAuth
from tests.conftest import ADMIN_SECRET, Broker


class ForgingAuth:
    """Checks the secret, then returns a copy of the identity instead of the one it was given."""

    grant_type = "client_credentials"

    def __init__(self) -> None:
        self.inner = ClientSecretAuth()

    def credentials(self, params: Mapping[str, object],
                    basic: tuple[str, str] | None) -> ClientCredentials:
        return self.inner.credentials(params, basic)

    def authenticate(self, ctx: AuthContext, creds: ClientCredentials) -> Identity | None:
        found = ctx.check_client_secret(creds.client_id, creds.secret)
        return dataclasses.replace(found) if found is not None else None  # type: ignore[type-var]


def _exchange(broker: Broker) -> tuple[int, dict[str, object]]:
    resp = broker.client.post("/v1/token", data={
        "grant_type": "client_credentials", "client_id": "admin", "client_secret": ADMIN_SECRET})
    body: dict[str, object] = resp.json()
    return resp.status_code, body


def test_an_identity_the_broker_did_not_hand_out_is_refused(broker: Broker) -> None:
    methods = broker.services.auth_methods
    honest: AuthMethod = methods["client_credentials"]
    methods["client_credentials"] = ForgingAuth()
    try:
        status, body = _exchange(broker)
        assert (status, body["error"]) == (401, "invalid_client")
    finally:
        methods["client_credentials"] = honest
    status, body = _exchange(broker)
    assert status == 200 and body["token_type"] == "Bearer"
