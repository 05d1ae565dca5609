"""Typed, frozen settings: TOML plus ``BROKER_<SECTION>_<KEY>`` environment overrides.

Settings are read once at start and passed explicitly. A wrong key or a bad value raises
:class:`ConfigError` naming the key, so the CLI can print one line instead of a traceback.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url

from broker.errors import ConfigError
from broker.settings.agents import BatchSettings, ToolSettings
from broker.settings.audit import AuditSettings, ConsoleSettings, UsageSettings
from broker.settings.base import MAX_MICROS as MAX_MICROS
from broker.settings.base import Section as _Section
from broker.settings.credentials import FederationSettings, check_credentials
from broker.settings.limits import LimitsSettings, RedisSettings
from broker.settings.monitoring import AlertSettings, MonitoringSettings

DEFAULT_CONFIG_PATH = Path("config/broker.toml")

Period = Literal["hour", "day", "month", "total"]



class BudgetLimit(_Section):
    period: Period
    limit_micros: StrictInt = Field(ge=0, le=MAX_MICROS)


class DatabaseSettings(_Section):
    url: str = "sqlite:///var/broker.db"
    pool_size: StrictInt = Field(default=16, ge=1, le=512)

    @field_validator("url")
    @classmethod
    def _url_names_a_database_we_can_speak_to(cls, value: str) -> str:
        # Checked here so a typo stops the start with the key's name, not an engine traceback.
        try:
            make_url(value).get_dialect()
        except Exception:
            raise ValueError("not a SQLAlchemy URL of an installed database driver") from None
        return value


class VaultSettings(_Section):
    addr: str = "http://127.0.0.1:8200"
    token: SecretStr = SecretStr("")
    kv_mount: str = "secret"
    # Every secret of this broker lives under this KV v2 path prefix.
    prefix: str = "broker"
    timeout_s: float = Field(default=5.0, gt=0, le=60)
    max_stale_s: StrictInt = Field(default=300, ge=0, le=86400)


class IssuerSettings(_Section):
    url: str = "http://127.0.0.1:8080"
    audience: str = "ai-broker"


class TokenSettings(_Section):
    default_ttl_s: StrictInt = Field(default=300, ge=1, le=900)
    max_ttl_s: StrictInt = Field(default=900, ge=1, le=900)
    # How many delegations deep a sub-agent's token may be (a child of the root is depth 1).
    max_delegation_depth: StrictInt = Field(default=3, ge=0, le=16)


ExternalIssuerType = Literal["kubernetes", "github-actions", "spiffe", "oidc"]


class ExternalIssuerSettings(_Section):
    """``auth.issuers.<name>``: an outside issuer whose JWTs a workload may exchange for a
    broker token (Kubernetes service-account tokens, GitHub Actions OIDC, SPIFFE JWT-SVIDs)."""

    type: ExternalIssuerType
    # The exact ``iss`` of its tokens.
    issuer: str = Field(min_length=1, max_length=2048)
    # Where its keys are: an https (or loopback http) URL, or a file. Never a token's header.
    jwks_url: str | None = Field(default=None, max_length=2048)
    jwks_file: str | None = None
    # The ``aud`` its tokens must carry for this broker.
    audience: str = Field(min_length=1, max_length=2048)
    # Narrows the issuer type's allow-list; never widens it.
    algorithms: tuple[str, ...] | None = None
    # Tokens issued longer ago than this (``iat``) are refused, whatever their ``exp``.
    max_age_s: StrictInt = Field(default=3600, ge=1, le=7 * 86_400)
    # An unknown ``kid`` refetches the JWKS at most this often.
    refetch_s: StrictInt = Field(default=60, ge=1, le=86_400)
    # The JWKS is refetched when older than this, whatever the kids seen.
    jwks_max_age_s: StrictInt = Field(default=3600, ge=1, le=7 * 86_400)
    fetch_timeout_s: float = Field(default=5.0, gt=0, le=60)
    jwks_max_bytes: StrictInt = Field(default=262_144, ge=1024, le=16 * 1_048_576)
    # A CA bundle for the JWKS (and TokenReview) endpoint; default: the system's.
    ca_file: str | None = None
    # Kubernetes only: ask the API server (TokenReview) whether the token, and so its pod, is
    # still alive. ``tokenreview_url`` is the API server; the broker's own service-account token
    # is read from ``tokenreview_token_file`` on every review (it is rotated too).
    tokenreview: bool = False
    tokenreview_url: str | None = Field(default=None, max_length=2048)
    tokenreview_token_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"

    @model_validator(mode="after")
    def _consistent(self) -> ExternalIssuerSettings:
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError("set exactly one of jwks_url and jwks_file")
        if self.jwks_url is not None and not _fetchable(self.jwks_url):
            raise ValueError("jwks_url must be an https URL (http only on a loopback address)")
        if self.algorithms is not None:
            bad = [a for a in self.algorithms if a == "none" or a.upper().startswith("HS")]
            if bad or not self.algorithms:
                raise ValueError("algorithms must name public-key algorithms (never none or HS*)")
        if self.type == "kubernetes" and self.issuer == "kubernetes/serviceaccount":
            raise ValueError("legacy secret-based service-account tokens are not accepted; "
                             "use projected tokens and the cluster's issuer URL")
        if self.tokenreview and (self.type != "kubernetes" or not self.tokenreview_url):
            raise ValueError("tokenreview needs type = kubernetes and tokenreview_url")
        return self


def _fetchable(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    if parts.scheme != "http" or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


class VaultTokenSettings(_Section):
    """``auth.vault_tokens``: accept a Vault/OpenBao token from the workload's own login."""

    enabled: bool = False


