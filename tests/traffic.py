"""Traffic for the detectors: a steady day of honest workloads, and small scripted attacks.

Everything runs on simulated time (UNIX seconds from :data:`T0`) and is deterministic per seed,
so a test or the benchmark replays the same day every time, in milliseconds per simulated hour.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from broker.monitoring.detectors import Detectors, Finding, Observation

T0 = 1_699_920_000.0  # 2023-11-14 00:00 UTC: a replay starts at midnight, the quiet hour
DAY_S = 86_400.0
KINDS = ("agent", "service", "interactive", "admin")
_KIND_WEIGHTS = (40, 30, 25, 5)


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    price_micros_per_mtok: int  # output price, micro-dollars per million tokens


CATALOGUE = (
    Model("flash", 400_000),
    Model("mini", 600_000),
    Model("haiku", 4_000_000),
    Model("gpt-4o", 10_000_000),
    Model("sonnet", 15_000_000),
    Model("opus", 75_000_000),
)
PRICES = {m.name: m.price_micros_per_mtok for m in CATALOGUE}


@dataclass(frozen=True, slots=True)
class Profile:
    """One honest workload's habits, fixed for the day."""

    workload_id: str
    tenant_id: str
    kind: str
    start: float  # when it makes its first call
    per_minute: float  # mean calls a minute over a day (the base rates span 100x)
    phase: float  # seconds after midnight of its quietest moment (tenants' time zones differ)
    models: tuple[Model, ...]  # its usual 2-4 models
    weights: tuple[float, ...]
    tokens: float  # median tokens a call
    network: str  # its stable /24 (or /48) prefix, to which a host part is appended
    ipv6: bool


