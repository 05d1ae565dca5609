"""What the fake providers' admin APIs hold (:mod:`plugins.mock_provider_admin`): projects,
service accounts and keys, OpenRouter and Anthropic keys, the injected faults, and the helpers
a test reads them with."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Protocol

OPENAI_PROJECT = "proj_mock"


@dataclass
class AdminFault:
    """Answer `status` to the next `times` calls of one operation; with `after`, carry the
    operation out first (a lost answer)."""

    status: int
    times: int = 1
    after: bool = False


@dataclass
class ProjectKey:
    """An OpenAI project API key: a service account's (`account_id`) or a user's (None)."""

    id: str
    key: str = field(repr=False)
    name: str
    project_id: str
    account_id: str | None = None


@dataclass
class ServiceAccount:
    id: str
    name: str
    project_id: str
    key_id: str | None  # its one key, None when made with `create_service_account_only`


@dataclass
class RouterKey:
    hash: str
    key: str = field(repr=False)
    name: str
    disabled: bool = False
    limit: float | None = None


@dataclass
class AnthropicKey:
    id: str
    key: str = field(repr=False)
    name: str
    status: str  # active | inactive | archived; `expired` is derived from expires_at
    expires_at: float | None = None
    workspace_id: str = "wrkspc_mock"


class _Keys(Protocol):
    """What the admin state needs of the rest of `MockState`."""

    valid_keys: set[str] | None
    clock: float | None
    service_accounts: dict[str, ServiceAccount]
    openai_keys: dict[str, ProjectKey]
    router_keys: dict[str, RouterKey]
    anthropic_keys: dict[str, AnthropicKey]
    token_expiry: dict[str, float]


def now(state: _Keys) -> float:
    """The fake's time: the test's clock, else the real one."""
    return time.time() if state.clock is None else state.clock


def accept(state: _Keys, key: str) -> None:
    if state.valid_keys is None:
        state.valid_keys = set()
    state.valid_keys.add(key)


def refuse(state: _Keys, key: str) -> None:
    if state.valid_keys is not None:
        state.valid_keys.discard(key)


@dataclass
class ProviderAccounts:
    """The admin APIs' part of `MockState`: what the providers hold, and the faults."""

    admin_faults: dict[str, AdminFault] = field(default_factory=dict)
    admin_log: list[str] = field(default_factory=list)
    openai_projects: set[str] = field(default_factory=lambda: {OPENAI_PROJECT})
    service_accounts: dict[str, ServiceAccount] = field(default_factory=dict)
    openai_keys: dict[str, ProjectKey] = field(default_factory=dict)
    spend_limits: dict[str, int] = field(default_factory=dict)  # project -> cents
    router_keys: dict[str, RouterKey] = field(default_factory=dict)
    anthropic_keys: dict[str, AnthropicKey] = field(default_factory=dict)
    token_expiry: dict[str, float] = field(default_factory=dict)  # key or token -> refused from

    def live_admin_keys(self: _Keys) -> dict[str, str]:
        """Id -> value of every key made through an admin API (OpenAI service accounts,
        OpenRouter) and not deleted, disabled ones included: what a
        rotation must not leave behind."""
        live = {k.id: k.key for k in self.openai_keys.values() if k.account_id is not None}
        live |= {k.hash: k.key for k in self.router_keys.values()}
        return live

    def add_anthropic_key(self: _Keys, key: str, status: str = "active",
                          expires_at: float | None = None, name: str = "mock key") -> str:
        """An Anthropic API key, as the Console makes them; accepted by `/v1/messages` while
        active and before `expires_at` (the fake's clock). Returns its id."""
        key_id = f"apikey_{secrets.token_hex(12)}"
        self.anthropic_keys[key_id] = AnthropicKey(key_id, key, name, status, expires_at)
        if status == "active":
            accept(self, key)
        if expires_at is not None:
            self.token_expiry[key] = expires_at
        return key_id

    def add_openai_user_key(self: _Keys, key: str, name: str = "operator key",
                            project_id: str = OPENAI_PROJECT) -> str:
        """A user's OpenAI project key (an operator's first key), accepted until deleted."""
        key_id = f"key_{secrets.token_hex(8)}"
        self.openai_keys[key_id] = ProjectKey(key_id, key, name, project_id)
        accept(self, key)
        return key_id

    def forget_admin_calls(self) -> None:
        """What `MockState.reset` forgets here: the faults and the log of calls."""
        self.admin_faults.clear()
        self.admin_log.clear()