class AuthSettings(_Section):
    failure_limit: StrictInt = Field(default=10, ge=1, le=10_000)
    failure_window_s: StrictInt = Field(default=300, ge=1, le=86_400)
    secret_grace_s: StrictInt = Field(default=3600, ge=0, le=30 * 86_400)
    # Tokens one authenticated client may obtain per minute (429 slow_down beyond).
    issuance_rpm: StrictInt = Field(default=120, ge=1, le=1_000_000)
    issuers: dict[str, ExternalIssuerSettings] = Field(default_factory=dict)
    vault_tokens: VaultTokenSettings = VaultTokenSettings()

    @field_validator("issuers")
    @classmethod
    def _issuer_names(cls, value: dict[str, ExternalIssuerSettings]) -> dict[str, ExternalIssuerSettings]:
        for name in value:
            if name == "vault" or not (0 < len(name) <= 64) or not name.replace("-", "").replace(
                    "_", "").isalnum() or not name.isascii():
                raise ValueError(f"issuer name {name!r}: letters, digits, - and _; not 'vault'")
        return value


class OrgSettings(_Section):
    budgets: tuple[BudgetLimit, ...] = ()


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: StrictInt = Field(default=8080, ge=0, le=65535)
    max_body_bytes: StrictInt = Field(default=1_048_576, ge=1024, le=64 * 1_048_576)
    admin_max_body_bytes: StrictInt = Field(default=65_536, ge=1024, le=16 * 1_048_576)
    # Peers (CIDRs) whose X-Forwarded-For is believed; empty: the TCP peer is the client.
    trusted_proxies: tuple[str, ...] = ()
    # A request head must arrive within this; connections beyond the cap are refused.
    head_timeout_s: float = Field(default=10.0, gt=0, le=300)
    max_connections: StrictInt = Field(default=4096, ge=1, le=1_000_000)
    # On SIGTERM new connections are refused at once; streams under way may run this long
    # before the broker ends them (with an error event), settled with what they used.
    shutdown_grace_s: float = Field(default=30.0, ge=0, le=3600)

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an IP network (CIDR)") from None
        return value


class MetricsSettings(_Section):
    # When set, GET /metrics needs it as a bearer token.
    token: SecretStr | None = None


class GatewaySettings(_Section):
    # The longest a stream may run, whatever its token's expiry.
    max_stream_s: StrictInt = Field(default=300, ge=1, le=86_400)
    # How long a stream whose client left is still read, to learn the provider's usage.
    drain_s: StrictInt = Field(default=30, ge=0, le=3600)
    # Gateway calls one tenant may have running at once (on one replica).
    tenant_max_concurrent: StrictInt = Field(default=128, ge=1, le=1_000_000)


class SweeperSettings(_Section):
    interval_s: float = Field(default=10.0, gt=0, le=3600)
    # A hold older than this can no longer belong to a running request.
    max_request_s: StrictInt = Field(default=600, ge=1, le=86_400)
    # Released token slices are deleted this long after their release.
    slice_retention_s: StrictInt = Field(default=86_400, ge=0, le=366 * 86_400)


