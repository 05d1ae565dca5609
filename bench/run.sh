#!/bin/sh
# Runs every benchmark: foundation and gateway (each rewrites its section of bench/RESULTS.md), then
# revocation (needs PostgreSQL; writes bench/RESULTS-revocation.md) and monitoring (writes
# bench/RESULTS-monitoring.md). `--only tokens,gateway` picks some.
# Needs wrk (apt-get install -y wrk) and, for the profiles, py-spy (pip install py-spy).
# Extra arguments go to each benchmark, e.g.: bench/run.sh --duration 4 --no-write
set -eu
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! command -v wrk >/dev/null 2>&1; then
    echo "bench: wrk is required (apt-get install -y wrk)" >&2
    exit 2
fi
exec "$PYTHON" -m bench "$@"