def profiles(workloads: int, seed: int) -> list[Profile]:
    rng = random.Random(seed)
    tenants = max(2, workloads // 12)
    out = []
    for i in range(workloads):
        models = tuple(rng.sample(CATALOGUE, rng.randint(2, 4)))
        ipv6 = rng.random() < 0.2
        out.append(Profile(
            workload_id=f"wl_{seed:04x}{i:06d}",
            tenant_id=f"tn_{seed:04x}{rng.randrange(tenants):04d}",
            kind=rng.choices(KINDS, _KIND_WEIGHTS)[0],
            start=T0 + rng.uniform(0, 2 * 3600),
            per_minute=10 ** rng.uniform(-2, 0),
            phase=rng.uniform(0, 3 * 3600),
            models=models,
            weights=tuple(rng.uniform(0.2, 1.0) for _ in models),
            tokens=10 ** rng.uniform(math.log10(300), math.log10(3000)),
            network=f"2001:db8:{i:x}::" if ipv6 else f"10.{i // 256}.{i % 256}.",
            ipv6=ipv6,
        ))
    return out


def diurnal(profile: Profile, ts: float) -> float:
    """The rate's multiple of its daily mean: 0.3 at the quietest hour, 1.7 twelve hours later."""
    return 1.0 - 0.7 * math.cos(2 * math.pi * (ts - T0 - profile.phase) / DAY_S)


_PEAK = 1.7


def steady_traffic(workloads: int, hours: float, seed: int) -> Iterator[Observation]:
    """A day of honest traffic in time order, from ``workloads`` workloads of mixed kinds in
    several tenants: a diurnal rate curve, base rates 100x apart, Poisson arrivals (thinned
    from the peak rate), each workload's own 2-4 models, one stable network each, varied
    fingerprints with the odd retry, and about one refusal in 200 calls.

    Each workload's first calls go once through its usual models, as a developer's trial calls
    do, so the ``new_model`` baseline is complete before it is trusted; after that the mix is
    random with fixed weights.
    """
    rng = random.Random(seed ^ 0x5EED)
    people = profiles(workloads, seed)
    end = T0 + hours * 3600
    queue = [(p.start, i) for i, p in enumerate(people)]
    heapq.heapify(queue)
    calls = [0] * workloads
    last_fingerprint: list[str | None] = [None] * workloads
    while queue:
        ts, i = heapq.heappop(queue)
        if ts >= end:
            continue
        p = people[i]
        obs = _honest_call(rng, p, ts, calls[i], last_fingerprint, i)
        calls[i] += obs.signal == "usage"
        yield obs
        peak_per_s = p.per_minute * _PEAK / 60
        nxt = ts
        while True:  # thinning: candidates at the peak rate, kept in proportion to the curve
            nxt += rng.expovariate(peak_per_s)
            if nxt >= end or rng.random() * _PEAK < diurnal(p, nxt):
                break
        heapq.heappush(queue, (nxt, i))


def _honest_call(rng: random.Random, p: Profile, ts: float, n: int,
                 last_fingerprint: list[str | None], i: int) -> Observation:
    host = rng.randint(1, 254)
    ip = f"{p.network}{host:x}" if p.ipv6 else f"{p.network}{host}"
    if rng.random() < 0.005:
        reason = rng.choice(("rate_limited", "upstream_error", "refused_token"))
        return Observation(ts=ts, workload_id=p.workload_id, tenant_id=p.tenant_id, kind=p.kind,
                           signal="refusal", refusal=reason, client_ip=ip)
    # Its first calls try each usual model once; then the mix is random with fixed weights.
    model = p.models[n] if n < len(p.models) else rng.choices(p.models, p.weights)[0]
    tokens = max(1, int(rng.lognormvariate(math.log(p.tokens), 0.5)))
    previous = last_fingerprint[i]
    retry = previous is not None and rng.random() < 0.03  # a client retrying the same request
    fingerprint = previous if retry and previous else f"{rng.getrandbits(256):064x}"
    last_fingerprint[i] = fingerprint
    return Observation(
        ts=ts, workload_id=p.workload_id, tenant_id=p.tenant_id, kind=p.kind, signal="usage",
        model=model.name, cost_micros=tokens * model.price_micros_per_mtok // 1_000_000,
        tokens=tokens, price_micros_per_mtok=model.price_micros_per_mtok,
        fingerprint=fingerprint, client_ip=ip)


def replay(detectors: Detectors,
           observations: Iterable[Observation]) -> list[tuple[Observation, Finding]]:
    """Feed observations in order; every finding with the observation that raised it."""
    found: list[tuple[Observation, Finding]] = []
    for obs in observations:
        found.extend((obs, finding) for finding in detectors.observe(obs))
    return found


# --- scripted workloads and attacks -----------------------------------------------------------


def call(ts: float, workload_id: str = "wl_attacked", *, tenant_id: str = "tn_attacked",
         kind: str = "agent", model: str = "mini", tokens: int = 1_000,
         cost_micros: int | None = None, price: int | None = None,
         fingerprint: str | None = None, client_ip: str | None = "10.9.9.9",
         cidrs: tuple[str, ...] = ()) -> Observation:
    """One settled call; price from the catalogue and cost from the price unless given; a
    fingerprint of its own unless given."""
    price = PRICES.get(model, 1_000_000) if price is None else price
    return Observation(
        ts=ts, workload_id=workload_id, tenant_id=tenant_id, kind=kind, signal="usage",
        model=model, tokens=tokens, price_micros_per_mtok=price,
        cost_micros=tokens * price // 1_000_000 if cost_micros is None else cost_micros,
        fingerprint=fingerprint if fingerprint is not None else f"{int(ts * 1000):064x}",
        client_ip=client_ip, cidrs=cidrs)


def refusal(ts: float, workload_id: str = "wl_attacked", *, reason: str = "refused_token",
            authenticated: bool = True, kind: str = "agent",
            tenant_id: str = "tn_attacked") -> Observation:
    return Observation(ts=ts, workload_id=workload_id, tenant_id=tenant_id, kind=kind,
                       signal="refusal", refusal=reason, authenticated=authenticated)


def looping_agent(start: float, count: int, every_s: float, *, workload_id: str = "wl_attacked",
                  fingerprint: str = "ab" * 32, model: str = "sonnet") -> Iterator[Observation]:
    """An agent stuck sending one request again and again."""
    for n in range(count):
        yield call(start + n * every_s, workload_id, model=model, fingerprint=fingerprint)


def wrong_secret_flood(start: float, count: int, every_s: float, *,
                       workload_id: str = "wl_attacked") -> Iterator[Observation]:
    """Someone who knows the client id guessing its secret: nothing proves it is the agent."""
    for n in range(count):
        yield refusal(start + n * every_s, workload_id, reason="bad_secret", authenticated=False)


def refusing_agent(start: float, count: int, every_s: float, *, reason: str = "refused_token",
                   workload_id: str = "wl_attacked") -> Iterator[Observation]:
    """An authenticated agent whose calls keep being refused."""
    for n in range(count):
        yield refusal(start + n * every_s, workload_id, reason=reason)


def spender(start: float, duration_s: float, micros_per_window: int, *,
            workload_id: str = "wl_attacked", tenant_id: str = "tn_attacked",
            kind: str = "agent", window_s: float = 300, calls_per_window: int = 5,
            tokens_per_call: int = 1_000) -> Iterator[Observation]:
    """Evenly spaced calls spending ``micros_per_window`` every ``window_s``."""
    every = window_s / calls_per_window
    cost = micros_per_window // calls_per_window
    for n in range(int(duration_s // every)):
        yield call(start + n * every, workload_id, tenant_id=tenant_id, kind=kind,
                   tokens=tokens_per_call, cost_micros=cost)
