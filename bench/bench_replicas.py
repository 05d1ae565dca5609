"""The production path, measured side by side in one run: the gateway on SQLite, on PostgreSQL
with one replica, and on PostgreSQL with several replicas sharing the database and the load.

    python -m bench.bench_replicas [--replicas 3] [--duration 8]

Every broker is `broker serve` (one uvicorn worker) at the same fake provider, with the same
request as `bench_gateway`. The replicas share one PostgreSQL database (a fresh one on the
machine's server, dropped after) and one Vault prefix (their signing keys), and the load is
spread over them by one `wrk` per replica running at once, their connections adding up to the
same total concurrency as the single broker's. Nothing here is asserted: it prints and records
figures (section ``bench_replicas`` of `bench/RESULTS.md`).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import harness
from bench.bench_gateway import MODEL, provider_toml, request_body
from bench.bench_revocation import fresh_database
from bench.harness import BrokerUnderTest, Measurement, Target
from broker.devvault import DevVault

SECTION = "bench_replicas"
TARGET_PG_RATIO = 0.8
TARGET_P99_MS = 50.0
TARGET_SCALE = 2.0


def _target(label: str, broker: BrokerUnderTest, upstream_pid: int, token: str) -> Target:
    return Target(
        label, broker.url + "/v1/chat/completions", "POST", request_body(False),
        (("content-type", "application/json"), ("authorization", f"Bearer {token}")),
        (broker.pid, upstream_pid))


def _spread(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _together(targets: list[Target], concurrency: int, seconds: float,
              work: Path) -> tuple[float, float, int]:
    """(req/s summed, worst p99 ms, errors) of one wrk per target, all at once."""
    shares = _spread(concurrency, len(targets))
    with ThreadPoolExecutor(len(targets)) as pool:
        runs: list[Measurement] = list(pool.map(
            lambda pair: harness.run_wrk(pair[0], pair[1], seconds, work), zip(targets, shares, strict=True)))
    return (sum(m.rps for m in runs), max(m.p99_ms for m in runs), sum(m.errors for m in runs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    if not harness.wrk_available():
        print("wrk is required: apt-get install -y wrk", file=sys.stderr)
        return 2
    rows: list[tuple[str, ...]] = []
    figures: dict[str, tuple[float, float, float]] = {}  # label -> (rps, p50, p99)
    with harness.workspace("bench-replicas-", keep=args.keep) as work, DevVault() as vault, \
            fresh_database() as pg_url:
        upstream = harness.mock_upstream_server(work).start()
        vault_path = f"bench-{secrets.token_hex(4)}/providers/fake"
        provider_key = "sk-bench-" + secrets.token_urlsafe(24)
        harness.put_provider_key(vault, vault_path, provider_key)
        toml = provider_toml(upstream, vault_path)
        brokers: list[BrokerUnderTest] = []
        try:
            sqlite = BrokerUnderTest(vault, work, extra_toml=toml).start()
            brokers.append(sqlite)
            first = BrokerUnderTest(vault, work, extra_toml=toml, database_url=pg_url).start()
            brokers.append(first)
            replicas = [first]
            for _ in range(args.replicas - 1):
                replicas.append(BrokerUnderTest(
                    vault, work, extra_toml=toml, database_url=pg_url,
                    vault_prefix=first.vault_prefix, admin_secret=first.admin_secret).start())
                brokers.append(replicas[-1])
            policy = harness.bench_policy([MODEL], 10**12)
            agents = {
                "sqlite": (sqlite, sqlite.create_workload(sqlite.create_tenant(), "agent", policy)),
                "pg": (first, first.create_workload(first.create_tenant(), "agent", policy)),
            }
            for label, broker in (("SQLite, 1 replica", agents["sqlite"]),
                                  ("PostgreSQL, 1 replica", agents["pg"])):
                server, who = broker
                target = _target(label, server, upstream.pid, server.token(who.client_id,
                                                                           who.client_secret))
                c1 = harness.measure(target, 1, warmup_s=args.warmup, duration_s=args.duration,
                                     workdir=work, quiet_wait_s=2.0)
                cn = harness.measure(target, args.concurrency, warmup_s=args.warmup,
                                     duration_s=args.duration, workdir=work, quiet_wait_s=2.0)
                figures[label] = (cn.rps, c1.p50_ms, cn.p99_ms)
                rows.append((label, f"{cn.rps:,.0f}", f"{cn.p99_ms:.1f}", f"{c1.p50_ms:.2f}",
                             str(cn.errors + c1.errors)))
            # Every replica's own token (each verifies all: the signing keys are shared).
            server, who = agents["pg"]
            spread = [_target(f"replica {i}", r, upstream.pid, r.token(who.client_id,
                                                                       who.client_secret))
                      for i, r in enumerate(replicas)]
            _together(spread, args.concurrency, args.warmup, work)
            rps, p99, errors = _together(spread, args.concurrency, args.duration, work)
            label = f"PostgreSQL, {args.replicas} replicas"
            figures[label] = (rps, 0.0, p99)
            rows.append((label, f"{rps:,.0f}", f"{p99:.1f}", "-", str(errors)))
            print(f"  c={args.concurrency:<3} {label:<36} {rps:8.0f} req/s  p99 {p99:7.2f} ms  "
                  f"err {errors}", flush=True)
        finally:
            for b in brokers:
                b.stop()
            upstream.stop()
    sq, pg1 = figures["SQLite, 1 replica"], figures["PostgreSQL, 1 replica"]
    pgn = figures[f"PostgreSQL, {args.replicas} replicas"]
    verdicts = [
        _verdict(f"PostgreSQL, 1 replica, against SQLite (target >= {TARGET_PG_RATIO:.0%})",
                 pg1[0] / sq[0] >= TARGET_PG_RATIO, f"{pg1[0] / sq[0]:.0%}"),
        _verdict(f"PostgreSQL p99 at concurrency {args.concurrency} (target < {TARGET_P99_MS:g} ms)",
                 pg1[2] < TARGET_P99_MS, f"{pg1[2]:.1f} ms"),
        _verdict(f"{args.replicas} replicas against 1 (target >= {TARGET_SCALE:g} times)",
                 pgn[0] / pg1[0] >= TARGET_SCALE, f"{pgn[0] / pg1[0]:.2f} times"),
    ]
    text = f"""
## Replicas: the gateway on SQLite, on PostgreSQL, and on {args.replicas} PostgreSQL replicas

Run {harness.now_utc()}: {harness.machine_description()}.

Method: `broker serve` processes (one uvicorn worker each) at one fake provider, the request of
the gateway benchmark (non-stream). SQLite: a WAL file in a temp dir. PostgreSQL: a fresh
database on the machine's server (127.0.0.1:5432), shared by the replicas with one Vault prefix.
The replicas' load is one `wrk` per replica at once, {args.concurrency} connections in all.
{args.duration:g} s measured per row after {args.warmup:g} s of warm-up.

{harness.table(rows, ["target", f"req/s at c={args.concurrency}", f"p99 ms at c={args.concurrency}",
                      "p50 ms at c=1", "errors"])}
{chr(10).join(verdicts)}

All of this runs on the same {os.cpu_count()} cores: the replicas share them with each
other, with the fake provider, `wrk` and PostgreSQL, so the scaling row measures what the
database lets several replicas do together, not what more machines would add.
"""
    return harness.publish(SECTION, text, write=not args.no_write)


def _verdict(what: str, ok: bool, figure: str) -> str:
    return f"- {what}: **{'MET' if ok else 'NOT MET'}**, {figure}."


if __name__ == "__main__":
    sys.exit(main())
