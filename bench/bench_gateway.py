"""Gateway benchmark: the same chat completion sent through the broker and straight to the fake
provider, side by side, with a bare Starlette endpoint as the framework's ceiling.

    python -m bench.bench_gateway [--duration 8] [--warmup 2] [--concurrency 1,16,64] [--profile]

One run on this machine, each server in its own process under uvicorn with one worker: an OpenBao
dev server, the fake provider (``plugins.mock_upstream``), the broker (``broker serve``, SQLite WAL,
a provider of plugin ``openai-compatible`` pointing at the fake provider, its key in Vault, the
model priced in ``[models.*]``), the bare app, and the peer: a LiteLLM proxy without a database
(:mod:`bench.peers`, installed into a virtualenv of its own on first use; ``--peer none`` skips
it). ``wrk`` drives them from another process. Targets from the gateway issue: added p50 latency
under 1 ms at concurrency 1; at concurrency 16, gateway throughput at least 25 % of the bare
endpoint's and 30 times LiteLLM's.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path

import httpx

from bench import harness, peers
from bench.harness import BrokerUnderTest, Measurement, ServerProcess, Target
from broker.devvault import DevVault

SECTION = "bench_gateway"
MODEL = "mock-gpt"
TARGET_ADDED_P50_MS = 1.0
TARGET_RATIO = 0.25
TARGET_PEER_RATIO = 30.0
# No peer figure is quoted here: a peer (LiteLLM) is only compared when measured in the same run.
PEER = f"LiteLLM {peers.LITELLM_VERSION} proxy (no database)"

BARE = "bare Starlette GET /bare"
COMPARED = "broker (--compare checkout)"


def provider_toml(upstream: ServerProcess, vault_path: str) -> str:
    return f"""
[providers.fake]
plugin = "openai-compatible"
base_url = "{upstream.url}/v1"
vault_path = "{vault_path}"

