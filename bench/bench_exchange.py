"""Token-exchange benchmark: a bare Starlette endpoint, issuance for a client secret, the exchange
of a Kubernetes service-account JWT (RS256, ES256) and delegation, side by side.

    python -m bench.bench_exchange [--duration 8] [--warmup 2] [--concurrency 1,16] [--profile auto]

One run on this machine: an OpenBao dev server, the broker (``broker serve``, one uvicorn worker,
SQLite in WAL mode in a temp dir), a bare Starlette app and a JWKS server standing for the
cluster's issuer (same uvicorn settings), each in its own process; ``wrk`` drives them from another.
Every row is one ``POST /v1/token`` but the bare one:

* ``client_credentials`` with a client secret (the row ``bench_tokens`` calls issuance);
* RFC 8693 token exchange of a projected service-account token (``auth.issuers.<name>`` of type
  ``kubernetes``, the workload bound by namespace and service account), signed RS256 or ES256;
  the broker fetches the issuer's JWKS once, at the first exchange, and serves every later one
  from its cache (the JWKS server counts the fetches: the report says how many there were);
* delegation: token exchange with a broker token of the agent as the subject, carving a
  1-micro-dollar slice out of the parent's.

At each concurrency the subject tokens are minted afresh (the broker refuses one issued more than
an hour ago), each target answers 200 once by hand, then the targets are measured back to back.
The figures go to stdout and to ``bench/RESULTS.md``. Nothing is asserted: no target is set.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from bench import harness
from bench.harness import BrokerUnderTest, Identity, Measurement, ServerProcess, Target
from broker.devvault import DevVault, free_port

SECTION = "bench_exchange"

ISSUER_NAME = "bench-k8s"
ISSUER_URL = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "ai-broker"  # the broker's: BrokerUnderTest's [issuer] audience
NAMESPACE, SERVICE_ACCOUNT = "bench", "agent"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
# The delegating agent's per-token slice: every delegation carves 1 micro-dollar out of it.
PARENT_SLICE = 10**12
FORM = (("content-type", "application/x-www-form-urlencoded"),)

BARE = "bare Starlette GET /bare"
SECRET = "secret POST /v1/token"
EXCHANGE_RS = "exchange RS256 POST /v1/token"
EXCHANGE_ES = "exchange ES256 POST /v1/token"
DELEGATION = "delegation POST /v1/token"
EXCHANGES = (EXCHANGE_RS, EXCHANGE_ES, DELEGATION)


@dataclass(frozen=True)
class Cluster:
    """The issuer of the projected service-account tokens: its signing keys, and the JWKS."""

    rsa_key: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey
    uid: str  # the service account's

    @classmethod
    def generate(cls) -> Cluster:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048),
                   ec.generate_private_key(ec.SECP256R1()), str(uuid.uuid4()))

    def jwks(self) -> dict[str, Any]:
        rsa_jwk = RSAAlgorithm.to_jwk(self.rsa_key.public_key(), as_dict=True)
        ec_jwk = ECAlgorithm.to_jwk(self.ec_key.public_key(), as_dict=True)
        return {"keys": [{**rsa_jwk, "kid": "bench-rsa", "alg": "RS256", "use": "sig"},
                         {**ec_jwk, "kid": "bench-ec", "alg": "ES256", "use": "sig"}]}

    def token(self, alg: str) -> str:
        """A projected service-account token as the kubelet mounts it, issued now."""
        now = int(time.time())
        claims = {
            "iss": ISSUER_URL,
            "sub": f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}",
            "aud": [AUDIENCE],
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": NAMESPACE,
                "serviceaccount": {"name": SERVICE_ACCOUNT, "uid": self.uid},
                "pod": {"name": "agent-7c9d8f6b5-x2x4q", "uid": str(uuid.uuid4())},
                "node": {"name": "node-1", "uid": str(uuid.uuid4())},
            },
        }
        if alg == "RS256":
            return jwt.encode(claims, self.rsa_key, algorithm=alg, headers={"kid": "bench-rsa"})
        return jwt.encode(claims, self.ec_key, algorithm=alg, headers={"kid": "bench-ec"})


def issuer_toml(jwks_url: str) -> str:
    return f"""
