"""Settings of the audit chain, usage rollups and the admin console (``[audit]``, ``[usage]``,
``[console]``)."""

from __future__ import annotations

from pydantic import Field, StrictInt, field_validator

from broker.settings.base import Section as _Section


class AuditSettings(_Section):
    # How often the head of the chain is signed (a checkpoint), when entries were added since.
    checkpoint_interval_s: StrictInt = Field(default=300, ge=1, le=86_400)
    # KV v2 path (under vault.prefix) of the Ed25519 audit key: never the token signing key.
    key_path: str = "audit-key"
    # Where each checkpoint is also written, out of the database administrator's reach: a file
    # that checkpoints are appended to (one JSON line each) and/or a webhook that receives each
    # one as a JSON POST. Empty: neither.
    checkpoint_file: str = ""
    checkpoint_webhook: str = ""

    @field_validator("checkpoint_webhook")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return value


class UsageSettings(_Section):
    # Raw usage events are deleted this many days after their time, once rolled up; totals and
    # series are answered from the hourly and daily rollups.
    raw_retention_days: StrictInt = Field(default=90, ge=1, le=3660)
    # How often settled events are folded into the rollups (a job, idempotent).
    rollup_interval_s: float = Field(default=30.0, gt=0, le=3600)


class ConsoleSettings(_Section):
    enabled: bool = True
    # A console session ends this long after sign-in, whatever the token it came from.
    session_ttl_s: StrictInt = Field(default=8 * 3600, ge=60, le=7 * 86_400)
    # Signed out after this long without a request.
    idle_timeout_s: StrictInt = Field(default=1800, ge=60, le=86_400)
