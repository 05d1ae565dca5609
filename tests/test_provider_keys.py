"""Provider keys: read from Vault, cached briefly, rotated without a restart, and served from
the cache (for at most ``max_stale_s``) while Vault does not answer (decision 4)."""

from __future__ import annotations

import logging
import secrets
from typing import Any

import anyio
import pytest

from broker.devvault import DevVault, free_port
from broker.errors import Unavailable, VaultUnavailable
from broker.gateway.provider_keys import REFRESH_AHEAD, ProviderKeys
from broker.settings import VaultSettings
from broker.storage.vault import Vault
from tests.support import Clock


class Switch:
    """A Vault client that can be pointed at a closed port: Vault 'goes down'."""

    def __init__(self, vault: Vault, down: Vault) -> None:
        self.up, self.down, self.target = vault, down, vault
        self.reads = 0

    def read(self, path: str) -> tuple[dict[str, Any], int] | None:
        self.reads += 1
        return self.target.read(path)


@pytest.fixture
def real(vault: DevVault) -> Vault:
    return Vault(VaultSettings.model_validate(
        {"addr": vault.addr, "token": vault.root_token, "timeout_s": 2}))


@pytest.fixture
def switch(real: Vault) -> Switch:
    closed = Vault(VaultSettings(addr=f"http://127.0.0.1:{free_port()}", timeout_s=1))
    return Switch(real, closed)


def _path() -> str:
    return f"keys-{secrets.token_hex(6)}/provider"


def _get(keys: ProviderKeys, name: str = "p") -> str:
    return anyio.run(keys.get, name)


def test_the_key_is_read_from_vault_and_cached(real: Vault, switch: Switch) -> None:
    path, clock = _path(), Clock()
    real.write(path, {"api_key": "sk-one"})
    keys = ProviderKeys(switch, {"p": path}, max_stale_s=300, fresh_s=5, clock=clock)
    assert _get(keys) == "sk-one"
    assert _get(keys) == "sk-one"
    assert switch.reads == 1 and keys.version("p") == 1


def test_a_new_version_is_used_once_the_cache_is_stale(real: Vault, switch: Switch) -> None:
    path, clock = _path(), Clock()
    real.write(path, {"api_key": "sk-one"})
    keys = ProviderKeys(switch, {"p": path}, max_stale_s=300, fresh_s=5, clock=clock)
    assert _get(keys) == "sk-one"
    real.write(path, {"api_key": "sk-two"})
    assert _get(keys) == "sk-one"  # still fresh
    clock.now += 5
    assert _get(keys) == "sk-two" and keys.version("p") == 2


def test_near_the_end_of_its_freshness_the_key_is_read_again_behind_the_call(
        real: Vault, switch: Switch) -> None:
    """Past ``REFRESH_AHEAD`` of ``fresh_s`` a call still gets the cached key at once, and a
    background read brings the new version: under steady traffic no call waits for Vault."""
    path, clock = _path(), Clock()
    real.write(path, {"api_key": "sk-one"})
    keys = ProviderKeys(switch, {"p": path}, max_stale_s=300, fresh_s=5, clock=clock)

    async def scenario() -> list[str]:
        served = [await keys.get("p")]
        real.write(path, {"api_key": "sk-two"})
        clock.advance(5 * REFRESH_AHEAD)  # still fresh, but due for a read
        served.append(await keys.get("p"))
        with anyio.fail_after(10):  # the background read, on this event loop
            while keys.version("p") != 2:
                await anyio.sleep(0.01)
        served.append(await keys.get("p"))
        return served

    assert anyio.run(scenario) == ["sk-one", "sk-one", "sk-two"]
    assert switch.reads == 2  # the first read and the one behind the second call, no more


def test_a_failed_read_behind_a_call_keeps_the_cached_key(
        real: Vault, switch: Switch, caplog: pytest.LogCaptureFixture) -> None:
    path, clock = _path(), Clock()
    real.write(path, {"api_key": "sk-one"})
    keys = ProviderKeys(switch, {"p": path}, max_stale_s=0, fresh_s=5, clock=clock)

    async def scenario() -> list[str]:
        served = [await keys.get("p")]
        switch.target = switch.down
        clock.advance(5 * REFRESH_AHEAD)
        served.append(await keys.get("p"))
        with anyio.fail_after(10):
            while "background key read failed" not in caplog.text:
                await anyio.sleep(0.01)
        served.append(await keys.get("p"))  # still fresh: the cached key, no new read
        return served

    with caplog.at_level(logging.WARNING, logger="broker.provider_keys"):
        assert anyio.run(scenario) == ["sk-one", "sk-one", "sk-one"]
    assert "sk-one" not in caplog.text and keys.version("p") == 1


def test_invalidate_reads_vault_on_the_next_call(real: Vault, switch: Switch) -> None:
    path = _path()
    real.write(path, {"api_key": "sk-one"})
    keys = ProviderKeys(switch, {"p": path}, max_stale_s=300, fresh_s=60, clock=Clock())
    assert _get(keys) == "sk-one"
    real.write(path, {"api_key": "sk-two"})
    keys.invalidate("p")
    assert _get(keys) == "sk-two"


def test_while_vault_is_down_the_cached_key_serves_until_max_stale(
        real: Vault, switch: Switch) -> None:
    path, clock = _path(), Clock()
    real.write(path, {"api_key": "sk-one"})
    keys = ProviderKeys(switch, {"p": path}, max_stale_s=300, fresh_s=5, clock=clock)
    assert _get(keys) == "sk-one"
    switch.target = switch.down
    clock.now += 299
    assert _get(keys) == "sk-one"
    clock.now += 2
    with pytest.raises(VaultUnavailable) as info:
        _get(keys)
    assert info.value.status == 503 and "sk-one" not in str(info.value)


def test_a_vault_error_neither_drops_nor_replaces_the_cached_key(
        real: Vault, switch: Switch) -> None:
    path, clock = _path(), Clock()
    real.write(path, {"api_key": "sk-one"})
    keys = ProviderKeys(switch, {"p": path}, max_stale_s=300, fresh_s=5, clock=clock)
    assert _get(keys) == "sk-one"
    switch.target = switch.down
    keys.invalidate("p")
    clock.now += 10
    assert _get(keys) == "sk-one"
    assert keys.version("p") == 1
    switch.target = switch.up
    real.write(path, {"api_key": "sk-two"})
    assert _get(keys) == "sk-two"


def test_vault_down_with_nothing_cached_is_unavailable(switch: Switch) -> None:
    switch.target = switch.down
    keys = ProviderKeys(switch, {"p": _path()}, max_stale_s=300, clock=Clock())
    with pytest.raises(VaultUnavailable):
        _get(keys)


@pytest.mark.parametrize("data", [None, {}, {"api_key": ""}, {"api_key": 42}],
                         ids=["absent", "no-field", "empty", "not-a-string"])
def test_a_missing_key_is_unavailable(real: Vault, switch: Switch,
                                      data: dict[str, Any] | None) -> None:
    path = _path()
    if data is not None:
        real.write(path, data)
    keys = ProviderKeys(switch, {"p": path}, max_stale_s=300, clock=Clock())
    with pytest.raises(Unavailable) as info:
        _get(keys)
    assert info.value.status == 503


def test_a_provider_without_a_vault_path_has_no_key(switch: Switch) -> None:
    keys = ProviderKeys(switch, {"local": None}, max_stale_s=300)
    assert _get(keys, "local") == "" and switch.reads == 0
