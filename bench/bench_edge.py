"""Edge benchmark: what the head deadline and connection cap (broker/api/server.py) cost per request.

    python -m bench.bench_edge [--duration 8] [--warmup 2] [--concurrency 1,16] [--write]

One run on this machine: the bare Starlette app (``bench.servers.bare_app``) in three processes,
one uvicorn worker each, measured back to back at each concurrency by ``wrk`` (keep-alive, so
every request re-arms and cancels the head timer):

* ``uvicorn as bench.servers``: ``uvicorn.run`` as ``broker serve`` called it before the edge;
* ``uvicorn, no edge``: the broker's config (``proxy_headers`` off) with uvicorn's own protocol;
* ``uvicorn + edge``: ``broker.api.server.serve``, default ``server.*`` limits.

The second and third differ only in the HTTP protocol class: their ratio is the edge's cost. The
figures go to stdout; ``--write`` also puts them in ``bench/RESULTS.md`` (section ``bench_edge``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx

from bench import harness
from bench.harness import Measurement, ServerProcess, Target
from broker.devvault import free_port

SECTION = "bench_edge"
BEFORE = "uvicorn as bench.servers GET /bare"
PLAIN = "uvicorn, no edge GET /bare"
EDGE = "uvicorn + edge GET /bare"


def serve(kind: str, port: int) -> None:
    """The server side, in its own process (``--serve``)."""
    import uvicorn

    from bench.servers import bare_app
    from broker.api.server import serve as serve_edge
    from broker.settings import Settings

    if kind == "edge":
        serve_edge(bare_app(), Settings(), host="127.0.0.1", port=port, log_level="info")
        return
    # What broker.api.server.uvicorn_config passes, but uvicorn's own protocol (httptools, as "auto").
    uvicorn.run(bare_app(), host="127.0.0.1", port=port, log_level="info", access_log=False,
                server_header=False, proxy_headers=False)


def server(kind: str, work: Path) -> ServerProcess:
    port = free_port()
    argv = [harness.PYTHON, "-m", "bench.bench_edge", "--serve", kind, "--port", str(port)]
    return ServerProcess(f"bare-{kind}", argv, port, ready_path="/bare", log_dir=work)


def report(results: list[Measurement], concurrencies: list[int], args: argparse.Namespace) -> str:
    by = {(m.target, m.concurrency): m for m in results}
    rows = []
    for c in concurrencies:
        edge, plain, before = by[(EDGE, c)], by[(PLAIN, c)], by[(BEFORE, c)]
        rows.append((
            str(c), f"{edge.rps / plain.rps:.3f}", f"{edge.per_cpu_s / plain.per_cpu_s:.3f}",
            f"{edge.p50_ms - plain.p50_ms:+.3f}", f"{edge.p99_ms - plain.p99_ms:+.3f}",
            f"{edge.rps / before.rps:.3f}",
        ))
    ratios = harness.table(rows, [
        "conc.", "edge / no edge (req/s)", "edge / no edge (per CPU-s)", "p50 added ms",
        "p99 added ms", "edge / as bench.servers (req/s)",
    ])
    return f"""
## Edge: head deadline and connection cap vs plain uvicorn

Run {harness.now_utc()}: {harness.machine_description()}.

Method: the bare Starlette app (one JSON route) in three processes, one uvicorn worker each:
`uvicorn.run` as `bench.servers` (and `broker serve` before the edge) calls it; the same with
`proxy_headers=False`, as `broker.api.server.uvicorn_config` sets it, but uvicorn's own HTTP protocol;
`broker.api.server.serve` with the default `server.*` limits (head timeout 10 s, 4096 connections).
`wrk` (1 thread, closed loop, keep-alive, one connection per unit of concurrency) runs each for
{args.warmup:g} s of discarded warm-up, then {args.duration:g} s measured; at each concurrency
the three run back to back. {harness.CPU_COLUMNS_NOTE}

{harness.results_table(results, concurrencies, ceiling=PLAIN)}

The edge's cost (second vs third server, same run), and the whole change to `broker serve`'s
server (first vs third):

{ratios}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_edge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per target")
    parser.add_argument("--warmup", type=float, default=2.0, help="discarded seconds before each")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--quiet-wait", type=float, default=2.0,
                        help="before each target, wait up to this long for other processes to go quiet")
    parser.add_argument("--write", action="store_true", help="also update bench/RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (server logs)")
    parser.add_argument("--serve", choices=["plain", "edge"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port)
        return 0
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if not harness.wrk_available():
        print("wrk is required: apt-get install -y wrk", file=sys.stderr)
        return 2
    with harness.workspace("bench-edge-", keep=args.keep) as work:
        servers = [harness.bare_server(work), server("plain", work), server("edge", work)]
        try:
            for s in servers:
                s.start()
            tgts = [Target(name, s.url + "/bare", pids=(s.pid,))
                    for name, s in zip((BEFORE, PLAIN, EDGE), servers, strict=True)]
            for t in tgts:
                resp = httpx.get(t.url, timeout=30)
                if resp.status_code != 200 or resp.json() != {"status": "ok"}:
                    raise RuntimeError(f"{t.name}: {resp.status_code} {resp.text[:300]}")
            results: list[Measurement] = []
            for c in concurrencies:
                print(f"concurrency {c}:", flush=True)
                for t in tgts:
                    results.append(harness.measure(
                        t, c, warmup_s=args.warmup, duration_s=args.duration, workdir=work,
                        quiet_wait_s=args.quiet_wait,
                    ))
        finally:
            for s in servers:
                s.stop()
    text = report(results, concurrencies, args)
    return harness.publish(SECTION, text, write=args.write)


if __name__ == "__main__":
    sys.exit(main())
