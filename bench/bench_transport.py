"""Provider-hop client A/B: the same gateway call through two checkouts of the broker that differ
only in the HTTP client of the provider hop, measured side by side and interleaved in one run.

    python -m bench.bench_transport --a PATH_A --b PATH_B [--label-a custom] [--label-b stock]
        [--rounds 5] [--duration 6] [--warmup 2] [--concurrency 1,16,64] [--modes non-stream,stream]
        [--threshold 0.15] [--keep]

What it measures: gateway throughput (req/s), p50 and p99 latency (to the last byte for streams),
and the broker's CPU per request, of ``POST /v1/chat/completions`` (the body of
``bench.bench_gateway``: a short chat turn, 16 tokens answered, streams with usage) sent by ``wrk``
to ``broker serve`` from checkout A and from checkout B. Both brokers run at once, each in its own
process with identical configuration (SQLite WAL in a temp dir, provider ``fake`` of plugin
``openai-compatible`` at one shared fake provider, its key in one shared OpenBao dev server, the
load generator's per-client and per-tenant caps lifted for both); only one is driven at a time.

Why not ``bench_gateway --compare``: that measures each concurrency once, always this checkout
before the compared one, and lifts the caps for this checkout only (the compared broker keeps the
tenant cap, and its agent the ``max_concurrent`` of 8 of its kind: 429s from concurrency 16 on).
Here both are lifted alike, and every (concurrency, mode) cell is measured ``--rounds`` times, the
order A/B alternating from one cell and round to the next (ABBA), so drift and other people's load
on a small shared machine hit both variants alike. Each round's ratio A ÷ B is taken from the two
adjacent measurements of that round.

Printed: every measurement as it is taken, then per cell the median over rounds of req/s, p50, p99
and broker CPU µs per request for A and B, the median ratio A ÷ B of req/s with its min to max across
rounds, and per mode the verdict of the rule "keep A only if it gains at least ``--threshold`` of
throughput at concurrency 16" (gain = median per-round req/s ratio - 1). Nothing is written to
``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
from pathlib import Path
from typing import Any

from bench import harness
from bench.bench_gateway import MODEL, check, provider_toml, request_body
from bench.harness import BrokerUnderTest, Identity, Measurement, Target
from broker.devvault import DevVault

MODES = ("non-stream", "stream")


class CheckoutBroker(BrokerUnderTest):
    """``broker serve`` from another checkout that is as new as this one: the harness drops the
    policy fields an older checkout refuses (``max_concurrent`` among them, so an agent would be
    capped at its kind's default of 8 calls at once and answer 429s at concurrency 16); keep them."""

    def create_workload(self, tenant_id: str, kind: str, policy: dict[str, Any]) -> Identity:
        body = {"tenant_id": tenant_id, "name": f"bench-{kind}-{secrets.token_hex(3)}",
                "kind": kind, "policy": policy}
        out = self._admin_post("/v1/admin/workloads", body)
        return Identity(out["client_id"], out["client_secret"], out["id"])


def target(label: str, broker: BrokerUnderTest, token: str, mode: str, upstream_pid: int) -> Target:
    return Target(
        f"{label} {mode}", broker.url + "/v1/chat/completions", "POST",
        request_body(mode == "stream"),
        (("content-type", "application/json"), ("authorization", f"Bearer {token}")),
        (broker.pid, upstream_pid),
    )


def broker_cpu_us(m: Measurement) -> float:
    """Microseconds of the broker process's CPU per request (its share of the pair of servers)."""
    return m.server_cpus[0] * m.duration_s / m.requests * 1e6 if m.requests else 0.0


def spread(values: list[float]) -> str:
    return f"{min(values):.3f} to {max(values):.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_transport", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", type=Path, default=harness.ROOT,
                        help="checkout A (the candidate; default: this checkout)")
    parser.add_argument("--b", type=Path, required=True, help="checkout B (the baseline)")
    parser.add_argument("--label-a", default="A")
    parser.add_argument("--label-b", default="B")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per target")
    parser.add_argument("--warmup", type=float, default=2.0, help="discarded seconds before each")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--quiet-wait", type=float, default=2.0,
                        help="before each target, wait up to this long for other processes to go quiet")
    parser.add_argument("--threshold", type=float, default=0.15,
                        help="the gain of A over B at concurrency 16 that keeps A")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    assert all(m in MODES for m in modes), modes
    la, lb = args.label_a, args.label_b
    if not harness.wrk_available():
        print("wrk is required: apt-get install -y wrk", file=sys.stderr)
        return 2
    print(f"{harness.now_utc()}: {harness.machine_description()}")
    print(f"A = {la}: {args.a.resolve()}\nB = {lb}: {args.b.resolve()}", flush=True)
    # (mode, c) -> label -> measurements, one per round
    runs: dict[tuple[str, int], dict[str, list[Measurement]]] = {
        (m, c): {la: [], lb: []} for m in modes for c in concurrencies}
    with harness.workspace("bench-transport-", keep=args.keep) as work, DevVault() as vault:
        upstream = harness.mock_upstream_server(work).start()
        vault_path = f"bench-{secrets.token_hex(4)}/providers/fake"
        provider_key = "sk-bench-" + secrets.token_urlsafe(24)
        harness.put_provider_key(vault, vault_path, provider_key)
        # Both as "another checkout" so the harness treats them alike; the caps lifted for both.
        toml = provider_toml(upstream, vault_path) + harness._UNLIMITED_TOML
        brokers: dict[str, CheckoutBroker] = {}
        try:
            for label, path in ((la, args.a), (lb, args.b)):
                broker = CheckoutBroker(vault, work, extra_toml=toml, source=path.resolve())
                brokers[label] = broker
                broker.start()
            agents = {
                label: b.create_workload(b.create_tenant(), "agent",
                                         harness.bench_policy([MODEL], 10**12))
                for label, b in brokers.items()}
            cell = 0
            for r in range(args.rounds):
                print(f"round {r + 1}/{args.rounds}:", flush=True)
                for c in concurrencies:
                    for mode in modes:
                        order = (la, lb) if (cell + r) % 2 == 0 else (lb, la)
                        cell += 1
                        for label in order:
                            b, agent = brokers[label], agents[label]
                            # A fresh token per measurement: none outlives the 900 s maximum.
                            t = target(label, b, b.token(agent.client_id, agent.client_secret),
                                       mode, upstream.pid)
                            check(t)
                            runs[(mode, c)][label].append(harness.measure(
                                t, c, warmup_s=args.warmup, duration_s=args.duration,
                                workdir=work, quiet_wait_s=args.quiet_wait))
        finally:
            for b in brokers.values():
                b.stop()
            upstream.stop()

    med = statistics.median
    rows = []
    verdicts = []
    for mode in modes:
        for c in concurrencies:
            ma, mb = runs[(mode, c)][la], runs[(mode, c)][lb]
            ratios = [x.rps / y.rps for x, y in zip(ma, mb, strict=True)]
            cpu_ratios = [broker_cpu_us(y) / broker_cpu_us(x) for x, y in zip(ma, mb, strict=True)]
            rows.append((
                mode, str(c),
                f"{med([m.rps for m in ma]):,.0f}", f"{med([m.rps for m in mb]):,.0f}",
                f"{med(ratios):.3f}", spread(ratios),
                f"{med([m.p50_ms for m in ma]):.2f}", f"{med([m.p50_ms for m in mb]):.2f}",
                f"{med([m.p99_ms for m in ma]):.2f}", f"{med([m.p99_ms for m in mb]):.2f}",
                f"{med([broker_cpu_us(m) for m in ma]):,.0f}",
                f"{med([broker_cpu_us(m) for m in mb]):,.0f}", f"{med(cpu_ratios):.3f}",
                str(sum(m.errors for m in ma + mb)),
                f"{max(m.other_cpu for m in ma + mb):.2f}",
            ))
            if c == 16:
                gain = med(ratios) - 1
                keep = gain >= args.threshold
                verdicts.append(
                    f"- c16 {mode}: {la} ÷ {lb} req/s = {med(ratios):.3f} (median of {len(ratios)} "
                    f"rounds, range {spread(ratios)}): gain {gain:+.1%} vs required "
                    f"{args.threshold:+.0%}: **{'KEEP' if keep else 'DROP'} {la}**")
    print()
    print(harness.table(rows, [
        "mode", "conc.", f"{la} req/s", f"{lb} req/s", f"{la} ÷ {lb} req/s", "ratio range",
        f"{la} p50 ms", f"{lb} p50 ms", f"{la} p99 ms", f"{lb} p99 ms",
        f"{la} broker CPU µs/req", f"{lb} broker CPU µs/req", f"{lb} ÷ {la} CPU/req",
        "errors", "max CPU other",
    ]))
    print(f"\nMedians over {args.rounds} rounds; ratios per round from adjacent A/B measurements.")
    print("\n".join(verdicts))
    print("\nPer round (req/s A / B, ratio):")
    for mode in modes:
        for c in concurrencies:
            ma, mb = runs[(mode, c)][la], runs[(mode, c)][lb]
            cells = ", ".join(f"{x.rps:,.0f}/{y.rps:,.0f}={x.rps / y.rps:.2f}"
                              for x, y in zip(ma, mb, strict=True))
            print(f"  {mode:<10} c{c:<3} {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
