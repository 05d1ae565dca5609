"""The broker's long-lived parts, built once from settings and handed to the app and the CLI."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broker.audit.checkpoints import AuditKeys
from broker.credentials.assertions import AssertionKeys
from broker.credentials.federated import ProviderTokens
from broker.errors import ConfigError
from broker.gateway.provider_keys import ProviderKeys
from broker.identity.bindings import Pinning
from broker.identity.credentials import EventWindow, FailureTracker, SlidingWindow
from broker.identity.identities import bootstrap_admin
from broker.metrics import Metrics
from broker.money.ledger import now_s
from broker.money.limits import InMemoryLimiter, Limiter
from broker.plugin import AuthMethod, Federated, IssuerType, Provider
from broker.registry import build_providers, load_auth_methods
from broker.settings import Settings
from broker.storage.bus import EventBus
from broker.storage.db import Database, make_engine, migrate, migration_state
from broker.storage.scheduler import Scheduler
from broker.storage.vault import Vault
from broker.tokens.keys import Keyring, load_pepper
from broker.tokens.tokens import TokenGate, VerifiedCache

if TYPE_CHECKING:
    from broker.gateway.calls import Gateway
    from broker.identity.federation import Federation
    from broker.monitoring.monitor import Monitor

log = logging.getLogger("broker")


ISSUANCE_WINDOW_S = 60


class NotMigrated(Exception):
    """The database schema is behind the code; ``broker migrate`` fixes it."""


# What must stop at shutdown, newest first: a background thread's stop, or an async client's
# close (which must run on the event loop that opened it).
Closer = Callable[[], None] | Callable[[], Awaitable[None]]


@dataclass
class Services:
    """Every long-lived part, typed. The first group is built from settings by :meth:`build`;
    the second is filled in by the app at start (``broker.api.app``) and its extensions."""

    settings: Settings
    db: Database
    vault: Vault
    keyring: Keyring
    pepper: bytes = field(repr=False)
    failures: FailureTracker
    # Tokens issued per client in the last minute (``auth.issuance_rpm``).
    issuance: EventWindow
    # Every configured provider, built through its plugin (a bad table stops the start).
    providers: dict[str, Provider]
    provider_keys: ProviderKeys
    auth_methods: dict[str, AuthMethod] = field(default_factory=dict)
    # What verifies external subject tokens (token exchange), by issuer type.
    issuer_types: dict[str, IssuerType] = field(default_factory=dict)
    federation: Federation | None = None
    metrics: Metrics = field(default_factory=Metrics)
    verified: VerifiedCache = field(default_factory=VerifiedCache)
    # The gateway's rate limits: this process's, or shared with every replica (limits.backend).
    limiter: Limiter = field(default_factory=InMemoryLimiter)
    # The audit key in Vault that signs the chain's checkpoints; read on first use.
    audit_keys: AuditKeys = field(default=None)  # type: ignore[assignment]
    # The keys that sign the broker's assertions toward federated providers, published at
    # /.well-known/assertion-jwks.json (created in Vault on first use, even with no such
    # provider yet: a provider is registered against the JWKS before it is configured here).
    assertion_keys: AssertionKeys = field(default=None)  # type: ignore[assignment]
    # The tokens of the providers with ``credential = "federated"``; None when there are none.
    provider_tokens: ProviderTokens | None = None

    # Revocation state in memory; None until the revocation extension has loaded it, and then
    # every verified token is taken as live.
    token_gate: TokenGate | None = None
    gateway: Gateway | None = None
    # Watches usage and refusals; None while monitoring is off (or not yet started).
    monitor: Monitor | None = None
    # Messages between replicas; started by the revocation extension, which subscribes first.
    bus: EventBus | None = None
    scheduler: Scheduler | None = None
    closers: list[Closer] = field(default_factory=list)
    # Called on the event loop when the server's shutdown begins, with the deadline
    # (``time.monotonic()``) by which what runs long (a stream) must have ended.
    drains: list[Callable[[float], None]] = field(default_factory=list)

    @classmethod
    def build(cls, settings: Settings, *, auto_migrate: bool = False) -> Services:
        """Connect to Vault and the database and load keys; refuse to start on an un-migrated
        database (unless ``auto_migrate``) or when Vault does not answer."""
        methods, issuer_types = load_auth_methods()
        from broker.tokens.exchange import TokenExchange

        # The grant itself is the broker's: what it accepts comes from the issuer types.
        methods[TokenExchange.grant_type] = TokenExchange()
        from broker.identity.federation import Federation

        # A configured issuer without its plugin stops the start, like a provider's.
        federation = Federation(settings, issuer_types)
        # Every configured provider is built through its plugin now, so a bad table stops the
        # start with one line before any port is bound.
        providers = build_providers(settings.providers)
        federated = _federated(settings, providers)
        vault = Vault(settings.vault)
        vault.check()
        engine = make_engine(settings.database.url, settings.database.pool_size)
        db = Database(engine)
        try:
            current, head = migration_state(engine)
        except Exception as exc:
            engine.dispose()
            raise ConfigError(
                f"database.url: the database does not answer ({type(exc).__name__})"
            ) from None
        if current != head:
            if not auto_migrate:
                engine.dispose()
                raise NotMigrated(
                    f"the database is at migration {current or 'none'}, the code needs {head}: "
                    "run `broker migrate` (or start with `broker serve --migrate`)"
                )
            migrate(engine)
        keyring = Keyring(vault, settings.tokens.max_ttl_s)
        keyring.load()
        pepper = load_pepper(vault)
        assertion_keys = AssertionKeys(vault, settings)
        if federated:
            # Read (or created) now, so that a Vault problem stops the start, not a first call.
            assertion_keys.load()
        try:
            limiter, failures, issuance, close_limits = _limits(settings, db)
        except ConfigError:
            engine.dispose()
            raise
        services = cls(
            settings=settings,
            db=db,
            vault=vault,
            keyring=keyring,
            pepper=pepper,
            failures=failures,
            issuance=issuance,
            limiter=limiter,
            providers=providers,
            provider_keys=ProviderKeys(
                vault,
                {name: p.vault_path for name, p in settings.providers.items()},
                max_stale_s=settings.vault.max_stale_s,
            ),
            auth_methods=methods,
            issuer_types=issuer_types,
            federation=federation,
            assertion_keys=assertion_keys,
        )
        services.closers.append(federation.aclose)
        if federated:
            tokens = ProviderTokens(settings, assertion_keys, federated,
                                    metrics=lambda: services.metrics)
            services.provider_tokens = tokens
            services.provider_keys.tokens = tokens
            services.closers.append(tokens.aclose)
        if close_limits is not None:
            services.closers.append(close_limits)
        if settings.bootstrap_admin_secret is not None:
            secret = settings.bootstrap_admin_secret.get_secret_value()
            if db.transaction(lambda conn: bootstrap_admin(conn, secret, pepper, now_s())):
                log.info("bootstrap admin identity created (client_id=admin)")
        return services

    def __post_init__(self) -> None:
        if self.audit_keys is None:
            self.audit_keys = AuditKeys(self.vault, self.settings.audit)
        if self.assertion_keys is None:
            self.assertion_keys = AssertionKeys(self.vault, self.settings)

    @property
    def binding_pinning(self) -> Pinning:
        """The issuers a binding may name, each with the claim sets that pin a workload."""
        pinning = {name: self.issuer_types[issuer.type].pinning
                   for name, issuer in self.settings.auth.issuers.items()
                   if issuer.type in self.issuer_types}
        if self.settings.auth.vault_tokens.enabled and "vault" in self.issuer_types:
            pinning["vault"] = self.issuer_types["vault"].pinning
        return pinning

    def close(self) -> None:
        self.db.dispose()


def _federated(settings: Settings, providers: dict[str, Provider]) -> dict[str, Federated]:
    """The providers with ``credential = "federated"``; a plugin that cannot exchange an
    assertion stops the start, naming the key."""
    found: dict[str, Federated] = {}
    for name, p in settings.providers.items():
        if p.credential != "federated":
            continue
        provider = providers[name]
        if not isinstance(provider, Federated):
            raise ConfigError(f"invalid configuration: providers.{name}.credential: the plugin "
                              f"{p.plugin or name!r} cannot exchange an assertion for a token "
                              "(\"federated\")")
        found[name] = provider
    return found


def _limits(settings: Settings, db: Database
            ) -> tuple[Limiter, FailureTracker, EventWindow, Closer | None]:
    """The limiter, the failed-secret counter and the issuance window of ``limits.backend``,
    and what closes their store. A request runs at most ``sweeper.max_request_s`` (the settings
    check it), so that is how long a dead replica's running request keeps its lease."""
    auth, limits = settings.auth, settings.limits
    lease_s = float(settings.sweeper.max_request_s)
    if limits.backend == "redis":
        from broker.money.limits_redis import RedisLimiter, RedisStore, RedisWindow

        store = RedisStore(settings.redis.url.get_secret_value(), prefix=limits.redis_prefix,
                           timeout_s=limits.timeout_s)
        return (RedisLimiter(store, lease_s=lease_s),
                FailureTracker(RedisWindow(store, "failures", auth.failure_limit,
                                           auth.failure_window_s)),
                RedisWindow(store, "issuance", auth.issuance_rpm, ISSUANCE_WINDOW_S), store.aclose)
    if limits.backend == "database":
        from broker.money.limits_db import DatabaseLimiter, DatabaseWindow

        timeout = limits.timeout_s
        return (DatabaseLimiter(db, lease_s=lease_s, timeout_s=timeout),
                FailureTracker(DatabaseWindow(db, "failures", auth.failure_limit,
                                              auth.failure_window_s, timeout_s=timeout)),
                DatabaseWindow(db, "issuance", auth.issuance_rpm, ISSUANCE_WINDOW_S,
                               timeout_s=timeout), None)
    return (InMemoryLimiter(), FailureTracker.in_memory(auth.failure_limit, auth.failure_window_s),
            SlidingWindow(auth.issuance_rpm, ISSUANCE_WINDOW_S), None)
