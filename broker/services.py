"""The broker's long-lived parts, built once from settings and handed to the app and the CLI."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from broker.errors import ConfigError
from broker.identity.credentials import FailureTracker, SlidingWindow
from broker.identity.identities import bootstrap_admin
from broker.money.ledger import now_s
from broker.plugin import AuthMethod
from broker.registry import build_providers, load_auth_methods
from broker.settings import Settings
from broker.storage.db import Database, make_engine, migrate, migration_state
from broker.storage.vault import Vault
from broker.tokens.keys import Keyring, load_pepper

log = logging.getLogger("broker")


ISSUANCE_WINDOW_S = 60


class NotMigrated(Exception):
    """The database schema is behind the code; ``broker migrate`` fixes it."""


@dataclass
class Services:
    settings: Settings
    db: Database
    vault: Vault
    keyring: Keyring
    pepper: bytes = field(repr=False)
    failures: FailureTracker
    # Tokens issued per client in the last minute (``auth.issuance_rpm``).
    issuance: SlidingWindow
    auth_methods: dict[str, AuthMethod] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, settings: Settings, *, auto_migrate: bool = False) -> Services:
        """Connect to Vault and the database and load keys; refuse to start on an un-migrated
        database (unless ``auto_migrate``) or when Vault does not answer."""
        methods = load_auth_methods()
        # Check every configured provider against its plugin now, so a bad table stops the start
        # with one line before any port is bound (the gateway builds its own at start-up).
        build_providers(settings.providers)
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
        services = cls(
            settings=settings,
            db=db,
            vault=vault,
            keyring=keyring,
            pepper=pepper,
            failures=FailureTracker(settings.auth.failure_limit, settings.auth.failure_window_s),
            issuance=SlidingWindow(settings.auth.issuance_rpm, ISSUANCE_WINDOW_S),
            auth_methods=methods,
        )
        if settings.bootstrap_admin_secret is not None:
            secret = settings.bootstrap_admin_secret.get_secret_value()
            if db.transaction(lambda conn: bootstrap_admin(conn, secret, pepper, now_s())):
                log.info("bootstrap admin identity created (client_id=admin)")
        return services

    def close(self) -> None:
        self.db.dispose()
