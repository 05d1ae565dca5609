"""Settings of where rate limits are counted (``[limits]``, ``[redis]``)."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator

from broker.settings.base import Section as _Section

LimitsBackend = Literal["memory", "database", "redis"]


class LimitsSettings(_Section):
    # memory: each process counts alone (one replica). database or redis: rate limits, burst
    # windows and failed-secret counters are shared, so N replicas enforce what one would.
    backend: LimitsBackend = "memory"
    # Every Redis key of the limits starts with this, so several brokers can share one Redis.
    redis_prefix: str = Field(default="broker:limits:", min_length=1, max_length=64)
    # A shared store that has not answered within this refuses the request (503).
    timeout_s: float = Field(default=1.0, gt=0, le=30)


class RedisSettings(_Section):
    # A secret: the URL may carry a password (redis://:password@host:6379/0).
    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: SecretStr) -> SecretStr:
        # The message must not echo the value: it may hold the password.
        if urlsplit(value.get_secret_value()).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value
