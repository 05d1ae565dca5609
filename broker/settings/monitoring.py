"""Settings of runtime monitoring and alert delivery (``[monitoring]``, ``[alerts]``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictInt, field_validator

from broker.settings.base import MAX_MICROS
from broker.settings.base import Section as _Section

MonitorAction = Literal["suspend", "throttle", "alert", "off"]
Severity = Literal["info", "warning", "critical"]
SEVERITIES: tuple[str, ...] = ("info", "warning", "critical")


class _CountInWindow(_Section):
    """A detector that fires when ``threshold`` events fall within ``window_s``."""

    threshold: StrictInt = Field(default=20, ge=2, le=1_000_000)
    window_s: StrictInt = Field(default=60, ge=1, le=86_400)


class LoopSettings(_CountInWindow):
    """The same request fingerprint ``threshold`` times within the window is a loop."""


class FailureSettings(_CountInWindow):
    """Refusals (wrong secrets, refused tokens, rate-limit hits, upstream errors) in the
    window."""


class VelocitySettings(_Section):
    # Spend in a window far above the workload's baseline (``factor`` times it) and above the
    # absolute floor, in ``k`` of the last ``n`` windows.
    factor: float = Field(default=10.0, gt=1, le=100_000)
    floor_micros: StrictInt = Field(default=1_000_000, ge=0, le=MAX_MICROS)
    window_s: StrictInt = Field(default=300, ge=10, le=86_400)
    k: StrictInt = Field(default=2, ge=1, le=100)
    n: StrictInt = Field(default=3, ge=1, le=100)
    # The baseline's memory: an EWMA whose weight halves over this many seconds.
    half_life_s: StrictInt = Field(default=86_400, ge=60, le=366 * 86_400)
    # Windows of history before the workload's own baseline is trusted (before: its peers').
    min_baseline_windows: StrictInt = Field(default=12, ge=1, le=100_000)


class NewModelSettings(_Section):
    # A workload's first calls build its baseline and never raise this detector.
    min_baseline_calls: StrictInt = Field(default=10, ge=1, le=1_000_000)
    # A model not used within this long counts as new again.
    baseline_window_s: StrictInt = Field(default=7 * 86_400, ge=60, le=366 * 86_400)


class OriginSettings(_Section):
    # Networks seen during the first calls are learned (unless the policy names CIDRs).
    min_baseline_calls: StrictInt = Field(default=10, ge=1, le=1_000_000)
    # The size of a learned network.
    ipv4_prefix: StrictInt = Field(default=24, ge=8, le=32)
    ipv6_prefix: StrictInt = Field(default=48, ge=16, le=128)


def _default_actions() -> dict[str, MonitorAction]:
    return {"agent": "suspend", "service": "throttle", "interactive": "alert", "admin": "alert"}


class MonitoringSettings(_Section):
    enabled: bool = True
    # What a finding does, by identity kind (``policy.monitoring`` overrides per detector).
    actions: dict[str, MonitorAction] = Field(default_factory=_default_actions)
    # A throttled workload's rpm, tpm and burst limits are multiplied by this.
    throttle_factor: float = Field(default=0.1, gt=0, lt=1)
    # A detector that fired for a workload stays quiet for it this long.
    cooldown_s: StrictInt = Field(default=300, ge=0, le=86_400)
    # How often baselines are written to the database.
    flush_interval_s: float = Field(default=10.0, gt=0, le=3600)
    # Observations waiting for the monitor beyond this are dropped (and counted).
    queue_max: StrictInt = Field(default=100_000, ge=100, le=10_000_000)
    loop: LoopSettings = LoopSettings()
    failures: FailureSettings = FailureSettings()
    velocity: VelocitySettings = VelocitySettings()
    new_model: NewModelSettings = NewModelSettings()
    origin: OriginSettings = OriginSettings()

    @field_validator("actions")
    @classmethod
    def _kinds(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = set(value) - {"agent", "service", "interactive", "admin"}
        if unknown:
            raise ValueError(f"unknown identity kind {sorted(unknown)[0]!r}")
        return {**_default_actions(), **value}


class WebhookSettings(_Section):
    url: str
    # KV v2 path (under vault.kv_mount) whose ``secret`` field keys the HMAC signature.
    secret_vault_path: str = Field(min_length=1, max_length=512)
    min_severity: Severity = "info"

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or len(value) > 2048:
            raise ValueError("must be an http or https URL")
        return value


class AlertSettings(_Section):
    webhooks: tuple[WebhookSettings, ...] = ()
    timeout_s: float = Field(default=5.0, gt=0, le=60)
    # The longest wait between two delivery attempts (the backoff doubles up to it).
    retry_max_s: StrictInt = Field(default=300, ge=1, le=86_400)
