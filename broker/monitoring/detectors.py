"""Runtime-monitoring detectors: a pure engine that turns what a workload did into findings.

No database, no threads, no clock: the caller (one background thread) passes each settled call
or refusal as an :class:`Observation` stamped by its own clock, loads a workload's persisted
state (and its peer group's, under :func:`peer_key`) before the workload's first observation,
and periodically writes :meth:`Detectors.dirty` back. Every state is O(1) in size and every
observation costs O(1) amortised; at most ``max_workloads`` states stay in memory (least
recently used first out, a dirty one kept until the next ``dirty()``).

Five detectors:

* ``loop``: one request fingerprint ``loop.threshold`` times within ``loop.window_s``.
* ``failures``: ``failures.threshold`` refusals within ``failures.window_s``; attributable to
  the workload only if its authenticated refusals alone reach the threshold, since anyone who
  knows a client id can send wrong secrets for it.
* ``velocity``: a window's spend far above the workload's baseline (its own once it has
  ``min_baseline_windows`` windows of history, before that its tenant's peers of the same
  kind, with neither the floor alone) in ``k`` of the last ``n`` steps.
* ``new_model``: a model the workload has not used within ``baseline_window_s``, graded by its
  price against the dearest model it does use.
* ``origin``: a call from outside the configured networks, or (without any) from a network not
  learned during the first calls.

A detector that fired for a workload is quiet for ``cooldown_s``, except for a graver finding
or an attributable one following an unattributable one, which must not be hidden.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from broker.monitoring.baselines import (
    COUNT_CAP,
    MAX_FINGERPRINT,
    MAX_FINGERPRINTS,
    MAX_MODELS,
    MAX_NAME,
    MAX_NETWORKS,
    MAX_REASONS,
    RING_BUCKETS,
    STEPS_PER_WINDOW,
    Cooldown,
    PeerState,
    Ring,
    WindowSums,
    WorkloadState,
)
from broker.settings.monitoring import MonitoringSettings

PEER_PREFIX = "peers/"
_KEY_MAX = 40  # monitor_state.workload_id
SEVERITIES = ("info", "warning", "critical")
_RANK = {severity: rank for rank, severity in enumerate(SEVERITIES)}
_KINDS = frozenset({"agent", "service", "interactive", "admin"})
_REASON_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")
_MAX_AMOUNT = 10**15  # micros, tokens or a price: settings.MAX_MICROS, a billion dollars
_MAX_TS = 1e12  # an observation stamped later than the year 33000 is a broken clock: ignored
_MAX_HOT_SHIFT = 128  # more idle steps than velocity.n can hold (n <= 100) clear the flags anyway
_NEW_MODEL_WARNING = 4.0  # a new model up to 4x the dearest usual price is a warning, above critical

Evidence = dict[str, str | int | float | bool | None]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def peer_key(tenant_id: str, kind: str) -> str:
    """The state key of a (tenant, kind) peer group: ``peers/{tenant_id}/{kind}``, or a digest
    of the pair when that would not fit the 40-character key column."""
    key = f"{PEER_PREFIX}{tenant_id}/{kind}"
    if len(key) <= _KEY_MAX:
        return key
    digest = hashlib.sha256(f"{tenant_id}/{kind}".encode()).hexdigest()
    return PEER_PREFIX + digest[: _KEY_MAX - len(PEER_PREFIX)]


@dataclass(frozen=True, slots=True)
class Observation:
    ts: float  # UNIX seconds, from the caller's (injectable) clock
    workload_id: str
    tenant_id: str
    kind: str  # agent | service | interactive | admin
    signal: str  # "usage" (a settled model call) | "refusal"
    model: str | None = None
    cost_micros: int = 0
    tokens: int = 0
    price_micros_per_mtok: int = 0  # the model's output price, to weigh new_model
    fingerprint: str | None = None  # hex digest of model + messages + parameters (never the prompt)
    client_ip: str | None = None
    cidrs: tuple[str, ...] = ()  # the workload's configured networks (policy.monitoring.cidrs)
    refusal: str | None = None  # bad_secret | refused_token | rate_limited | upstream_error | ...
    authenticated: bool = True  # False when anyone could have caused it (a wrong client secret)


@dataclass(frozen=True, slots=True)
class Finding:
    detector: str  # velocity | failures | new_model | origin | loop
    severity: str  # info | warning | critical
    summary: str  # one human line; never a prompt, key, token or secret
    evidence: Evidence
    attributable: bool = True  # False: rests only on signals anyone could send; only alert


class Detectors:
    """The detectors over many workloads, for one thread. See the module docstring."""

    def __init__(self, settings: MonitoringSettings, *, max_workloads: int = 100_000) -> None:
        if max_workloads < 1:
            raise ValueError("max_workloads must be at least 1")
        self._settings = settings
        self._max = max_workloads
        self._states: OrderedDict[str, WorkloadState | PeerState] = OrderedDict()
        self._dirty: set[str] = set()
        self._evicted: OrderedDict[str, dict[str, object]] = OrderedDict()
        velocity = settings.velocity
        self._step_s = velocity.window_s / STEPS_PER_WINDOW
        self._ln_decay = -math.log(2) * self._step_s / velocity.half_life_s
        self._decay = math.exp(self._ln_decay)
        # "Windows of history" are whole windows: 12 windows = 60 learned steps = an hour.
        self._mature = velocity.min_baseline_windows * STEPS_PER_WINDOW
        self._hot_mask = (1 << velocity.n) - 1
        self._k = min(velocity.k, velocity.n)  # k > n could never fire; read it as "all n"
        self._loop_step = settings.loop.window_s / RING_BUCKETS
        self._failure_step = settings.failures.window_s / RING_BUCKETS

    # --- the caller's interface --------------------------------------------------------------

    def observe(self, obs: Observation) -> list[Finding]:
        """The findings this observation raises (usually none). O(1) amortised."""
        if obs.signal not in ("usage", "refusal") or not obs.workload_id:
            return []
        if obs.workload_id.startswith(PEER_PREFIX):
            return []  # not a workload id: it would overwrite a peer group's state
        if not (math.isfinite(obs.ts) and 0 <= obs.ts <= _MAX_TS):
            return []
        state = self._workload(obs.workload_id)
        self._dirty.add(obs.workload_id)
        found: list[Finding] = []
        if obs.signal == "refusal":
            self._failures(state, obs, found)
        else:
            self._loop(state, obs, found)
            self._velocity(state, obs, found)
            self._new_model(state, obs, found)
            self._origin(state, obs, found)
        self._trim()
        return found

    def load(self, key: str, state: Mapping[str, object]) -> None:
        """Take a state read from the database. Never raises: whatever part of it fails a check
        starts fresh. A state already in memory is kept (it is at least as new as anything it
        wrote), and so is one evicted but not yet returned by ``dirty()``; ``forget()`` first
        to replace it."""
        if key in self._states:
            return
        pending = self._evicted.pop(key, None)
        raw: object = pending if pending is not None else state
        if key.startswith(PEER_PREFIX):
            self._states[key] = PeerState.from_json(raw)
        else:
            self._states[key] = WorkloadState.from_json(raw)
        if pending is not None:
            self._dirty.add(key)
        self._trim()

    def loaded(self, key: str) -> bool:
        return key in self._states

    def dirty(self) -> dict[str, dict[str, object]]:
        """JSON-serialisable states changed since the last call, including the ones evicted
        from memory meanwhile; the set is cleared."""
        out = dict(self._evicted)
        self._evicted.clear()
        for key in self._dirty:
            state = self._states.get(key)
            if state is not None:
                out[key] = state.to_json()
        self._dirty.clear()
        return out

    def forget(self, key: str) -> None:
        self._states.pop(key, None)
        self._dirty.discard(key)
        self._evicted.pop(key, None)

    def __len__(self) -> int:
        return len(self._states)

    # --- memory ---------------------------------------------------------------------------

    def _workload(self, key: str) -> WorkloadState:
        state = self._states.get(key)
        if isinstance(state, WorkloadState):
            self._states.move_to_end(key)
            return state
        # Not loaded: an evicted, unwritten state is newer than the database's.
        pending = self._evicted.pop(key, None)
        fresh = WorkloadState.from_json(pending) if pending is not None else WorkloadState()
        self._states[key] = fresh
        self._states.move_to_end(key)
        return fresh

    def _peers(self, obs: Observation) -> tuple[str, PeerState]:
        key = peer_key(obs.tenant_id, obs.kind)
        state = self._states.get(key)
        if isinstance(state, PeerState):
            self._states.move_to_end(key)
            return key, state
        pending = self._evicted.pop(key, None)
        fresh = PeerState.from_json(pending) if pending is not None else PeerState()
        if pending is not None:
            self._dirty.add(key)
        self._states[key] = fresh
        self._states.move_to_end(key)
        return key, fresh

    def _trim(self) -> None:
        # Trimmed only between observations, so no state is evicted while being changed.
        while len(self._states) > self._max:
            key, state = self._states.popitem(last=False)
            if key in self._dirty:
                self._dirty.discard(key)
                self._evicted[key] = state.to_json()
                if len(self._evicted) > self._max:
                    # Only if dirty() is never called: lose the oldest baseline update, not memory.
                    self._evicted.popitem(last=False)

    # --- findings ---------------------------------------------------------------------------

    def _emit(self, state: WorkloadState, obs: Observation, found: list[Finding],
              finding: Finding) -> None:
        rank, attributable = _RANK[finding.severity], finding.attributable
        cooldown = state.cooldowns.get(finding.detector)
        if cooldown is not None and obs.ts < cooldown.until:
            # Quiet, unless graver, or attributable where the quiet began with a finding anyone
            # could have caused (a wrong-secret flood must not hide the agent's own refusals).
            if rank <= cooldown.rank and (cooldown.attributable or not attributable):
                return
            rank, attributable = max(rank, cooldown.rank), attributable or cooldown.attributable
        state.cooldowns[finding.detector] = Cooldown(
            obs.ts + self._settings.cooldown_s, rank, attributable)
        found.append(finding)

    def _loop(self, state: WorkloadState, obs: Observation, found: list[Finding]) -> None:
        if not obs.fingerprint:
            return
        fingerprint = obs.fingerprint[:MAX_FINGERPRINT]
        ring = state.loops.pop(fingerprint, None)  # re-inserted last: most recently used
        if ring is None:
            ring = Ring(RING_BUCKETS)
            if len(state.loops) >= MAX_FINGERPRINTS:
                # A loop refreshes its own entry, so only 16 other requests between two of
                # its repeats could push it out.
                del state.loops[next(iter(state.loops))]
        state.loops[fingerprint] = ring
        ring.add(int(obs.ts // self._loop_step), 1)
        count = ring.total()
        loop = self._settings.loop
        if count < loop.threshold:
            return
        self._emit(state, obs, found, Finding(
            "loop", "critical",
            f"{_who(obs)} repeated one request {count} times in {loop.window_s} s",
            {"fingerprint": fingerprint[:16], "count": count, "window_s": loop.window_s,
             "model": _printable(obs.model)}))

    def _failures(self, state: WorkloadState, obs: Observation, found: list[Finding]) -> None:
        step = int(obs.ts // self._failure_step)
        state.refusals.add(step, 1)
        state.refusals_authenticated.add(step, 1 if obs.authenticated else 0)
        reason = _reason(obs.refusal)
        if reason not in state.refusal_reasons and len(state.refusal_reasons) >= MAX_REASONS:
            reason = "other"
        state.refusal_reasons.setdefault(reason, Ring(RING_BUCKETS)).add(step, 1)
        total = state.refusals.total()
        failures = self._settings.failures
        if total < failures.threshold:
            return
        authenticated = state.refusals_authenticated.total()
        attributable = authenticated >= failures.threshold
        evidence: Evidence = {"count": total, "authenticated": authenticated,
                              "window_s": failures.window_s}
        for name, ring in state.refusal_reasons.items():
            ring.roll(step)
            if ring.total():
                evidence[f"reason_{name}"] = ring.total()
        summary = f"{_who(obs)} was refused {total} times in {failures.window_s} s"
        if not attributable:
            summary += (f", {total - authenticated} of them unauthenticated"
                        " (anyone who knows its client id can cause these)")
        self._emit(state, obs, found, Finding("failures", "warning", summary, evidence,
                                              attributable=attributable))

    def _velocity(self, state: WorkloadState, obs: Observation, found: list[Finding]) -> None:
        step = int(obs.ts // self._step_s)
        self._close_steps(state, obs, step)
        state.steps.add(step, _amount(obs.cost_micros), _amount(obs.tokens))
        window = state.steps.window()
        line, source = self._line(state, obs)
        if not self._is_hot(window, line):
            return  # a finding shows a hot window, never the calm after one
        state.hot |= 1  # the current step counts at once: no waiting for its end
        hot = (state.hot & self._hot_mask).bit_count()
        if hot < self._k:
            return
        velocity = self._settings.velocity
        spend, tokens = window.spend, window.tokens
        evidence: Evidence = {
            "spend_micros": spend, "tokens": tokens, "source": source,
            "baseline_micros": round(line[0]) if line else None,
            "baseline_tokens": round(line[1]) if line else None,
            "factor": velocity.factor, "floor_micros": velocity.floor_micros,
            "window_s": velocity.window_s, "hot_windows": hot, "of_windows": velocity.n,
        }
        if line is None:
            against = f"with no baseline yet (floor {_dollars(velocity.floor_micros)})"
        else:
            whose = "its own" if source == "own" else "its peers'"
            against = f"against {whose} baseline of {_dollars(line[0])} and {round(line[1])} tokens"
        self._emit(state, obs, found, Finding(
            "velocity", "critical",
            f"{_who(obs)} spent {_dollars(spend)} and {tokens} tokens in {velocity.window_s} s, "
            f"{against}", evidence))

    def _close_steps(self, state: WorkloadState, obs: Observation, step: int) -> None:
        """Close the steps between the last observation's and ``step``: judge each closing
        window, learn it unless hot, and fold idle steps in at O(1)."""
        steps = state.steps
        last = steps.step
        if last < 0 or step <= last:
            if last - step >= STEPS_PER_WINDOW:
                state.hot = 0  # the clock went far back: the window restarts (Steps.roll)
            steps.roll(step)
            return
        gap = step - last
        hot = bool(state.hot & 1)
        for closing in range(last, last + min(gap, STEPS_PER_WINDOW)):
            steps.roll(closing)
            window = steps.window()
            # Without observations a window only empties, so only a hot one can stay hot.
            if hot and closing > last:
                hot = self._is_hot(window, self._line(state, obs)[0])
            if not hot:
                # A hot window is never learned, so an attack cannot teach itself normal.
                self._learn(state, obs, window, (closing + 1) * self._step_s)
            state.hot = ((state.hot | hot) << 1) & self._hot_mask
        idle = gap - STEPS_PER_WINDOW  # whole windows with nothing in them
        if idle > 0:
            state.own.add_zeros(self._ln_decay, idle)
            state.windows = min(state.windows + idle, COUNT_CAP)
            state.hot = (state.hot << min(idle, _MAX_HOT_SHIFT)) & self._hot_mask
        steps.roll(step)

    def _learn(self, state: WorkloadState, obs: Observation, window: WindowSums,
               at: float) -> None:
        if state.windows < self._mature:
            state.own.add(self._decay, window)
        else:
            state.own.add_clipped(self._decay, window)
            # Peers learn what an active member spends: idle windows would make a tenant with
            # many sleeping agents flag every newcomer.
            if window.spend or window.tokens:
                key, peers = self._peers(obs)
                group = peers.baseline
                elapsed = max(0.0, at - group.at)
                group.add(0.5 ** (elapsed / self._settings.velocity.half_life_s), window)
                group.at = max(group.at, at)
                self._dirty.add(key)
        state.windows = min(state.windows + 1, COUNT_CAP)

    def _line(self, state: WorkloadState,
              obs: Observation) -> tuple[tuple[float, float] | None, str]:
        if state.windows >= self._mature:
            return state.own.line(), "own"
        _, peers = self._peers(obs)
        if peers.baseline.weight >= self._mature:
            return peers.baseline.line(), "peers"
        return None, "floor"

    def _is_hot(self, window: WindowSums, line: tuple[float, float] | None) -> bool:
        velocity = self._settings.velocity
        if window.spend < velocity.floor_micros or window.spend + window.tokens <= 0:
            return False
        if line is None:
            return True
        return (window.spend >= velocity.factor * line[0]
                or window.tokens >= velocity.factor * line[1])

    def _new_model(self, state: WorkloadState, obs: Observation, found: list[Finding]) -> None:
        if not obs.model:
            return
        settings = self._settings.new_model
        model = obs.model[:MAX_NAME]
        price = _amount(obs.price_micros_per_mtok)
        seen = state.models.pop(model, None)
        is_new = seen is None or obs.ts - seen[0] > settings.baseline_window_s
        if is_new and state.model_calls >= settings.min_baseline_calls:
            self._new_model_finding(state, obs, found, price, seen[1] if seen else None)
        state.models[model] = (max(obs.ts, seen[0]) if seen else obs.ts, price)
        if len(state.models) > MAX_MODELS:
            del state.models[next(iter(state.models))]
        state.model_calls = min(state.model_calls + 1, COUNT_CAP)

    def _new_model_finding(self, state: WorkloadState, obs: Observation, found: list[Finding],
                           price: int, expired_price: int | None) -> None:
        window = self._settings.new_model.baseline_window_s
        live = [p for ts, p in state.models.values() if obs.ts - ts <= window]
        # After a long silence nothing is live: the models it used before (this one too) are
        # still the fairest yardstick for the price.
        before = [p for _, p in state.models.values()]
        if expired_price is not None:
            before.append(expired_price)
        dearest = max(live or before or [0])
        ratio: float | None
        if dearest > 0:
            ratio = price / dearest
        elif price > 0:
            ratio = None  # priced where every usual model was free: dearer beyond any ratio
        else:
            ratio = 1.0
        if ratio is not None and ratio <= 1.0:
            severity = "info"
        elif ratio is not None and ratio <= _NEW_MODEL_WARNING:
            severity = "warning"
        else:
            severity = "critical"
        price_text = (f"{ratio:.1f}x the price of its dearest usual model" if ratio is not None
                      else "no priced model in its baseline")
        self._emit(state, obs, found, Finding(
            "new_model", severity,
            f"{_who(obs)} called model {_printable(obs.model)}, unused by it in the last "
            f"{window / 86_400:g} days ({price_text})",
            {"model": _printable(obs.model), "price_micros_per_mtok": price,
             "baseline_max_price_micros_per_mtok": dearest,
             "ratio": round(ratio, 2) if ratio is not None else None,
             "baseline_models": len(live), "window_s": window}))

    def _origin(self, state: WorkloadState, obs: Observation, found: list[Finding]) -> None:
        ip = _ip(obs.client_ip)
        if ip is None:
            return
        origin = self._settings.origin
        network = _network(ip, origin.ipv4_prefix if ip.version == 4 else origin.ipv6_prefix)
        if obs.cidrs:
            if not any(ip in allowed for allowed in _cidrs(obs.cidrs)):
                self._emit(state, obs, found, Finding(
                    "origin", "warning",
                    f"{_who(obs)} called from {network}, outside its configured networks",
                    {"ip": str(ip), "network": network, "configured": True,
                     "known_networks": len(obs.cidrs)}))
            return
        known = state.networks.pop(network, None)  # re-inserted last: most recently seen
        if known is None and state.origin_calls >= origin.min_baseline_calls:
            self._emit(state, obs, found, Finding(
                "origin", "warning",
                f"{_who(obs)} called from {network}, a network it has not called from before",
                {"ip": str(ip), "network": network, "configured": False,
                 "known_networks": len(state.networks)}))
        state.networks[network] = obs.ts
        if len(state.networks) > MAX_NETWORKS:
            del state.networks[next(iter(state.networks))]
        state.origin_calls = min(state.origin_calls + 1, COUNT_CAP)


# --- small pure helpers (cached where parsing dominates the cost of an observation) ------------


def _who(obs: Observation) -> str:
    return obs.kind if obs.kind in _KINDS else "workload"


def _amount(value: int) -> int:
    return min(max(int(value), 0), _MAX_AMOUNT)


def _dollars(micros: float) -> str:
    return f"${micros / 1_000_000:,.2f}"


def _printable(text: str | None, limit: int = 64) -> str | None:
    if text is None:
        return None
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _reason(refusal: str | None) -> str:
    if not refusal:
        return "unspecified"
    if len(refusal) > 32 or not set(refusal) <= _REASON_CHARS:
        return "other"
    return refusal


@lru_cache(maxsize=8192)
def _ip(text: str | None) -> IPAddress | None:
    if not text or len(text) > 64:
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # the same IPv4 client seen through a dual-stack socket
    return ip


@lru_cache(maxsize=8192)
def _network(ip: IPAddress, prefix: int) -> str:
    host_bits = ip.max_prefixlen - prefix
    masked = (int(ip) >> host_bits) << host_bits
    base = ipaddress.IPv4Address(masked) if ip.version == 4 else ipaddress.IPv6Address(masked)
    return f"{base}/{prefix}"


@lru_cache(maxsize=1024)
def _cidrs(cidrs: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    # An entry that does not parse (the policy validates them) allows nothing: fail closed.
    out: list[IPNetwork] = []
    for cidr in cidrs:
        try:
            out.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            continue
    return tuple(out)
