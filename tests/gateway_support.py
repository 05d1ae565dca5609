"""Shared setup of the gateway tests: a fake provider on a real port, its key in Vault, a broker
whose models point at it, an agent allowed to use them, and readers of the ledger."""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from broker.gateway.calls import Gateway
from broker.storage.vault import Vault
from tests.conftest import SECRETS, Broker
from tests.fake_provider import FakeProviderServer
from tests.support import wait_for

# Prices chosen so that rounding matters: micro-dollars per million tokens.
PIN = 1_234_567
POUT = 2_345_678


def price(prompt: int, completion: int, pin: int = PIN, pout: int = POUT) -> int:
    return math.ceil((prompt * pin + completion * pout) / 1_000_000)


def gateway_sections(
    fake: FakeProviderServer,
    vault_path: str,
    *,
    pin: int = PIN,
    pout: int = POUT,
    timeout_s: float = 30.0,
    openai_url: str | None = None,
) -> dict[str, dict[str, Any]]:
    """``providers`` and ``models`` tables: each plugin against the fake provider."""
    prices = {"input_micros_per_mtok": pin, "output_micros_per_mtok": pout}
    return {
        # Tests that storm one tenant opt out of the tenant's concurrency cap; its own test sets it.
        "gateway": {"tenant_max_concurrent": 100_000},
        "providers": {
            "fake-openai": {"plugin": "openai", "base_url": openai_url or fake.url + "/v1",
                            "vault_path": vault_path, "timeout_s": timeout_s},
            "fake-anthropic": {"plugin": "anthropic", "base_url": fake.url,
                               "vault_path": vault_path, "timeout_s": timeout_s},
            "fake-compat": {"plugin": "openai-compatible", "base_url": fake.url + "/v1",
                            "vault_path": vault_path, "timeout_s": timeout_s},
            "mock": {},
        },
        "models": {
            "gpt-test": {"provider": "fake-openai", "upstream_model": "mock-gpt", **prices},
            "gpt-other": {"provider": "fake-openai", "upstream_model": "mock-gpt", **prices},
            "o1-test": {"provider": "fake-openai", "upstream_model": "mock-gpt", **prices},
            "claude-test": {"provider": "fake-anthropic", "upstream_model": "mock-claude",
                            **prices},
            "embed-test": {"provider": "fake-openai", "upstream_model": "mock-embedding",
                           **prices},
            "compat-test": {"provider": "fake-compat", "upstream_model": "mock-gpt", **prices},
            "mock-gpt": {"provider": "mock", **prices},
            "mock-claude": {"provider": "mock", **prices},
        },
    }


@dataclass
class Env:
    """A broker wired to the fake provider, with its provider key written to Vault."""

    broker: Broker
    fake: FakeProviderServer
    vault_path: str
    key: str

    @property
    def gateway(self) -> Gateway:
        gateway = self.broker.services.gateway
        assert gateway is not None, "the gateway extension is loaded"
        return gateway

    def write_key(self, key: str) -> int:
        SECRETS.add(key)
        self.key = key
        return Vault(self.broker.settings.vault).write(self.vault_path, {"api_key": key})

    def agent(self, budget: int = 1_000_000, models: list[str] | None = None,
              **policy: Any) -> dict[str, Any]:
        tenant = self.broker.create_tenant()
        body = {"models": models or ["gpt-test", "claude-test", "embed-test", "compat-test",
                                     "mock-gpt", "mock-claude", "o1-*"],
                "token_budget_micros": budget,
                "rate": {"rpm": 1_000_000, "tpm": 10**12},
                "max_concurrent": 100_000, "max_live_tokens": 100_000, **policy}
        return self.broker.create_workload(tenant["id"], policy=body)

    def token(self, budget: int = 1_000_000, **policy: Any) -> str:
        agent = self.agent(budget, **policy)
        return self.broker.token(agent["client_id"], agent["client_secret"])

    # --- the ledger, read directly ----------------------------------------------------

    def query(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        with self.broker.services.db.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text(sql), params)]

    def events(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM usage_event ORDER BY ts")

    def slice_of(self, token: str) -> dict[str, Any]:
        import jwt

        jti = jwt.decode(token, options={"verify_signature": False})["jti"]
        rows = self.query("SELECT * FROM token_slice WHERE jti = :j", j=jti)
        assert len(rows) == 1
        return rows[0]

    def wait_for_events(self, count: int, timeout_s: float = 20.0) -> list[dict[str, Any]]:
        """Streams settle after the client's last byte: the events, once ``count`` are in."""
        wait_for(lambda: len(self.events()) >= count, timeout_s,
                 what=lambda: f"{count} usage events (seen: {len(self.events())})")
        return self.events()


def make_env(factory: Callable[..., Broker], db: str, fake: FakeProviderServer, *,
             adjust: Callable[[dict[str, dict[str, Any]]], None] | None = None,
             **options: Any) -> Env:
    """``adjust`` may change the configuration sections (add a model, a provider key, ...)
    before the broker is built."""
    vault_path = f"gw-{secrets.token_hex(6)}/providers/fake"
    sections = gateway_sections(fake, vault_path, **options)
    if adjust is not None:
        adjust(sections)
    broker = factory(db, **sections)
    env = Env(broker, fake, vault_path, "")
    env.write_key("sk-fake-" + secrets.token_urlsafe(16))
    fake.state.valid_keys = {env.key}
    return env
