"""The ``broker`` command: ``serve``, ``migrate``, ``dev``.

Configuration problems end the process with one line naming the key and exit status 2; never a
traceback.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from broker.errors import ConfigError, VaultUnavailable
from broker.settings import Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, dict[str, object]] = {}
    if getattr(args, "host", None):
        overrides.setdefault("server", {})["host"] = args.host
    if getattr(args, "port", None) is not None:
        overrides.setdefault("server", {})["port"] = args.port
    return load_settings(Path(args.config) if args.config else None, overrides=overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from broker.api.app import create_app
    from broker.api.server import serve
    from broker.services import Services

    settings = _settings(args)
    # Build (and so check Vault and the schema) before binding the port, to fail with a message.
    services = Services.build(settings, auto_migrate=args.migrate)
    app = create_app(settings, services=services)
    try:
        serve(app, settings, log_level="info")
    finally:
        services.close()
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import InterfaceError, OperationalError

    from broker.storage.db import make_engine, migrate, migration_state

    settings = _settings(args)
    engine = make_engine(settings.database.url)
    try:
        migrate(engine)
        current, _head = migration_state(engine)
    except (OperationalError, InterfaceError) as exc:
        raise ConfigError(
            f"database.url: the database does not answer ({type(exc).__name__})"
        ) from None
    finally:
        engine.dispose()
    print(f"database migrated to {current}")
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from broker.dev import run_dev

    return run_dev(Path(args.config) if args.config else None, args.port)


def cmd_keys(args: argparse.Namespace) -> int:
    from broker.revocation.rotation import rotate_signing_key_from_cli

    key = rotate_signing_key_from_cli(_settings(args))
    print(f"signing key rotated: current kid {key.kid}")
    return 0


def _unwind_on_sigterm(signum: int, frame: object) -> None:
    # uvicorn stops gracefully on SIGTERM, then re-raises it; unwinding instead of dying lets
    # ``finally`` blocks close the database and stop a dev OpenBao child. A shutdown that was
    # asked for and completed is a success.
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="broker", description="Secrets broker for AI workloads")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the broker")
    serve.add_argument("--config")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--migrate", action="store_true", help="apply migrations before serving")
    serve.set_defaults(func=cmd_serve)
    mig = sub.add_parser("migrate", help="apply database migrations")
    mig.add_argument("--config")
    mig.set_defaults(func=cmd_migrate)
    dev = sub.add_parser("dev", help="run with embedded OpenBao, SQLite and a mock provider")
    dev.add_argument("--config")
    dev.add_argument("--port", type=int, default=8080)
    dev.set_defaults(func=cmd_dev)
    keys = sub.add_parser("keys", help="signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    rotate = keys_sub.add_parser("rotate", help="rotate the signing key now")
    rotate.add_argument("--config")
    rotate.set_defaults(func=cmd_keys)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _unwind_on_sigterm)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # Alembic narrates every plugin and step at INFO; our commands say what they did themselves.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # httpx logs every upstream request at INFO: one line per model call is our metrics' job.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # pypdf narrates what it repairs in a client's PDF, quoting its bytes: not for our logs.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    from broker.services import NotMigrated

    try:
        code: int = args.func(args)
        return code
    except (ConfigError, NotMigrated, VaultUnavailable) as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