class RotationSettings(_Section):
    # 0 turns a scheduled rotation off; rotation on demand always works.
    signing_interval_s: StrictInt = Field(default=0, ge=0, le=366 * 86_400)
    provider_interval_s: StrictInt = Field(default=0, ge=0, le=366 * 86_400)
    # How long a replaced provider key keeps working before the broker revokes it upstream:
    # longer than the longest request (sweeper.max_request_s), so none fails mid-way.
    provider_grace_s: StrictInt = Field(default=900, ge=0, le=7 * 86_400)
    # The federation assertion key (separate from the token signing key); 0: never.
    assertion_interval_s: StrictInt = Field(default=90 * 86_400, ge=0, le=366 * 86_400)
    # How often watched keys (Anthropic) and spend limits are checked, and how long before a
    # key's expiry the provider is marked unhealthy and an alert raised.
    provider_watch_interval_s: StrictInt = Field(default=3600, ge=1, le=86_400)
    provider_expiry_warning_s: StrictInt = Field(default=7 * 86_400, ge=0, le=366 * 86_400)


class RevocationSettings(_Section):
    # The periodic read that catches a revocation whose notification was missed.
    catchup_interval_s: float = Field(default=3.0, gt=0, le=60)


class SchedulerSettings(_Section):
    # How often the scheduler looks for due jobs (and a follower tries to become leader).
    tick_s: float = Field(default=1.0, gt=0, le=60)


class ProviderSettings(_Section):
    plugin: str | None = None
    base_url: str | None = None
    vault_path: str | None = None
    timeout_s: float = Field(default=120.0, gt=0, le=3600)
    # Connections to this provider at once (each provider has a pool of its own).
    max_connections: StrictInt = Field(default=256, ge=1, le=100_000)
    # ``anthropic-beta`` values that may pass to this provider; any other is refused.
    allowed_beta: tuple[str, ...] = ()
    # Request fields beyond the plugin's known ones that may pass (counted as input text).
    allowed_fields: tuple[str, ...] = ()
    # The tokens held for a media part whose size the broker cannot see (a document by URL
    # or file id); unset, such parts are refused.
    unsized_part_tokens: StrictInt | None = Field(default=None, ge=1, le=10_000_000)
    # The tokens held per page of a PDF document (its text and its page image).
    pdf_page_tokens: StrictInt = Field(default=6_000, ge=1, le=1_000_000)
    # Provider credentials without static keys (see broker.settings.credentials).
    credential: Literal["static", "rotating", "federated"] = "static"
    admin_vault_path: str | None = None  # KV v2 path whose ``api_key`` is the admin key
    project_id: str | None = Field(default=None, max_length=128)  # OpenAI
    project_spend_limit_micros: StrictInt | None = Field(default=None, ge=1, le=MAX_MICROS)
    token_url: str | None = None
    audience: str | None = Field(default=None, max_length=512)
    identity_provider_id: str | None = Field(default=None, max_length=128)
    service_account_id: str | None = Field(default=None, max_length=128)
    federation_rule_id: str | None = Field(default=None, max_length=128)
    organization_id: str | None = Field(default=None, max_length=128)
    workspace_id: str | None = Field(default=None, max_length=128)
    # The ``sub`` of the broker's assertions toward this provider (default ``provider:<name>``).
    assertion_subject: str | None = Field(default=None, max_length=256)


ImageRuleName = Literal["openai-tiles", "anthropic-pixels", "none"]