[models.{MODEL}]
provider = "fake"
input_micros_per_mtok = 150000
output_micros_per_mtok = 600000
"""


def request_body(stream: bool) -> str:
    """One short chat turn; the fake provider answers 16 tokens. The client asks for usage in the
    stream, so the provider does the same work whether the broker or the benchmark calls it."""
    body: dict[str, object] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say something short about benchmarks."}],
        "max_tokens": 16,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body)


def name(route: str, stream: bool) -> str:
    return f"{route} {'stream' if stream else 'non-stream'}"


def targets(
    broker: BrokerUnderTest, upstream: ServerProcess, bare: ServerProcess, token: str, provider_key: str,
    compare: tuple[BrokerUnderTest, str] | None = None, peer: ServerProcess | None = None,
) -> list[Target]:
    path = "/v1/chat/completions"
    out = [Target(BARE, bare.url + "/bare", pids=(bare.pid,))]
    for stream in (False, True):
        body = request_body(stream)
        out.append(Target(
            name("direct", stream), upstream.url + path, "POST", body,
            (("content-type", "application/json"), ("authorization", f"Bearer {provider_key}")),
            (upstream.pid,),
        ))
        out.append(Target(
            name("broker", stream), broker.url + path, "POST", body,
            (("content-type", "application/json"), ("authorization", f"Bearer {token}")),
            (broker.pid, upstream.pid),
        ))
        if compare is not None:
            other, other_token = compare
            out.append(Target(
                name(COMPARED, stream), other.url + path, "POST", body,
                (("content-type", "application/json"), ("authorization", f"Bearer {other_token}")),
                (other.pid, upstream.pid),
            ))
        if peer is not None:
            out.append(Target(
                name(PEER, stream), peer.url + path, "POST", body,
                (("content-type", "application/json"),
                 ("authorization", f"Bearer {peers.MASTER_KEY}")),
                (peer.pid, upstream.pid),
            ))
    return out


def check(target: Target) -> None:
    resp = httpx.request(target.method, target.url, content=target.body or None,
                         headers=dict(target.headers), timeout=30)
    if resp.status_code != 200:
        raise RuntimeError(f"{target.name}: {resp.status_code} {resp.text[:300]}")
    if "stream" in target.name and "non-stream" not in target.name:
        if "[DONE]" not in resp.text:
            raise RuntimeError(f"{target.name}: the stream did not finish: {resp.text[-300:]}")
    elif target.name != BARE and '"usage"' not in resp.text:
        raise RuntimeError(f"{target.name}: no usage in {resp.text[:300]}")


def report(
    results: list[Measurement], concurrencies: list[int], args: argparse.Namespace
) -> tuple[str, bool]:
    by = {(m.target, m.concurrency): m for m in results}
    main_table = harness.results_table(results, concurrencies, ceiling=BARE)
    added_rows = []
    for stream in (False, True):
        for c in concurrencies:
            d, b = by[(name("direct", stream), c)], by[(name("broker", stream), c)]
            added_rows.append((
                "stream" if stream else "non-stream", str(c),
                f"{b.p50_ms - d.p50_ms:+.2f}", f"{b.p99_ms - d.p99_ms:+.2f}",
                f"{b.rps:,.0f}", f"{d.rps:,.0f}", f"{b.rps / d.rps:.2f}",
                f"{b.rps / by[(BARE, c)].rps:.3f}",
            ))
    added = harness.table(added_rows, [
        "mode", "conc.", "added p50 ms", "added p99 ms", "broker req/s", "direct req/s",
        "broker ÷ direct", "broker ÷ bare",
    ])
    verdicts = []
    met = True
    if 1 in concurrencies:
        for stream in (False, True):
            d, b = by[(name("direct", stream), 1)], by[(name("broker", stream), 1)]
            added_p50 = b.p50_ms - d.p50_ms
            ok = added_p50 < TARGET_ADDED_P50_MS
            met = met and ok
            verdicts.append(
                f"- Added p50 latency at concurrency 1, {'stream' if stream else 'non-stream'} "
                f"(target < {TARGET_ADDED_P50_MS:g} ms): **{'MET' if ok else 'NOT MET'}**, "
                f"{added_p50:.2f} ms."
            )
    if 16 in concurrencies:
        for stream in (False, True):
            b = by[(name("broker", stream), 16)]
            ratio = b.rps / by[(BARE, 16)].rps
            ok = ratio >= TARGET_RATIO
            met = met and ok
            verdicts.append(
                f"- Gateway throughput at concurrency 16, {'stream' if stream else 'non-stream'} "
                f"(target >= {TARGET_RATIO:.0%} of bare): **{'MET' if ok else 'NOT MET'}**, "
                f"{ratio:.1%} ({b.rps:,.0f} req/s)."
            )
    peer_text = ""
    if any(m.target.startswith(PEER) for m in results):
        peer_rows = []
        for stream in (False, True):
            for c in concurrencies:
                b, p = by[(name("broker", stream), c)], by[(name(PEER, stream), c)]
                peer_rows.append((
                    "stream" if stream else "non-stream", str(c), f"{b.rps:,.0f}",
                    f"{p.rps:,.0f}", f"{b.rps / p.rps:.1f}", f"{b.per_cpu_s / p.per_cpu_s:.1f}",
                    f"{b.p50_ms:.2f}", f"{p.p50_ms:.2f}",
                ))
        peer_text = "Against the peer, same run:\n\n" + harness.table(peer_rows, [
            "mode", "conc.", "broker req/s", "LiteLLM req/s", "broker ÷ LiteLLM",
            "per server CPU-s, broker ÷ LiteLLM", "broker p50 ms", "LiteLLM p50 ms",
        ]) + "\n"
        if 16 in concurrencies:
            b, p = by[(name("broker", False), 16)], by[(name(PEER, False), 16)]
            ok = b.rps / p.rps >= TARGET_PEER_RATIO
            met = met and ok
            verdicts.append(
                f"- Gateway throughput at concurrency 16, non-stream, against LiteLLM (target >= "
                f"{TARGET_PEER_RATIO:g} times): **{'MET' if ok else 'NOT MET'}**, "
                f"{b.rps / p.rps:.1f} times.")
    verdict_text = "\n".join(verdicts)
    return f"""
## Gateway: `/v1/chat/completions` through the broker vs straight to the fake provider

Run {harness.now_utc()}: {harness.machine_description()}.

