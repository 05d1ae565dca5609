"""An AppRole login at the session's real OpenBao: a workload's own Vault token."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import hvac
import pytest

from broker.devvault import DevVault

if TYPE_CHECKING:
    from tests.conftest import SecretLedger


# --- an AppRole at a mount of its own (the dev server is shared by the whole session) -------


@dataclass
class AppRole:
    vault: DevVault
    root: hvac.Client
    mount: str
    role: str
    role_id: str
    ledger: SecretLedger
    tokens: list[str] = field(default_factory=list)

    def login(self) -> str:
        secret_id = self.root.auth.approle.generate_secret_id(
            role_name=self.role, mount_point=self.mount)["data"]["secret_id"]
        self.ledger.add(secret_id)
        resp = self.root.auth.approle.login(
            role_id=self.role_id, secret_id=secret_id, mount_point=self.mount, use_token=False)
        token: str = resp["auth"]["client_token"]
        self.ledger.add(token)
        self.tokens.append(token)
        return token


@pytest.fixture(scope="module")
def approle(vault: DevVault, secret_ledger: SecretLedger) -> Iterator[AppRole]:
    root = hvac.Client(url=vault.addr, token=vault.root_token, timeout=10)
    mount = f"approle-{secrets.token_hex(4)}"
    role = f"workload-{secrets.token_hex(3)}"
    root.sys.enable_auth_method("approle", path=mount)
    root.auth.approle.create_or_update_approle(
        role_name=role, token_policies=["default"], token_ttl="10m", mount_point=mount)
    role_id = root.auth.approle.read_role_id(role_name=role, mount_point=mount)["data"]["role_id"]
    try:
        yield AppRole(vault, root, mount, role, role_id, secret_ledger)
    finally:
        root.sys.disable_auth_method(path=mount)  # type: ignore[no-untyped-call]


