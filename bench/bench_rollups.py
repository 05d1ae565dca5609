"""What the usage rollups and the raw-event retention save: a year of simulated usage in a fresh
SQLite database, its size and row counts with raw events only, after the rollups, and after
the retention deleted the rolled-up events older than ``--retention-days`` (then ``VACUUM``);
with the time each step took and the time of a few reports.

    python -m bench.bench_rollups [--events N] [--workloads 20] [--models 3] [--days 365]

The events are spread evenly over the hours of ``--days`` days ending now (hourly traffic of
every workload and model, each event at a random second of its hour), with ids, request ids,
token ids and client addresses shaped like the broker's. Inserted straight into
``usage_event`` as the ledger writes them (not rolled up), then rolled up by the job's own
code (:func:`broker.money.rollups.rollup_pending`) and pruned by it
(:func:`broker.money.rollups.prune_expired`). The default is small enough for CI; a realistic
run is ``--events 1000000``.
"""

from __future__ import annotations

import argparse
import functools
import random
import secrets
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, text

from broker.identity.identities import Actor
from broker.money import rollups, usage
from broker.storage.db import Database, make_engine, migrate

T = TypeVar("T")

HOUR = 3600
DAY = 86_400
MODELS = ("gpt-4o-mini", "claude-3-5-haiku", "gpt-4.1", "o3", "claude-sonnet-4")
INSERT = (
    "INSERT INTO usage_event (id, request_id, ts, tenant_id, workload_id, jti, model, provider, "
    "prompt_tokens, completion_tokens, cost_micros, status, latency_ms, stream, estimated, "
    "client_ip, tool_calls) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
ORG = Actor(id="bench", tenant_id="tn_bench", roles=frozenset({"org-admin"}))


def _events(count: int, workloads: int, models: int, days: int, now: int,
            seed: int) -> Iterator[tuple[Any, ...]]:
    """``count`` events over the hours of ``days`` days before ``now``, oldest first."""
    rng = random.Random(seed)
    tenants = [f"tn_{secrets.token_hex(8)}" for _ in range(max(1, workloads // 4))]
    owners = [(tenants[i % len(tenants)], f"wl_{secrets.token_hex(8)}") for i in range(workloads)]
    start = (now - days * DAY) // HOUR * HOUR
    hours = days * 24
    for i in range(count):
        hour = start + (i * hours // count) * HOUR
        tenant_id, workload_id = owners[rng.randrange(workloads)]
        model = MODELS[rng.randrange(models)]
        prompt, completion = rng.randrange(20, 4000), rng.randrange(0, 1500)
        yield (
            "h_" + secrets.token_hex(12), "req_" + secrets.token_hex(12),
            hour + rng.randrange(HOUR), tenant_id, workload_id,
            secrets.token_urlsafe(16), model, "openai" if model.startswith(("gpt", "o")) else "anthropic",
            prompt, completion, (prompt * 150 + completion * 600) // 1000 + 1, "ok",
            rng.randrange(150, 4000), rng.random() < 0.3, False,
            f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}", None,
        )


def _insert(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    conn.exec_driver_sql(INSERT, rows)


def _sqlite(path: Path, *statements: str) -> list[int]:
    """Run ``statements`` outside any transaction (as PRAGMA checkpoints and VACUUM need);
    the first column of each one's first row."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        return [int((conn.execute(sql).fetchone() or (0,))[0]) for sql in statements]
    finally:
        conn.close()


def _size(path: Path) -> tuple[int, int]:
    """(bytes of the file after a WAL checkpoint, bytes in use: pages minus free pages)."""
    _, page, pages, free = _sqlite(path, "PRAGMA wal_checkpoint(TRUNCATE)", "PRAGMA page_size",
                                   "PRAGMA page_count", "PRAGMA freelist_count")
    return path.stat().st_size, (pages - free) * page


def _counts(db: Database) -> dict[str, int]:
    with db.engine.connect() as conn:
        def count(sql: str) -> int:
            return int(conn.execute(text(sql)).scalar_one())

        return {
            "usage_event": count("SELECT count(*) FROM usage_event"),
            "usage_rollup (hour)": count("SELECT count(*) FROM usage_rollup WHERE period = 'hour'"),
            "usage_rollup (day)": count("SELECT count(*) FROM usage_rollup WHERE period = 'day'"),
        }


def _timed(call: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    result = call()
    return result, time.perf_counter() - started


def _mb(n: int) -> str:
    return f"{n / 1_048_576:,.1f} MB"


def _report(label: str, db: Database, path: Path) -> None:
    on_disk, used = _size(path)
    counts = ", ".join(f"{k} {v:,}" for k, v in _counts(db).items())
    print(f"{label:<34} file {_mb(on_disk):>10}  in use {_mb(used):>10}  ({counts})")


def _queries(db: Database, now: int) -> None:
    year = (now - 365 * DAY, now)
    month = (now - 30 * DAY, now)
    reads: list[tuple[str, Callable[[Connection], object]]] = [
        ("totals by workload, all time", lambda c: usage.totals(c, ORG, "workload", None, None)),
        ("totals by model, a year (ragged)", lambda c: usage.totals(c, ORG, "model", *year)),
        ("daily series by model, a year", lambda c: usage.series(c, ORG, "model", "day", *year)),
        ("hourly series by tenant, 30 days", lambda c: usage.series(c, ORG, "tenant", "hour",
                                                                    *month)),
    ]
    for label, read in reads:
        started = time.perf_counter()
        rows = db.read_transaction(read)
        took = time.perf_counter() - started
        n = len(rows) if isinstance(rows, list) else 0
        print(f"  {label:<34} {took * 1000:8.1f} ms  ({n:,} rows)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=50_000, help="events in the year")
    parser.add_argument("--workloads", type=int, default=20)
    parser.add_argument("--models", type=int, default=3, choices=range(1, len(MODELS) + 1))
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--retention-days", type=int, default=90)
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the database is made (a temporary directory by default)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-rollups-", dir=args.dir) as tmp:
        path = Path(tmp) / "usage.db"
        engine = make_engine(f"sqlite:///{path}")
        migrate(engine)
        db = Database(engine)
        now = int(time.time())
        print(f"{args.events:,} events over {args.days} days: {args.workloads} workloads x "
              f"{args.models} models, retention {args.retention_days} days")

        def insert() -> None:
            batch: list[tuple[Any, ...]] = []
            for event in _events(args.events, args.workloads, args.models, args.days, now, 1):
                batch.append(event)
                if len(batch) == 20_000:
                    db.transaction(functools.partial(_insert, rows=batch))
                    batch = []
            if batch:
                db.transaction(functools.partial(_insert, rows=batch))

        _, took = _timed(insert)
        print(f"inserted in {took:.1f} s")
        _report("raw events only", db, path)

        folded, took = _timed(lambda: rollups.rollup_pending(db, max_batches=1_000_000))
        print(f"rolled up {folded:,} events in {took:.1f} s ({folded / max(took, 1e-9):,.0f}/s)")
        _report("raw events + rollups", db, path)
        _queries(db, now)

        deleted, took = _timed(lambda: rollups.prune_expired(
            db, args.retention_days, now=now, max_batches=1_000_000))
        print(f"pruned {deleted:,} raw events in {took:.1f} s")
        _report("after retention (before VACUUM)", db, path)
        engine.dispose()  # VACUUM needs the only connection
        _sqlite(path, "VACUUM")
        _report("after retention + VACUUM", db, path)
        _queries(db, now)
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
