"""``python -m bench [--only NAMES] [options]``: every benchmark in turn.

``tokens``, ``exchange`` (token exchange: a Kubernetes JWT, delegation) and ``gateway`` rewrite
their sections of ``bench/RESULTS.md`` and take the options ``--duration``, ``--warmup``,
``--concurrency``, ``--profile``, ``--quiet-wait``, ``--no-write``, ``--keep``; ``gateway`` also
``--compare PATH`` (another checkout measured beside this one).
``holds`` (hold over charge on a request mix, in-process) and ``edge`` (the server edge's cost)
write theirs too. ``revocation`` (needs PostgreSQL, see ``bench/bench_revocation.py``) writes
``bench/RESULTS-revocation.md`` and runs with its own defaults; only ``--no-write``, ``--keep``
and ``--quiet-wait`` are passed on to it, and to ``monitoring`` (``bench/bench_monitoring.py``,
writes ``bench/RESULTS-monitoring.md``). ``audit`` (an audit entry's cost on SQLite and
PostgreSQL) and ``rollups`` (a year of usage before and after rollups and retention) print
their tables, recorded by hand in ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

BENCHMARKS = ("tokens", "exchange", "gateway", "replicas", "holds", "edge", "revocation",
              "monitoring", "audit", "rollups")
_SHARED_WITH_REVOCATION = ("--no-write", "--keep", "--quiet-wait")


def _entry(name: str) -> Callable[[list[str] | None], int]:
    # Imported on demand: a benchmark another session is still writing cannot break the others.
    if name == "tokens":
        from bench import bench_tokens

        return bench_tokens.main
    if name == "exchange":
        from bench import bench_exchange

        return bench_exchange.main
    if name == "gateway":
        from bench import bench_gateway

        return bench_gateway.main
    if name == "replicas":
        from bench import bench_replicas

        return bench_replicas.main
    if name == "holds":
        from bench import bench_holds

        return bench_holds.main
    if name == "edge":
        from bench import bench_edge

        return bench_edge.main
    if name == "monitoring":
        from bench import bench_monitoring

        return bench_monitoring.main
    if name == "audit":
        from bench import bench_audit

        return bench_audit.main
    if name == "rollups":
        from bench import bench_rollups

        return bench_rollups.main
    from bench import bench_revocation

    return bench_revocation.main


def _revocation_args(rest: list[str]) -> list[str]:
    """The options the revocation benchmark shares with the others; the rest are theirs only."""
    out: list[str] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        flag = arg.split("=", 1)[0]
        if flag in _SHARED_WITH_REVOCATION:
            out.append(arg)
            if flag == "--quiet-wait" and "=" not in arg and i + 1 < len(rest):
                out.append(rest[i + 1])
                i += 1
        i += 1
    return out


def _args_for(name: str, rest: list[str]) -> list[str]:
    if name in ("audit", "rollups"):
        return []  # they print a table and take only their own sizes, run alone
    if name in ("revocation", "monitoring"):
        return _revocation_args(rest)
    if name == "edge":
        # The edge benchmark writes only when asked; it takes the timing options.
        timing = [a for a in rest if a.split("=", 1)[0] in ("--duration", "--warmup",
                                                             "--concurrency")]
        return timing + ([] if "--no-write" in rest else ["--write"])
    return rest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    chosen = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    for name in BENCHMARKS:
        if name not in chosen:
            continue
        print(f"=== bench {name} ===", flush=True)
        code = _entry(name)(_args_for(name, rest))
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
