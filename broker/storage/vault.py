"""The only module that speaks to Vault/OpenBao (through ``hvac``).

hvac's exceptions become ours: a Vault that does not answer is :class:`VaultUnavailable`,
never "absent", so a caller can never mistake an outage for a missing secret and replace it.
"""

from __future__ import annotations

from typing import Any

import hvac
import hvac.exceptions
import requests

from broker.errors import VaultUnavailable
from broker.settings import VaultSettings


class CasConflict(Exception):
    """A check-and-set write lost a race with another writer (another replica)."""


class Vault:
    def __init__(self, settings: VaultSettings):
        self.settings = settings
        self._client = hvac.Client(
            url=settings.addr,
            token=settings.token.get_secret_value() or None,
            timeout=settings.timeout_s,  # type: ignore[arg-type]
        )
        self._mount = settings.kv_mount

    def path(self, *parts: str) -> str:
        return "/".join([self.settings.prefix.strip("/"), *parts])

    def read(self, path: str) -> tuple[dict[str, Any], int] | None:
        """(data, version) of the newest version at ``path``, or None when nothing is there."""
        try:
            resp = self._client.secrets.kv.v2.read_secret_version(
                path=path, mount_point=self._mount, raise_on_deleted_version=False
            )
        except hvac.exceptions.InvalidPath:
            return None
        except (requests.RequestException, hvac.exceptions.VaultError) as exc:
            raise VaultUnavailable("Vault did not answer") from exc
        data = resp["data"]
        if data.get("data") is None:
            return None
        return dict(data["data"]), int(data["metadata"]["version"])

    def write(self, path: str, data: dict[str, Any], cas: int | None = None) -> int:
        """Write a new version; with ``cas`` the write only lands over that version (0: none)."""
        try:
            resp = self._client.secrets.kv.v2.create_or_update_secret(
                path=path, secret=data, cas=cas, mount_point=self._mount
            )
        except hvac.exceptions.InvalidRequest as exc:
            if cas is not None and "check-and-set" in str(exc):
                raise CasConflict(path) from None
            raise VaultUnavailable("Vault refused the write") from exc
        except (requests.RequestException, hvac.exceptions.VaultError) as exc:
            raise VaultUnavailable("Vault did not answer") from exc
        return int(resp["data"]["version"])

    def is_ready(self) -> bool:
        try:
            status = self._client.sys.read_health_status(method="GET")
        except (requests.RequestException, hvac.exceptions.VaultError):
            return False
        if isinstance(status, dict):
            return not status.get("sealed", True)
        return bool(getattr(status, "ok", False))

    def check(self) -> None:
        """Raise :class:`VaultUnavailable` unless Vault answers and our token can read KV."""
        if not self.is_ready():
            raise VaultUnavailable(f"Vault at {self.settings.addr} does not answer or is sealed")
        self.read(self.path("pepper"))  # proves the token and the mount work
