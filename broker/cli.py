"""The ``broker`` command: ``serve``, ``migrate``, ``dev``, ``keys``, ``token``.

Configuration problems end the process with one line naming the key and exit status 2; never a
traceback. ``broker token`` ends a refusal with one line and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from broker import admin_cli
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
    from broker.tokens.keys import RotationTooSoon

    try:
        key = rotate_signing_key_from_cli(_settings(args))
    except RotationTooSoon as exc:
        print(f"broker: {exc.detail}", file=sys.stderr)
        return 1
    print(f"signing key rotated: current kid {key.kid}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from broker.client import BrokerClient, BrokerClientError

    # The secret never comes from an argument: other users of the host can read a process's
    # arguments (ps, /proc/<pid>/cmdline).
    secret: str | None = None
    if args.client_id is not None:
        if args.client_secret_stdin:
            secret = sys.stdin.readline().rstrip("\r\n")
        else:
            secret = os.environ.get("BROKER_CLIENT_SECRET")
        if not secret:
            print("broker token: no client secret: set BROKER_CLIENT_SECRET or pass "
                  "--client-secret-stdin", file=sys.stderr)
            return 2
    scope = " ".join(args.scope) if args.scope else None
    try:
        with BrokerClient(args.url, client_id=args.client_id, client_secret=secret,
                          subject_token_file=args.subject_token_file,
                          subject_token_type=args.subject_token_type, scope=scope,
                          budget_micros=args.budget_micros, ttl_s=args.ttl_s) as client:
            token = client.token()
            info = client.token_info
    except (BrokerClientError, ValueError) as exc:
        print(f"broker token: {exc}", file=sys.stderr)
        return 1
    if args.json and info is not None:
        print(json.dumps(info.response, sort_keys=True))
    else:
        print(token)
    return 0


def _add_token_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from broker.client import JWT_TOKEN_TYPE

    token = sub.add_parser(
        # No abbreviations: ``--client-secret`` must not pass for ``--client-secret-stdin``.
        "token", help="print a broker token for scripts", allow_abbrev=False,
        description="Print a broker token. The client secret comes from BROKER_CLIENT_SECRET or, "
                    "with --client-secret-stdin, the first line of standard input; never from "
                    "an argument.")
    token.add_argument("--url", default=os.environ.get("BROKER_URL", "http://127.0.0.1:8080"),
                       help="the broker (default: $BROKER_URL or http://127.0.0.1:8080)")
    login = token.add_mutually_exclusive_group(required=True)
    login.add_argument("--client-id")
    login.add_argument("--subject-token-file", metavar="PATH",
                       help="exchange the token in this file (a workload JWT)")
    token.add_argument("--subject-token-type", default=JWT_TOKEN_TYPE, metavar="TYPE")
    token.add_argument("--client-secret-stdin", action="store_true",
                       help="read the client secret from the first line of standard input")
    token.add_argument("--scope", action="append", metavar="MODELS",
                       help="models (names or globs, space-separated; may be repeated)")
    token.add_argument("--budget-micros", type=int, metavar="N")
    token.add_argument("--ttl-s", type=int, metavar="N")
    token.add_argument("--json", action="store_true", help="print the whole token response")
    token.set_defaults(func=cmd_token)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from broker.audit.verify import verify_command

    return verify_command(_settings(args), checkpoints_file=args.checkpoints)


def _add_audit_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="the audit chain")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser(
        "verify", help="walk the audit chain and its signed checkpoints; exit 1 naming the first "
        "entry edited, deleted, inserted or reordered")
    verify.add_argument("--config")
    verify.add_argument(
        "--checkpoints", metavar="FILE",
        help="also check the checkpoints written to this file (audit.checkpoint_file, default: "
        "that file when it is configured)")
    verify.set_defaults(func=cmd_audit_verify)


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
    _add_token_parser(sub)
    _add_audit_parser(sub)
    admin_cli.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "admin":
        # An operator's tool that speaks to the admin API: none of the server either.
        return admin_cli.run(args)
    if args.command == "token":
        if args.client_secret_stdin and args.client_id is None:
            parser.error("--client-secret-stdin goes with --client-id")
        # A workload's tool: it needs none of the server (no logging setup, no database code).
        return cmd_token(args)
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
