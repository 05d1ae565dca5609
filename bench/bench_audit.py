"""What an audit entry costs now that the audit trail is a hash chain: appends per second and
the time per entry on SQLite and PostgreSQL, each beside the same insert without the chain (the
statement the broker ran before), plus what ``broker audit verify`` reads per second.

    python -m bench.bench_audit [--entries N] [--threads T]

One transaction per entry, as an admin action or an exchange writes it; with ``--threads`` the
appends come from several connections at once, which on PostgreSQL queue on the chain's head row.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Connection

from bench.bench_revocation import fresh_database
from broker.audit.verify import verify_stored
from broker.storage import audit
from broker.storage.db import Database, Sql, make_engine, migrate

_PLAIN = Sql("""
    INSERT INTO audit_event (seq, ts, actor, action, target, tenant_id, detail, prev_hash, hash)
    VALUES (:seq, :ts, 'admin', 'tenant.update', 't_1', 't_1', :detail, '', '')""")
_DETAIL = {"budgets": [{"period": "day", "limit_micros": 5_000_000}], "reason": "bench"}


def _chained(conn: Connection, i: int) -> None:
    audit.record(conn, "admin", "tenant.update", "t_1", _DETAIL, 1_700_000_000 + i, tenant_id="t_1")


def _plain(conn: Connection, i: int) -> None:
    # Negative seq: outside the chain, so the unique index still holds.
    _PLAIN.run(conn, seq=-(i + 1) - threading.get_ident() % 1_000_000 * 1_000_000,
               ts=1_700_000_000 + i, detail=json.dumps(_DETAIL))


def _call(write: Callable[[Connection, int], None], i: int, conn: Connection) -> None:
    write(conn, i)


def _rate(db: Database, write: Callable[[Connection, int], None], n: int, threads: int) -> float:
    """Entries per second, ``n`` split over ``threads`` connections."""
    per = n // threads

    def work(offset: int) -> None:
        for i in range(per):
            db.transaction(functools.partial(_call, write, offset + i))

    workers = [threading.Thread(target=work, args=(t * per,)) for t in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return per * threads / (time.perf_counter() - start)


def measure(url: str, n: int, threads: int) -> dict[str, float]:
    engine = make_engine(url, max(4, threads))
    migrate(engine)
    db = Database(engine)
    try:
        plain = _rate(db, _plain, n, threads)
        chained = _rate(db, _chained, n, threads)
        start = time.perf_counter()
        report = db.read_transaction(lambda conn: verify_stored(conn, {}))
        verify_rate = report.entries / (time.perf_counter() - start)
        assert report.ok, report.problem
    finally:
        db.dispose()
    return {"plain": plain, "chained": chained, "verify": verify_rate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = measure(f"sqlite:///{Path(tmp) / 'audit.db'}", args.entries, 1)
        rows.append(("SQLite, 1 writer", sqlite))
    with fresh_database() as url:
        rows.append(("PostgreSQL, 1 writer", measure(url, args.entries, 1)))
    with fresh_database() as url:
        rows.append((f"PostgreSQL, {args.threads} writers", measure(url, args.entries, args.threads)))
    print(f"audit append, {args.entries} entries, one transaction each")
    print("| database | plain insert /s | chained /s | µs per entry (chained) | chain cost | verify /s |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        cost = 1e6 / r["chained"]
        print(f"| {name} | {r['plain']:,.0f} | {r['chained']:,.0f} | {cost:,.0f} | "
              f"{r['plain'] / r['chained']:.2f} times | {r['verify']:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