Method: every server in its own process, each one uvicorn worker with the settings of
`broker serve`: an OpenBao dev server; the fake provider (`plugins.mock_upstream`); `broker serve`
(SQLite WAL in a temp dir, provider `fake` of plugin `openai-compatible` at the fake provider, its
key in Vault at the provider's `vault_path`, `{MODEL}` priced at 150,000 / 600,000 micro-dollars
per million input / output tokens); and a bare Starlette app with one JSON route. `wrk` (1 thread,
closed loop, keep-alive, one connection per unit of concurrency) sends the same request body to
the broker (with a broker token whose slice cannot run out) and straight to the fake provider
(with the provider key): a short chat turn with `max_tokens` 16, answered with 16 tokens; streams
ask for usage (`stream_options.include_usage`), so the provider's work is the same on both paths.
Through the broker every call verifies the token, checks the model and limits, holds the
worst-case cost in the slice, forwards with the key from Vault (cached), settles from the reported
usage and writes a usage event. Each target: {args.warmup:g} s discarded warm-up, then
{args.duration:g} s measured; at each concurrency the targets run back to back. A stream's latency
is to its last byte. The broker's CPU is shown as `broker + fake provider`, LiteLLM's as
`LiteLLM + fake provider`: LiteLLM {peers.LITELLM_VERSION} (`litellm[proxy]`, installed by the
benchmark into a virtualenv of its own) runs `litellm --config` with one worker, a master key and
no database, its one model `openai/{MODEL}` at the same fake provider with the same key.
{harness.CPU_COLUMNS_NOTE}

{main_table}

Added latency (broker minus direct, same concurrency, same run) and throughput:

{added}

{peer_text}
{verdict_text}
""", met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_gateway", description=__doc__)
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per target")
    parser.add_argument("--warmup", type=float, default=2.0, help="discarded seconds before each")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                        help="py-spy the broker under non-stream load at concurrency 16 "
                             "(auto: when a target is missed)")
    parser.add_argument("--quiet-wait", type=float, default=2.0,
                        help="before each target, wait up to this long for other processes to go quiet")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, raw profiles)")
    parser.add_argument("--peer", choices=["litellm", "none"], default="litellm",
                        help="measure LiteLLM's proxy beside the broker (installed on first use)")
    parser.add_argument("--compare", type=Path, default=None,
                        help="another checkout of the broker (e.g. `git worktree add ../before "
                             "HEAD~3`) measured beside this one in the same run")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if not harness.wrk_available():
        print("wrk is required: apt-get install -y wrk", file=sys.stderr)
        return 2
    with harness.workspace("bench-gateway-", keep=args.keep) as work, DevVault() as vault:
        bare = harness.bare_server(work).start()
        upstream = harness.mock_upstream_server(work).start()
        vault_path = f"bench-{secrets.token_hex(4)}/providers/fake"
        provider_key = "sk-bench-" + secrets.token_urlsafe(24)
        harness.put_provider_key(vault, vault_path, provider_key)
        broker = BrokerUnderTest(vault, work, extra_toml=provider_toml(upstream, vault_path)).start()
        peer = None
        if args.peer == "litellm":
            peer = peers.litellm_server(work, upstream.url, provider_key, MODEL).start(
                timeout_s=180)
        other = None
        if args.compare is not None:
            other = BrokerUnderTest(vault, work, extra_toml=provider_toml(upstream, vault_path),
                                    source=args.compare.resolve()).start()
        try:
            tenant = broker.create_tenant()
            agent = broker.create_workload(tenant, "agent", harness.bench_policy([MODEL], 10**12))
            other_agent = None
            if other is not None:
                other_agent = other.create_workload(other.create_tenant(), "agent",
                                                    harness.bench_policy([MODEL], 10**12))
            results: list[Measurement] = []
            for c in concurrencies:
                # A fresh token per block: no block outlives the 900 s maximum token lifetime.
                token = broker.token(agent.client_id, agent.client_secret)
                compare = None
                if other is not None and other_agent is not None:
                    compare = (other, other.token(other_agent.client_id, other_agent.client_secret))
                tgts = targets(broker, upstream, bare, token, provider_key, compare, peer)
                for t in tgts:
                    check(t)
                print(f"concurrency {c}:", flush=True)
                for t in tgts:
                    results.append(harness.measure(
                        t, c, warmup_s=args.warmup, duration_s=args.duration, workdir=work,
                        quiet_wait_s=args.quiet_wait,
                    ))
            text, met = report(results, concurrencies, args)
            if args.profile == "always" or (args.profile == "auto" and not met):
                token = broker.token(agent.client_id, agent.client_secret)
                gateway = targets(broker, upstream, bare, token, provider_key)[2]
                profile = harness.profile_under_load(broker.pid, gateway, 16, args.duration, work)
                text += f"""
### Where gateway time goes (py-spy {harness.PROFILE_HZ} Hz on the broker, non-stream, concurrency 16)

{args.duration:g} s per recording.

{profile}
"""
        finally:
            broker.stop()
            if other is not None:
                other.stop()
            if peer is not None:
                peer.stop()
            upstream.stop()
            bare.stop()
    return harness.publish(SECTION, text, write=not args.no_write)


if __name__ == "__main__":
    sys.exit(main())