[auth.issuers.{ISSUER_NAME}]
type = "kubernetes"
issuer = "{ISSUER_URL}"
jwks_url = "{jwks_url}"
audience = "{AUDIENCE}"
"""


def jwks_server(log_dir: Path, document: Path) -> ServerProcess:
    port = free_port()
    argv = [harness.PYTHON, "-m", "bench.servers", "jwks", "--port", str(port), "--file", str(document)]
    # Ready on the counter, so that the readiness probe is not counted as a fetch.
    return ServerProcess("jwks", argv, port, ready_path="/fetches", log_dir=log_dir)


def jwks_fetches(server: ServerProcess) -> int:
    count: int = httpx.get(server.url + "/fetches", timeout=10).json()["fetches"]
    return count


@dataclass(frozen=True)
class Seeded:
    agent: Identity  # issues with its client secret, and is the exchange's bound workload
    delegator: Identity  # the parent of every delegated token


def seed(broker: BrokerUnderTest) -> Seeded:
    tenant = broker.create_tenant()
    binding = {"issuer": ISSUER_NAME, "claims": {"kubernetes.io.namespace": NAMESPACE,
                                                 "kubernetes.io.serviceaccount.name": SERVICE_ACCOUNT}}
    # Each issuance reserves a real 1-micro-dollar slice (far under the budgets), as in
    # bench_tokens; the exchange issues for the same workload, so the two rows differ only by
    # how the caller proves who it is.
    agent = broker.create_bound_workload(tenant, "agent", harness.bench_policy(["mock-gpt"], 1),
                                         [binding])
    delegator = broker.create_workload(tenant, "agent", harness.bench_policy(["mock-gpt"], PARENT_SLICE))
    return Seeded(agent, delegator)


def targets(broker: BrokerUnderTest, bare: ServerProcess, cluster: Cluster, seeded: Seeded) -> list[Target]:
    """The rows, with subject tokens minted now (a parent lives 900 s, a JWT an hour)."""
    parent = broker.token(seeded.delegator.client_id, seeded.delegator.client_secret, ttl_s="900")
    token_url, pids = broker.url + "/v1/token", (broker.pid,)

    def exchange(subject: str, kind: str, **extra: str) -> str:
        return urlencode({"grant_type": TOKEN_EXCHANGE, "subject_token": subject,
                          "subject_token_type": kind, **extra})

    return [
        Target(BARE, bare.url + "/bare", pids=(bare.pid,)),
        Target(SECRET, token_url, "POST",
               urlencode({"grant_type": "client_credentials", "client_id": seeded.agent.client_id,
                          "client_secret": seeded.agent.client_secret}), FORM, pids),
        Target(EXCHANGE_RS, token_url, "POST", exchange(cluster.token("RS256"), JWT_TYPE), FORM, pids),
        Target(EXCHANGE_ES, token_url, "POST", exchange(cluster.token("ES256"), JWT_TYPE), FORM, pids),
        Target(DELEGATION, token_url, "POST",
               exchange(parent, ACCESS_TOKEN_TYPE, budget_micros="1"), FORM, pids),
    ]


def check(target: Target, expect: str) -> None:
    """One request by hand before the load: the target must answer 200 with the expected body."""
    headers = dict(target.headers)
    resp = httpx.request(target.method, target.url, content=target.body or None, headers=headers, timeout=30)
    if resp.status_code != 200 or expect not in resp.text:
        raise RuntimeError(f"{target.name}: {resp.status_code} {resp.text[:300]}")


EXPECT = {BARE: '"ok"', SECRET: '"access_token"', EXCHANGE_RS: '"access_token"',
          EXCHANGE_ES: '"access_token"', DELEGATION: '"budget_micros":1'}


def _cpu_ms(m: Measurement) -> str:
    return f"{1000.0 / m.per_cpu_s:.2f}" if m.per_cpu_s else ""


def report(results: list[Measurement], concurrencies: list[int], args: argparse.Namespace,
           fetches: int) -> str:
    by = {(m.target, m.concurrency): m for m in results}
    main_table = harness.results_table(results, concurrencies, ceiling=BARE)
    rows = []
    for c in concurrencies:
        bare, secret = by[(BARE, c)], by[(SECRET, c)]
        for name in (SECRET, *EXCHANGES):
            m = by[(name, c)]
            vs_secret = ("1.00", "1.00") if name == SECRET else (
                f"{m.rps / secret.rps:.3f}", f"{m.per_cpu_s / secret.per_cpu_s:.3f}")
            rows.append((str(c), name, _cpu_ms(m), *vs_secret, f"{m.rps / bare.rps:.3f}",
                         f"{m.per_cpu_s / bare.per_cpu_s:.3f}"))
    ratios = harness.table(rows, [
        "conc.", "target", "server CPU ms / req", "÷ secret (req/s)", "÷ secret (per CPU-s)",
        "÷ bare (req/s)", "÷ bare (per CPU-s)",
    ])
    return f"""
