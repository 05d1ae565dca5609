"""Foundation benchmark: a bare Starlette endpoint, token issuance and introspection, side by side.

    python -m bench.bench_tokens [--duration 8] [--warmup 2] [--concurrency 1,16,64] [--profile]

One run on this machine: an OpenBao dev server, the broker (``broker serve``, one uvicorn worker,
SQLite in WAL mode in a temp dir) and a bare Starlette app (same uvicorn settings), each in its own
process; ``wrk`` drives them from another. At each concurrency the targets are measured back to back
so that the ratios compare like with like. The figures go to stdout and to ``bench/RESULTS.md``.
Target from the foundation issue: issuance throughput at concurrency 16 >= 1/2 of the bare endpoint's.
"""

from __future__ import annotations

import argparse
import base64
import sys
from urllib.parse import urlencode

import httpx

from bench import harness
from bench.harness import BrokerUnderTest, Measurement, ServerProcess, Target
from broker.devvault import DevVault

SECTION = "bench_tokens"
TARGET_RATIO = 0.5


def targets(broker: BrokerUnderTest, bare: ServerProcess) -> list[Target]:
    tenant = broker.create_tenant()
    # The agent reserves a real slice (1 micro-dollar, far under its budgets) from the workload,
    # tenant and organisation budgets on every issuance, as in production.
    agent = broker.create_workload(tenant, "agent", harness.bench_policy(["mock-gpt"], 1))
    # A resource server introspects the agent's token with its own client credentials.
    service = broker.create_workload(tenant, "service", harness.bench_policy([], 0))
    token = broker.token(agent.client_id, agent.client_secret)
    form = "application/x-www-form-urlencoded"
    basic = base64.b64encode(f"{service.client_id}:{service.client_secret}".encode()).decode()
    return [
        Target("bare Starlette GET /bare", bare.url + "/bare", pids=(bare.pid,)),
        Target("broker GET /healthz", broker.url + "/healthz", pids=(broker.pid,)),
        Target(
            "issuance POST /v1/token",
            broker.url + "/v1/token",
            "POST",
            urlencode({"grant_type": "client_credentials", "client_id": agent.client_id,
                       "client_secret": agent.client_secret}),
            (("content-type", form),),
            (broker.pid,),
        ),
        Target(
            "introspection POST /v1/introspect",
            broker.url + "/v1/introspect",
            "POST",
            urlencode({"token": token}),
            (("content-type", form), ("authorization", f"Basic {basic}")),
            (broker.pid,),
        ),
    ]


def check(target: Target, expect: str) -> None:
    """One request by hand before the load: the target must answer 200 with the expected body."""
    headers = dict(target.headers)
    resp = httpx.request(target.method, target.url, content=target.body or None, headers=headers, timeout=30)
    if resp.status_code != 200 or expect not in resp.text:
        raise RuntimeError(f"{target.name}: {resp.status_code} {resp.text[:300]}")


ISSUANCE = "issuance POST /v1/token"
INTROSPECTION = "introspection POST /v1/introspect"


def report(
    results: list[Measurement], concurrencies: list[int], args: argparse.Namespace
) -> tuple[str, bool]:
    by = {(m.target, m.concurrency): m for m in results}
    bare_name = results[0].target
    main_table = harness.results_table(results, concurrencies, ceiling=bare_name)
    ratio_rows = []
    for c in concurrencies:
        bare = by[(bare_name, c)]
        iss, intro = by[(ISSUANCE, c)], by[(INTROSPECTION, c)]
        ratio_rows.append((
            str(c), f"{iss.rps / bare.rps:.3f}", f"{intro.rps / bare.rps:.3f}",
            f"{iss.per_cpu_s / bare.per_cpu_s:.3f}", f"{intro.per_cpu_s / bare.per_cpu_s:.3f}",
        ))
    ratios = harness.table(ratio_rows, [
        "conc.", "issuance / bare (req/s)", "introspection / bare (req/s)",
        "issuance / bare (per CPU-s)", "introspection / bare (per CPU-s)",
    ])
    c16 = 16 if 16 in concurrencies else concurrencies[len(concurrencies) // 2]
    got = by[(ISSUANCE, c16)].rps / by[(bare_name, c16)].rps
    met = got >= TARGET_RATIO
    verdict = (
        f"**Target** (issuance throughput at concurrency {c16} >= {TARGET_RATIO:.0%} of the bare "
        f"endpoint's): **{'MET' if met else 'NOT MET'}**, measured {got:.1%}."
    )
    text = f"""
## Foundation: token issuance and introspection vs a bare Starlette endpoint

Run {harness.now_utc()}: {harness.machine_description()}.

Method: every server in its own process: an OpenBao dev server; `broker serve` (1 uvicorn worker,
SQLite WAL in a temp dir, seeded through the admin API); a bare Starlette app with one JSON route
under the same uvicorn settings (1 worker). `wrk` (1 thread, closed loop, keep-alive, one
connection per unit of concurrency) runs each target for {args.warmup:g} s of discarded warm-up,
then {args.duration:g} s measured; at each concurrency the targets run back to back. Issuance is
`client_credentials` with the secret in a form body; every issuance reserves a 1-micro-dollar slice
from the workload, tenant and organisation budgets (budgets far too large to run out). Introspection
is of one agent token by a service workload authenticating with HTTP Basic. `/healthz` is the
broker's middleware stack on a trivial route. {harness.CPU_COLUMNS_NOTE}

{main_table}

Throughput relative to the bare endpoint, same run:

{ratios}

{verdict}
"""
    return text, met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_tokens", description=__doc__)
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per target")
    parser.add_argument("--warmup", type=float, default=2.0, help="discarded seconds before each")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                        help="py-spy the broker during issuance at c16 (auto: when the target is missed)")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    parser.add_argument("--quiet-wait", type=float, default=2.0,
                        help="before each target, wait up to this long for other processes to go quiet")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, raw profiles)")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if not harness.wrk_available():
        print("wrk is required: apt-get install -y wrk", file=sys.stderr)
        return 2
    with harness.workspace("bench-tokens-", keep=args.keep) as work, DevVault() as vault:
        bare = harness.bare_server(work).start()
        broker = BrokerUnderTest(vault, work).start()
        try:
            tgts = targets(broker, bare)
            for t, expect in zip(tgts, ['"ok"', '"ok"', '"access_token"', '"active":true'], strict=True):
                check(t, expect)
            results: list[Measurement] = []
            for c in concurrencies:
                print(f"concurrency {c}:", flush=True)
                for t in tgts:
                    results.append(harness.measure(
                        t, c, warmup_s=args.warmup, duration_s=args.duration, workdir=work,
                        quiet_wait_s=args.quiet_wait,
                    ))
            text, met = report(results, concurrencies, args)
            if args.profile == "always" or (args.profile == "auto" and not met):
                text += "\n" + harness.profile_section(
                    "Where issuance time goes", broker.pid, tgts[2], args.duration, work)
        finally:
            broker.stop()
            bare.stop()
    return harness.publish(SECTION, text, write=not args.no_write)


if __name__ == "__main__":
    sys.exit(main())
