"""The detectors' memory: constant-size counters and baselines per workload and per peer group,
and their JSON form.

Every structure here has a fixed size (a ring of buckets, a few weighted sums) or a hard cap
with the oldest entry evicted, so a workload's state is O(1) however long or hostile its
traffic. A state read back from the database is checked field by field; a section that fails
any check starts fresh instead of raising, because the database row is the one input here
that nobody validated on the way in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

STATE_VERSION = 1
STEPS_PER_WINDOW = 5  # velocity slides in steps of window_s / 5
RING_BUCKETS = 10  # loop and failure windows: counts are never older than the window, at most 1/10 younger
MAX_FINGERPRINTS = 16
MAX_MODELS = 64
MAX_NETWORKS = 32
MAX_REASONS = 8  # refusal reasons tracked apart; any further reason counts as "other"
MAX_NAME = 256  # a model name, a network, a reason (longer ones are cut)
MAX_FINGERPRINT = 64
COUNT_CAP = 2**31  # counters saturate here, far beyond any threshold the settings allow
SPREAD_K = 3.0  # baseline = mean + 3 x spread (see Baseline)
CLIP_MIN_SPREAD = 0.25  # a learned sum is winsorised at mean + 3 x max(spread, mean / 4)
# A velocity step's sums saturate here (a trillion calls of a billion dollars), so a written
# state always reads back; a baseline's weighted sums stay below the read bounds because the
# weight never exceeds 1 / (1 - decay) < 3e7.
_STEP_CAPS = (10**12, 10**27, 10**27, 10**54, 10**54)  # calls, spend, tokens, and squares
_MAX_WEIGHT = 1e8  # above 1 / (1 - decay) for any settings
_MAX_AMOUNT = 1e40  # a weighted sum of calls, micros or tokens read back
_MAX_SQUARES = 1e80  # a weighted sum of squares read back
_MAX_TS = 1e13
_EXACT_GAP = 64  # idle steps summed one by one before the closed form takes over


class BadState(ValueError):
    """A persisted state failed a check; its section starts fresh."""


# --- checked reads of untrusted JSON -------------------------------------------------------


def _int(value: object, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise BadState("not an int in range")
    return value


def _num(value: object, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadState("not a number")
    try:
        number = float(value)
    except OverflowError:
        raise BadState("not a finite number") from None
    if not (math.isfinite(number) and lo <= number <= hi):
        raise BadState("not a finite number in range")
    return number


def _str(value: object, max_len: int) -> str:
    if type(value) is not str or not 0 < len(value) <= max_len:
        raise BadState("not a short string")
    return value


def _map(value: object, max_len: int) -> Mapping[str, object]:
    if not isinstance(value, Mapping) or len(value) > max_len:
        raise BadState("not a small object")
    return value


def _list(value: object, length: int) -> list[object]:
    if type(value) is not list or len(value) != length:
        raise BadState("not a list of the expected length")
    return value


def _is_version(value: object) -> bool:
    return type(value) is int and value == STATE_VERSION  # True == 1, but is no version


# --- a sliding window of counts --------------------------------------------------------------


class Ring:
    """Counts in a sliding window of ``len(counts)`` equal steps, the newest one partial.

    The total never includes anything older than the window, so a detector firing on it has
    seen at least its threshold within ``window_s``; it may miss up to one step's worth at the
    old edge, which only delays a finding by at most one step.
    """

    __slots__ = ("counts", "step")

    def __init__(self, size: int, step: int = -1) -> None:
        self.counts = [0] * size
        self.step = step  # -1: nothing counted yet

    def roll(self, step: int) -> None:
        if step == self.step:
            return
        size = len(self.counts)
        if step > self.step:
            if step - self.step >= size:
                self.counts = [0] * size
            else:
                for s in range(self.step + 1, step + 1):
                    self.counts[s % size] = 0
            self.step = step
        elif self.step - step >= size:
            # The clock went far back, or the step's length changed with the settings: the
            # old counts cannot be placed in time any more.
            self.counts = [0] * size
            self.step = step
        # A step slightly behind (clock skew between callers) counts into the newest bucket.

    def add(self, step: int, n: int) -> None:
        self.roll(step)
        index = self.step % len(self.counts)
        self.counts[index] = min(self.counts[index] + n, COUNT_CAP)

    def total(self) -> int:
        return sum(self.counts)

    def to_json(self) -> list[int]:
        return [self.step, *self.counts]

    @classmethod
    def from_json(cls, value: object, size: int) -> Ring:
        items = _list(value, size + 1)
        ring = cls(size, _int(items[0], -1, 2**62))
        ring.counts = [_int(c, 0, COUNT_CAP) for c in items[1:]]
        return ring


class Steps:
    """The velocity window by step: per step, its calls, spend, tokens, and the sums of its
    calls' squared spend and squared tokens; the newest step partial. Rolled like
    :class:`Ring`, all five together."""

    __slots__ = ("buckets", "step")

    def __init__(self) -> None:
        self.buckets = [[0, 0, 0, 0, 0] for _ in range(STEPS_PER_WINDOW)]
        self.step = -1  # -1: nothing counted yet

    def roll(self, step: int) -> None:
        if step == self.step:
            return
        if step > self.step:
            for s in range(max(self.step + 1, step - STEPS_PER_WINDOW + 1), step + 1):
                self.buckets[s % STEPS_PER_WINDOW] = [0, 0, 0, 0, 0]
            self.step = step
        elif self.step - step >= STEPS_PER_WINDOW:  # far back: see Ring.roll
            self.buckets = [[0, 0, 0, 0, 0] for _ in range(STEPS_PER_WINDOW)]
            self.step = step

    def add(self, step: int, cost: int, tokens: int) -> None:
        self.roll(step)
        bucket = self.buckets[self.step % STEPS_PER_WINDOW]
        for i, value in enumerate((1, cost, tokens, cost * cost, tokens * tokens)):
            bucket[i] = min(bucket[i] + value, _STEP_CAPS[i])

    def window(self) -> WindowSums:
        a, b, c, d, e = self.buckets  # unrolled: this runs for every call and closed step
        return WindowSums(a[0] + b[0] + c[0] + d[0] + e[0], a[1] + b[1] + c[1] + d[1] + e[1],
                          a[2] + b[2] + c[2] + d[2] + e[2], a[3] + b[3] + c[3] + d[3] + e[3],
                          a[4] + b[4] + c[4] + d[4] + e[4])

    def to_json(self) -> list[object]:
        return [self.step, *(list(bucket) for bucket in self.buckets)]

    @classmethod
    def from_json(cls, value: object) -> Steps:
        items = _list(value, STEPS_PER_WINDOW + 1)
        steps = cls()
        steps.step = _int(items[0], -1, 2**62)
        steps.buckets = [[_int(v, 0, cap) for v, cap in zip(_list(bucket, 5), _STEP_CAPS, strict=True)]
                         for bucket in items[1:]]
        return steps


# --- a decayed mean and spread -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WindowSums:
    """One window: its calls, spend and tokens, and the sums of its calls' squared spend and
    squared tokens."""

    calls: int
    spend: int
    tokens: int
    spend_sq: int
    tokens_sq: int


@dataclass(slots=True)
class Baseline:
    """Decayed weighted sums of window sums: for spend and for tokens, the mean, the mean
    absolute deviation (MAD) and the mean sum of squared calls; and the mean number of calls.

    Sums rather than a plain EWMA so the estimate is unbiased from the first window (an EWMA
    started at zero would read ~3% of the truth after an hour with a day's half-life).

    ``line()``, the baseline a hot window is ``factor`` times above, is mean + 3 x spread,
    the spread being the larger of two measures, each covering what the other misses:

    * the MAD, the robust spread of the windows: one past spike moves it linearly, not
      quadratically as it would a standard deviation. For normal noise MAD ~ 0.8 sigma, so
      mean + 3 MAD is about the 99th percentile of ordinary windows; a day's rhythm (a
      sinusoid's MAD is 0.64 of its amplitude) sits inside it. It suits busy workloads.
    * the lumpiness of calls: a window of a workload that calls a few times an hour moves by
      whole calls, and the MAD of mostly-empty windows says nothing of a window with three
      expensive calls instead of one. For Poisson arrivals a window's standard deviation is
      sqrt(E[calls]) x the root mean square call (compound Poisson); floored at one such
      call, since a workload calling once an hour still sends two in a window now and then.

    Measured: with the MAD alone, a workload calling once an hour is flagged for eight of its
    own calls in five minutes (and the steady replay flagged an honest five-call burst).
    """

    weight: float = 0.0
    calls: float = 0.0
    spend: float = 0.0
    spend_dev: float = 0.0
    spend_sq: float = 0.0
    tokens: float = 0.0
    tokens_dev: float = 0.0
    tokens_sq: float = 0.0
    at: float = 0.0  # the time of the last sample (peer groups decay by time)

    def add(self, decay: float, window: WindowSums) -> None:
        """One window, after the older ones were multiplied by ``decay``."""
        if self.weight > 0:
            spend_dev = abs(window.spend - self.spend / self.weight)
            tokens_dev = abs(window.tokens - self.tokens / self.weight)
        else:
            spend_dev = tokens_dev = 0.0
        self.weight = self.weight * decay + 1.0
        self.calls = self.calls * decay + window.calls
        self.spend = self.spend * decay + window.spend
        self.tokens = self.tokens * decay + window.tokens
        self.spend_dev = self.spend_dev * decay + spend_dev
        self.tokens_dev = self.tokens_dev * decay + tokens_dev
        self.spend_sq = self.spend_sq * decay + window.spend_sq
        self.tokens_sq = self.tokens_sq * decay + window.tokens_sq

    def add_clipped(self, decay: float, window: WindowSums) -> None:
        """A window winsorised first at mean + 3 x max(spread, mean / 4).

        Hot windows are never learned, but a workload riding just under the hot line could
        otherwise double its baseline every ~35 minutes and reach any spend unreported; with
        the clip a baseline grows by at most its own spread per window learned, which takes
        many hours to double, while a genuine 3x level shift is still learned within a day.
        The mean / 4 keeps a perfectly regular workload from being frozen at its first level.
        """
        if self.weight <= 0:
            self.add(decay, window)
            return
        spend_cap = self._cap(self.spend, self.spend_dev, self.spend_sq)
        tokens_cap = self._cap(self.tokens, self.tokens_dev, self.tokens_sq)
        # A sum of squares never exceeds the square of the sum: cap it with the sum.
        self.add(decay, WindowSums(
            window.calls, min(window.spend, spend_cap), min(window.tokens, tokens_cap),
            min(window.spend_sq, spend_cap * spend_cap),
            min(window.tokens_sq, tokens_cap * tokens_cap)))

    def _cap(self, total: float, dev: float, squares: float) -> int:
        mean = total / self.weight
        spread = max(self._spread(dev, squares), CLIP_MIN_SPREAD * mean)
        return math.ceil(mean + SPREAD_K * spread)

    def _spread(self, dev: float, squares: float) -> float:
        mad = dev / self.weight
        if self.calls <= 0:
            return mad
        root_mean_square_call = math.sqrt(squares / self.calls)
        calls_per_window = self.calls / self.weight
        return max(mad, root_mean_square_call * max(1.0, math.sqrt(calls_per_window)))

    def add_zeros(self, ln_decay: float, count: int) -> None:
        """``count`` idle windows (sums zero), in closed form so a week offline costs O(1)."""
        if count <= 0:
            return
        inv_weights = _sum_inverse_weights(self.weight, ln_decay, count)
        total_decay = math.exp(ln_decay * count)
        # Each idle window deviates from the mean by the mean itself, and the mean decays
        # by ``decay`` per window: sum_j decay^(count-1-j) * decay^j * S / W_j.
        spend_dev = math.exp(ln_decay * (count - 1)) * self.spend * inv_weights
        tokens_dev = math.exp(ln_decay * (count - 1)) * self.tokens * inv_weights
        self.spend_dev = self.spend_dev * total_decay + spend_dev
        self.tokens_dev = self.tokens_dev * total_decay + tokens_dev
        self.calls *= total_decay
        self.spend *= total_decay
        self.tokens *= total_decay
        self.spend_sq *= total_decay
        self.tokens_sq *= total_decay
        # W_count = W * decay^count + (1 - decay^count) / (1 - decay), by expm1 for precision
        # when decay is within 1e-8 of 1.
        self.weight = self.weight * total_decay + math.expm1(ln_decay * count) / math.expm1(ln_decay)

    def line(self) -> tuple[float, float]:
        """The baseline of spend and of tokens: mean + 3 x spread."""
        if self.weight <= 0:
            return 0.0, 0.0
        return (self.spend / self.weight + SPREAD_K * self._spread(self.spend_dev, self.spend_sq),
                self.tokens / self.weight
                + SPREAD_K * self._spread(self.tokens_dev, self.tokens_sq))

    def to_json(self) -> list[float]:
        return [self.weight, self.calls, self.spend, self.spend_dev, self.spend_sq,
                self.tokens, self.tokens_dev, self.tokens_sq, self.at]

    @classmethod
    def from_json(cls, value: object) -> Baseline:
        w, calls, s, sd, ssq, t, td, tsq, at = _list(value, 9)
        weight = _num(w, 0.0, _MAX_WEIGHT)
        if 0 < weight < 1:
            raise BadState("a weight is 0 or at least 1 (one window learned)")
        return cls(weight, _num(calls, 0.0, _MAX_AMOUNT),
                   _num(s, 0.0, _MAX_AMOUNT), _num(sd, 0.0, _MAX_AMOUNT),
                   _num(ssq, 0.0, _MAX_SQUARES), _num(t, 0.0, _MAX_AMOUNT),
                   _num(td, 0.0, _MAX_AMOUNT), _num(tsq, 0.0, _MAX_SQUARES),
                   _num(at, 0.0, _MAX_TS))


def _sum_inverse_weights(weight: float, ln_decay: float, count: int) -> float:
    """sum_{j<count} 1/W_j, where W_j = c + (weight - c) * decay^j and c = 1/(1 - decay) is
    the weight's fixed point: exact for the first steps, then the integral of the same
    (smooth, monotone) function, whose antiderivative is (x - ln(c + b e^{kx}) / k) / c."""
    if weight <= 0:
        return 0.0  # no mean yet, so idle windows deviate from nothing
    c = -1.0 / math.expm1(ln_decay)
    b = weight - c
    exact = min(count, _EXACT_GAP)
    total = sum(1.0 / (c + b * math.exp(ln_decay * j)) for j in range(exact))
    if count > exact:
        def antiderivative(x: float) -> float:
            return (x - math.log(c + b * math.exp(ln_decay * x)) / ln_decay) / c
        total += antiderivative(count - 0.5) - antiderivative(exact - 0.5)
    return total


# --- the states --------------------------------------------------------------------------------


@dataclass(slots=True)
class Cooldown:
    until: float
    rank: int  # the severity that started it: a graver finding still gets through
    attributable: bool  # an unattributable finding must not hide an attributable one


@dataclass(slots=True)
class WorkloadState:
    cooldowns: dict[str, Cooldown] = field(default_factory=dict)
    # loop: one ring per recent fingerprint, in least-recently-used order.
    loops: dict[str, Ring] = field(default_factory=dict)
    # failures: all refusals, the authenticated ones, and by reason.
    refusals: Ring = field(default_factory=lambda: Ring(RING_BUCKETS))
    refusals_authenticated: Ring = field(default_factory=lambda: Ring(RING_BUCKETS))
    refusal_reasons: dict[str, Ring] = field(default_factory=dict)
    # velocity: the window by step, hot flags (bit 0: the current step), and the baseline
    # with the number of windows it learned.
    steps: Steps = field(default_factory=Steps)
    hot: int = 0
    own: Baseline = field(default_factory=Baseline)
    windows: int = 0
    # new_model: model -> (last used, price), least recently used first.
    model_calls: int = 0
    models: dict[str, tuple[float, int]] = field(default_factory=dict)
    # origin: learned network -> last seen, least recently seen first.
    origin_calls: int = 0
    networks: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "v": STATE_VERSION,
            "cooldown": {k: [c.until, c.rank, c.attributable] for k, c in self.cooldowns.items()},
            "loop": {fp: ring.to_json() for fp, ring in self.loops.items()},
            "failures": {
                "all": self.refusals.to_json(),
                "authenticated": self.refusals_authenticated.to_json(),
                "reasons": {r: ring.to_json() for r, ring in self.refusal_reasons.items()},
            },
            "velocity": {
                "steps": self.steps.to_json(), "hot": self.hot, "own": self.own.to_json(),
                "windows": self.windows,
            },
            "new_model": {"calls": self.model_calls,
                          "models": {m: [ts, price] for m, (ts, price) in self.models.items()}},
            "origin": {"calls": self.origin_calls, "networks": dict(self.networks)},
        }

    @classmethod
    def from_json(cls, raw: object) -> WorkloadState:
        """Never raises: a section failing any check is left fresh."""
        state = cls()
        if not isinstance(raw, Mapping) or not _is_version(raw.get("v")):
            return state
        for name, reader in _SECTIONS.items():
            try:
                reader(state, raw.get(name))
            except Exception:  # noqa: S112 -- hostile or corrupt input of any shape: start fresh
                continue
        return state


def _read_cooldowns(state: WorkloadState, value: object) -> None:
    cooldowns = {}
    for name, entry in _map(value, 16).items():
        until, rank, attributable = _list(entry, 3)
        if type(attributable) is not bool:
            raise BadState("not a flag")
        cooldowns[_str(name, 32)] = Cooldown(_num(until, 0, _MAX_TS), _int(rank, 0, 2), attributable)
    state.cooldowns = cooldowns


def _read_loops(state: WorkloadState, value: object) -> None:
    state.loops = {_str(fp, MAX_FINGERPRINT): Ring.from_json(ring, RING_BUCKETS)
                   for fp, ring in _map(value, MAX_FINGERPRINTS).items()}


def _read_failures(state: WorkloadState, value: object) -> None:
    section = _map(value, 3)
    refusals = Ring.from_json(section.get("all"), RING_BUCKETS)
    authenticated = Ring.from_json(section.get("authenticated"), RING_BUCKETS)
    reasons = {_str(r, 32): Ring.from_json(ring, RING_BUCKETS)
               for r, ring in _map(section.get("reasons"), MAX_REASONS + 1).items()}
    state.refusals, state.refusals_authenticated, state.refusal_reasons = (
        refusals, authenticated, reasons)


def _read_velocity(state: WorkloadState, value: object) -> None:
    section = _map(value, 4)
    steps = Steps.from_json(section.get("steps"))
    hot = _int(section.get("hot"), 0, 2**100)
    own = Baseline.from_json(section.get("own"))
    windows = _int(section.get("windows"), 0, COUNT_CAP)
    state.steps, state.hot, state.own, state.windows = steps, hot, own, windows


def _read_new_model(state: WorkloadState, value: object) -> None:
    section = _map(value, 2)
    calls = _int(section.get("calls"), 0, COUNT_CAP)
    models = {}
    for model, entry in _map(section.get("models"), MAX_MODELS).items():
        ts, price = _list(entry, 2)
        models[_str(model, MAX_NAME)] = (_num(ts, 0, _MAX_TS), _int(price, 0, 10**15))
    state.model_calls, state.models = calls, models


def _read_origin(state: WorkloadState, value: object) -> None:
    section = _map(value, 2)
    calls = _int(section.get("calls"), 0, COUNT_CAP)
    networks = {_str(net, MAX_NAME): _num(ts, 0, _MAX_TS)
                for net, ts in _map(section.get("networks"), MAX_NETWORKS).items()}
    state.origin_calls, state.networks = calls, networks


_SECTIONS = {
    "cooldown": _read_cooldowns,
    "loop": _read_loops,
    "failures": _read_failures,
    "velocity": _read_velocity,
    "new_model": _read_new_model,
    "origin": _read_origin,
}


@dataclass(slots=True)
class PeerState:
    """A (tenant, kind) group's baseline of its mature members' active window sums."""

    baseline: Baseline = field(default_factory=Baseline)

    def to_json(self) -> dict[str, object]:
        return {"v": STATE_VERSION, "baseline": self.baseline.to_json()}

    @classmethod
    def from_json(cls, raw: object) -> PeerState:
        try:
            if isinstance(raw, Mapping) and _is_version(raw.get("v")):
                return cls(Baseline.from_json(raw.get("baseline")))
        except Exception:  # noqa: S110 -- hostile or corrupt input of any shape: start fresh
            pass
        return cls()