class ModelSettings(_Section):
    provider: str
    upstream_model: str | None = None
    input_micros_per_mtok: StrictInt = Field(ge=0, le=MAX_MICROS)
    output_micros_per_mtok: StrictInt = Field(ge=0, le=MAX_MICROS)
    # Invoice-exact prices: cached input (OpenAI cached tokens, Anthropic cache reads) and
    # Anthropic cache writes. Unset: the input price, and 1.25 times it for cache writes.
    cached_input_micros_per_mtok: StrictInt | None = Field(default=None, ge=0, le=MAX_MICROS)
    cache_write_micros_per_mtok: StrictInt | None = Field(default=None, ge=0, le=MAX_MICROS)
    # The provider's discount on batch jobs (OpenAI and Anthropic: 50); unset, none, so that a
    # batch is never held below what it may cost.
    batch_discount_percent: StrictInt = Field(default=0, ge=0, le=99)
    # How an image part is bounded; unset: the costliest rule the provider's plugin knows.
    image_rule: ImageRuleName | None = None
    image_base_tokens: StrictInt | None = Field(default=None, ge=0, le=1_000_000)
    image_tile_tokens: StrictInt | None = Field(default=None, ge=0, le=1_000_000)
    # anthropic-pixels: a model that reads larger images than Anthropic's documented 1568 px
    # long edge (and ~1,600 tokens) needs both raised, or its images can bill past the hold.
    image_long_edge: StrictInt | None = Field(default=None, ge=1, le=100_000)
    image_max_tokens: StrictInt | None = Field(default=None, ge=1, le=1_000_000)
    # OpenAI ``service_tier`` values beyond auto/default that may pass, each with its price as
    # a percentage of the prices above (e.g. {"priority" = 200, "flex" = 50}).
    service_tier_percent: dict[str, StrictInt] = Field(default_factory=dict)

    @field_validator("service_tier_percent")
    @classmethod
    def _percent(cls, value: dict[str, int]) -> dict[str, int]:
        for tier, percent in value.items():
            if not 1 <= percent <= 10_000:
                raise ValueError(f"{tier}: a percentage from 1 to 10000")
        return value


class ApprovalSettings(_Section):
    # The longest a grant may live.
    max_ttl_s: StrictInt = Field(default=7 * 86_400, ge=60, le=366 * 86_400)
    # A request nobody answered expires after this.
    pending_ttl_s: StrictInt = Field(default=86_400, ge=60, le=366 * 86_400)


class Settings(_Section):
    database: DatabaseSettings = DatabaseSettings()
    vault: VaultSettings = VaultSettings()
    issuer: IssuerSettings = IssuerSettings()
    tokens: TokenSettings = TokenSettings()
    auth: AuthSettings = AuthSettings()
    org: OrgSettings = OrgSettings()
    server: ServerSettings = ServerSettings()
    metrics: MetricsSettings = MetricsSettings()
    gateway: GatewaySettings = GatewaySettings()
    sweeper: SweeperSettings = SweeperSettings()
    rotation: RotationSettings = RotationSettings()
    revocation: RevocationSettings = RevocationSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    monitoring: MonitoringSettings = MonitoringSettings()
    alerts: AlertSettings = AlertSettings()
    approvals: ApprovalSettings = ApprovalSettings()
    batches: BatchSettings = BatchSettings()
    limits: LimitsSettings = LimitsSettings()
    redis: RedisSettings = RedisSettings()
    audit: AuditSettings = AuditSettings()
    usage: UsageSettings = UsageSettings()
    console: ConsoleSettings = ConsoleSettings()
    federation: FederationSettings = FederationSettings()
    tools: dict[str, ToolSettings] = {}
    providers: dict[str, ProviderSettings] = {}
    models: dict[str, ModelSettings] = {}
    bootstrap_admin_secret: SecretStr | None = None


# Sections whose keys an environment variable may override. ``providers`` and ``models`` are
# tables of tables, whose names may hold underscores, so they are configured in TOML only.
_ENV_SECTIONS = ("database", "vault", "issuer", "tokens", "auth", "org", "server", "metrics",
                 "gateway", "sweeper", "rotation", "revocation", "scheduler", "monitoring",
                 "alerts", "approvals", "batches", "limits", "redis", "audit", "usage",
                 "console", "federation")
# Tables of named tables: BROKER_PROVIDERS_<NAME>_<KEY>, where <NAME> is a configured name
# written in upper case with "-" as "_" (e.g. BROKER_PROVIDERS_OPENAI_COMPATIBLE_BASE_URL).
_ENV_TABLES: dict[str, type[BaseModel]] = {"providers": ProviderSettings, "models": ModelSettings,
                                           "tools": ToolSettings}


def _env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for name, value in env.items():
        if not name.startswith("BROKER_"):
            continue
        rest = name[len("BROKER_") :].lower()
        for section in _ENV_SECTIONS:
            if rest.startswith(section + "_"):
                out.setdefault(section, {})[rest[len(section) + 1 :]] = value
                break
    return out


