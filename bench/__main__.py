"""``python -m bench [options]``: every benchmark in turn, each rewriting its section of
``bench/RESULTS.md``. Options (``--duration``, ``--warmup``, ``--concurrency``, ``--no-write``,
...) are passed to each benchmark."""

from __future__ import annotations

import sys

from bench import bench_gateway, bench_tokens

BENCHMARKS = (bench_tokens.main, bench_gateway.main)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    for bench in BENCHMARKS:
        code = bench(args)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