## Token exchange: federated JWT and delegation vs a client secret and a bare Starlette endpoint

Run {harness.now_utc()}: {harness.machine_description()}.

Method: every server in its own process: an OpenBao dev server; `broker serve` (1 uvicorn worker,
SQLite WAL in a temp dir, seeded through the admin API); a bare Starlette app with one JSON route
and a JWKS server for the cluster's issuer, both under the same uvicorn settings (1 worker).
`wrk` (1 thread, closed loop, keep-alive, one connection per unit of concurrency) runs each target
for {args.warmup:g} s of discarded warm-up, then {args.duration:g} s measured; at each concurrency
the targets run back to back. Every broker row is `POST /v1/token` with a form body, and every
token issued reserves a 1-micro-dollar slice:

* **secret**: `client_credentials` with the agent's client secret (`bench_tokens`' issuance row);
* **exchange RS256 / ES256**: `grant_type=urn:ietf:params:oauth:grant-type:token-exchange` with a
  Kubernetes projected service-account JWT (`kubernetes.io` claims, RS256 with a 2048-bit key or
  ES256 on P-256) as `subject_token` of type `jwt`, for the same agent, bound by namespace and
  service account (`auth.issuers.{ISSUER_NAME}`, type `kubernetes`, `jwks_url` on loopback http).
  The broker fetched the issuer's JWKS {fetches} time(s) in the whole run: the figures are those of
  a cached JWKS (signature and claim checks, the binding lookup and the audit row remain);
* **delegation**: `subject_token` a broker token of another agent (type `access_token`, a
  {PARENT_SLICE:,}-micro-dollar slice, 900 s), `budget_micros=1` carved out of the parent's slice.

The subject tokens are minted again before each concurrency. {harness.CPU_COLUMNS_NOTE}

{main_table}

Relative to issuance with a client secret and to the bare endpoint, same run (server CPU ms per
request is 1000 / `req per server CPU-s`):

{ratios}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_exchange", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per target")
    parser.add_argument("--warmup", type=float, default=2.0, help="discarded seconds before each")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                        help="py-spy the broker during the RS256 exchange at c16 (auto: when "
                             "py-spy is installed)")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    parser.add_argument("--quiet-wait", type=float, default=2.0,
                        help="before each target, wait up to this long for other processes to go quiet")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, raw profiles)")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if not harness.wrk_available():
        print("wrk is required: apt-get install -y wrk", file=sys.stderr)
        return 2
    cluster = Cluster.generate()
    with harness.workspace("bench-exchange-", keep=args.keep) as work, DevVault() as vault:
        document = work / "jwks.json"
        document.write_text(json.dumps(cluster.jwks()))
        jwks, bare = jwks_server(work, document), harness.bare_server(work)
        broker = BrokerUnderTest(vault, work, extra_toml=issuer_toml(jwks.url + "/jwks"))
        try:
            jwks.start()
            bare.start()
            broker.start()
            seeded = seed(broker)
            results: list[Measurement] = []
            for c in concurrencies:
                tgts = targets(broker, bare, cluster, seeded)
                for t in tgts:
                    check(t, EXPECT[t.name])
                print(f"concurrency {c}:", flush=True)
                for t in tgts:
                    results.append(harness.measure(
                        t, c, warmup_s=args.warmup, duration_s=args.duration, workdir=work,
                        quiet_wait_s=args.quiet_wait,
                    ))
            profile = ""
            if args.profile == "always" or (args.profile == "auto" and harness.py_spy() is not None):
                rs = next(t for t in targets(broker, bare, cluster, seeded) if t.name == EXCHANGE_RS)
                check(rs, EXPECT[rs.name])
                profile = harness.profile_section(
                    "Where the exchange's time goes (RS256)", broker.pid, rs, args.duration, work)
            text = report(results, concurrencies, args, jwks_fetches(jwks)) + profile
        finally:
            broker.stop()
            bare.stop()
            jwks.stop()
    return harness.publish(SECTION, text, write=not args.no_write)


if __name__ == "__main__":
    sys.exit(main())