def _apply_table_env(data: dict[str, Any], env: Mapping[str, str], source: str) -> None:
    for table, model in _ENV_TABLES.items():
        prefix = f"BROKER_{table.upper()}_"
        configured = data.get(table) or {}
        if not isinstance(configured, dict):
            continue
        by_env_name = {str(n).upper().replace("-", "_"): str(n) for n in configured}
        for var, raw in env.items():
            if not var.startswith(prefix):
                continue
            rest = var[len(prefix):]
            # Longest name first: GPT_4O_MINI_... must not be read as key MINI_... of GPT_4O.
            for env_name, name in sorted(by_env_name.items(), key=lambda kv: -len(kv[0])):
                if rest.startswith(env_name + "_"):
                    key = rest[len(env_name) + 1 :].lower()
                    entry = configured[name]
                    if isinstance(entry, dict):
                        entry[key] = _coerce(model, key, raw)
                    break
            else:
                raise ConfigError(
                    f"invalid configuration ({source}): {var}: names no configured {table} entry"
                )


def _coerce(section_model: type[BaseModel], key: str, raw: str) -> Any:
    """Environment values are strings; turn them into the field's type before validation.
    Lists and tables (``org.budgets``, ``auth.vault_tokens``) are written as JSON; a list of
    strings may also be written comma-separated."""
    field = section_model.model_fields.get(key)
    if field is None:
        return raw  # validation reports the unknown key by name
    annotation = str(field.annotation)
    nested = isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    if nested or annotation.startswith(("tuple", "list", "dict")):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            if annotation.startswith(("tuple[str", "list[str")):
                # A plain list of words: "10.0.0.0/8, 192.168.0.0/16".
                return [part.strip() for part in raw.split(",") if part.strip()]
            return raw
    if "int" in annotation and "str" not in annotation:
        try:
            return int(raw)
        except ValueError:
            return raw
    if "float" in annotation:
        try:
            return float(raw)
        except ValueError:
            return raw
    return raw


def _format_error(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{key}: {msg}")
    return f"invalid configuration ({source}): " + "; ".join(parts)


def load_settings(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read TOML at ``path`` (the default path if it exists), then the environment, then
    ``overrides`` (a nested dict, used by the CLI and tests)."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    source = "defaults"
    chosen = path if path is not None else (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None)
    if chosen is not None:
        source = str(chosen)
        try:
            data = tomllib.loads(chosen.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file not found: {chosen}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {chosen} is not valid TOML: {exc}") from exc
    _apply_table_env(data, env, source)
    for section, values in _env_overrides(env).items():
        model = Settings.model_fields[section].annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"invalid configuration ({source}): {section}: must be a table")
        for key, raw in values.items():
            target[key] = _coerce(model, key, raw)
    if "BROKER_BOOTSTRAP_ADMIN_SECRET" in env:
        data["bootstrap_admin_secret"] = env["BROKER_BOOTSTRAP_ADMIN_SECRET"]
    for section, values in (overrides or {}).items():
        if isinstance(values, Mapping) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **values}
        else:
            data[section] = values
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None
    _check_consistency(settings)
    return settings


def _check_consistency(settings: Settings) -> None:
    """Cross-field rules: every model has a known provider; a price is never missing."""
    for name, model in settings.models.items():
        if model.provider not in settings.providers:
            raise ConfigError(
                f"invalid configuration: models.{name}.provider: unknown provider "
                f"{model.provider!r}"
            )
    longest = settings.gateway.max_stream_s + settings.gateway.drain_s
    if longest >= settings.sweeper.max_request_s:
        # A hold older than max_request_s is settled as orphaned: no running call may be older.
        raise ConfigError(
            "invalid configuration: gateway.max_stream_s: with gateway.drain_s it must stay "
            f"below sweeper.max_request_s ({settings.sweeper.max_request_s})"
        )
    for name, provider in settings.providers.items():
        if provider.timeout_s >= settings.sweeper.max_request_s:
            raise ConfigError(
                f"invalid configuration: providers.{name}.timeout_s: must stay below "
                f"sweeper.max_request_s ({settings.sweeper.max_request_s})"
            )
    velocity = settings.monitoring.velocity
    if velocity.k > velocity.n:
        raise ConfigError("invalid configuration: monitoring.velocity.k: exceeds monitoring.velocity.n")
    if settings.tokens.default_ttl_s > settings.tokens.max_ttl_s:
        raise ConfigError("invalid configuration: tokens.default_ttl_s: exceeds tokens.max_ttl_s")
    check_credentials(settings.providers)
    if not settings.vault.token.get_secret_value() and not settings.vault.addr:
        raise ConfigError("invalid configuration: vault.addr: required")
