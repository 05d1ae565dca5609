"""Rate limits: rpm, tpm and the burst spend window hold exactly, across threads, with a
Retry-After that names the moment a refused request would fit. Time is injected: nothing sleeps."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import RateLimited
from broker.identity.policy import Burst, Policy, Rate
from broker.money.limits import InMemoryLimiter, Limiter, Usage


def _policy(rpm: int | None = None, tpm: int | None = None,
            burst: tuple[int, int] | None = None) -> Policy:
    return Policy(
        rate=Rate(rpm=rpm, tpm=tpm),
        burst=Burst(window_s=burst[0], limit_micros=burst[1]) if burst else None,
    )


T = TypeVar("T")


def _sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine of the in-memory limiter, which never waits, to its end: no event loop
    per call, so the property test below stays fast."""
    try:
        coro.send(None)
    except StopIteration as done:
        value: T = done.value
        return value
    coro.close()
    raise AssertionError("the in-memory limiter waited")


def _refused(limiter: Limiter, policy: Policy, now: float, *, key: str = "wl_a", tokens: int = 0,
             cost: int = 0) -> RateLimited:
    with pytest.raises(RateLimited) as info:
        _sync(limiter.admit(key, policy, tokens=tokens, cost_micros=cost, now=now))
    return info.value


def _settle(limiter: Limiter, policy: Policy, now: float, *, key: str = "wl_a", held_tokens: int = 0,
            used_tokens: int = 0, held_micros: int = 0, used_micros: int = 0) -> None:
    _sync(limiter.settle(key, policy, ticket="", held_tokens=held_tokens,
                         used_tokens=used_tokens, held_micros=held_micros,
                         used_micros=used_micros, now=now))


def test_in_memory_limiter_takes_exactly_the_protocols_arguments() -> None:
    """The gateway calls only what :class:`Limiter` declares, by keyword: a limiter whose
    methods drifted from it (a renamed, added or re-defaulted argument) fails here at run time,
    not only under mypy."""
    for name in ("admit", "settle"):
        declared = inspect.signature(getattr(Limiter, name))
        assert inspect.signature(getattr(InMemoryLimiter, name)) == declared, name
        assert inspect.iscoroutinefunction(getattr(InMemoryLimiter, name)), name


# --- requests per minute -------------------------------------------------------------------


def test_rpm_admits_exactly_the_limit_in_any_sliding_minute() -> None:
    limiter, policy = InMemoryLimiter(), _policy(rpm=3)
    for t in (0.0, 10.0, 20.0):
        _sync(limiter.admit("wl_a", policy, tokens=0, cost_micros=0, now=t))
    refused = _refused(limiter, policy, 59.999)
    assert refused.status == 429 and refused.code == "rate_limit_exceeded"
    assert refused.headers == {"retry-after": "1"}
    # At 60 s the request of t=0 has left the window (it is (now - 60, now]).
    _sync(limiter.admit("wl_a", policy, tokens=0, cost_micros=0, now=60.0))
    assert _refused(limiter, policy, 61.0).headers["retry-after"] == "9"


def test_retry_after_is_when_the_oldest_counted_request_leaves_the_window() -> None:
    limiter, policy = InMemoryLimiter(), _policy(rpm=2)
    _sync(limiter.admit("wl_a", policy, tokens=0, cost_micros=0, now=0.0))
    _sync(limiter.admit("wl_a", policy, tokens=0, cost_micros=0, now=30.0))
    retry = int(_refused(limiter, policy, 45.0).headers["retry-after"])
    assert retry == 15
    _refused(limiter, policy, 45.0 + retry - 0.5)
    _sync(limiter.admit("wl_a", policy, tokens=0, cost_micros=0, now=45.0 + retry))


def test_retry_after_rounds_up_to_a_positive_whole_second() -> None:
    limiter, policy = InMemoryLimiter(), _policy(rpm=1)
    _sync(limiter.admit("wl_a", policy, tokens=0, cost_micros=0, now=0.25))
    assert _refused(limiter, policy, 1.0).headers["retry-after"] == "60"  # 59.25 s, rounded up
    assert _refused(limiter, policy, 60.2).headers["retry-after"] == "1"  # 0.05 s, still 1


def test_a_refused_request_counts_nothing() -> None:
    limiter, policy = InMemoryLimiter(), _policy(rpm=1, tpm=100, burst=(60, 100))
    _sync(limiter.admit("wl_a", policy, tokens=10, cost_micros=10, now=0.0))
    _settle(limiter, policy, 0.5, held_tokens=10, used_tokens=0, held_micros=10, used_micros=0)
    for t in range(1, 60):
        _refused(limiter, policy, float(t), tokens=10, cost=10)
    _sync(limiter.admit("wl_a", policy, tokens=90, cost_micros=90, now=60.0))


def test_keys_are_limited_independently() -> None:
    limiter, policy = InMemoryLimiter(), _policy(rpm=1)
    _sync(limiter.admit("wl_a", policy, tokens=0, cost_micros=0, now=0.0))
    _sync(limiter.admit("wl_b", policy, tokens=0, cost_micros=0, now=0.0))
    _refused(limiter, policy, 1.0, key="wl_a")


def test_a_policy_without_limits_admits_everything() -> None:
    limiter = InMemoryLimiter()
    for i in range(1000):
        _sync(limiter.admit("wl_a", Policy(), tokens=10**6, cost_micros=10**6, now=i / 1000))


# --- tokens per minute ---------------------------------------------------------------------


def test_tpm_holds_the_worst_case_until_settle_corrects_it_down() -> None:
    limiter, policy = InMemoryLimiter(), _policy(tpm=1000)
    _sync(limiter.admit("wl_a", policy, tokens=800, cost_micros=0, now=0.0))
    # 800 held + 300 > 1000; only the running request stands in the way: retry as soon as it may end.
    assert _refused(limiter, policy, 1.0, tokens=300).headers["retry-after"] == "1"
    _settle(limiter, policy, 2.0, held_tokens=800, used_tokens=100)
    _sync(limiter.admit("wl_a", policy, tokens=300, cost_micros=0, now=3.0))  # 100 used + 300 held
    _settle(limiter, policy, 5.0, held_tokens=300, used_tokens=300)
    # 100 (settled at 2 s) + 300 (settled at 5 s) + 700 > 1000: 100 must leave, at 62 s.
    assert _refused(limiter, policy, 6.0, tokens=700).headers["retry-after"] == "56"
    _refused(limiter, policy, 61.9, tokens=700)
    _sync(limiter.admit("wl_a", policy, tokens=700, cost_micros=0, now=62.0))


def test_tpm_counts_usage_above_the_hold_when_the_estimate_was_short() -> None:
    limiter, policy = InMemoryLimiter(), _policy(tpm=1000)
    _sync(limiter.admit("wl_a", policy, tokens=500, cost_micros=0, now=0.0))
    _settle(limiter, policy, 1.0, held_tokens=500, used_tokens=1200)
    assert _refused(limiter, policy, 2.0, tokens=0).headers["retry-after"] == "59"


def test_a_request_over_the_limit_on_its_own_is_refused_with_the_whole_window() -> None:
    limiter, policy = InMemoryLimiter(), _policy(tpm=1000, burst=(600, 50))
    refused = _refused(limiter, policy, 0.0, tokens=1001)
    assert refused.headers == {"retry-after": "60"}
    assert "alone" in refused.detail
    assert _refused(limiter, policy, 0.0, tokens=1, cost=51).headers == {"retry-after": "600"}


# --- burst spend window ---------------------------------------------------------------------


def test_burst_counts_spend_within_its_own_window() -> None:
    limiter, policy = InMemoryLimiter(), _policy(burst=(10, 1000))
    _sync(limiter.admit("wl_a", policy, tokens=0, cost_micros=600, now=0.0))
    _settle(limiter, policy, 1.0, held_micros=600, used_micros=600)
    refused = _refused(limiter, policy, 2.0, cost=500)
    assert refused.headers == {"retry-after": "9"}  # the 600 spent at 1 s leaves at 11 s
    assert "1000 micro-dollars per 10 s" in refused.detail
    _sync(limiter.admit("wl_a", policy, tokens=0, cost_micros=400, now=2.0))  # 600 + 400 fits exactly
    _refused(limiter, policy, 2.5, cost=1)
    _settle(limiter, policy, 3.0, held_micros=400, used_micros=0)
    _refused(limiter, policy, 10.9, cost=401)
    _sync(limiter.admit("wl_a", policy, tokens=0, cost_micros=1000, now=11.0))


def test_burst_hold_is_corrected_down_at_settle() -> None:
    limiter, policy = InMemoryLimiter(), _policy(burst=(60, 1000))
    _sync(limiter.admit("wl_a", policy, tokens=0, cost_micros=900, now=0.0))
    _refused(limiter, policy, 1.0, cost=200)
    _settle(limiter, policy, 2.0, held_micros=900, used_micros=100)
    _sync(limiter.admit("wl_a", policy, tokens=0, cost_micros=900, now=3.0))


def test_the_slowest_limit_sets_retry_after() -> None:
    limiter, policy = InMemoryLimiter(), _policy(rpm=1, burst=(300, 100))
    _sync(limiter.admit("wl_a", policy, tokens=0, cost_micros=100, now=0.0))
    _settle(limiter, policy, 0.0, held_micros=100, used_micros=100)
    refused = _refused(limiter, policy, 10.0, cost=1)
    assert refused.headers == {"retry-after": "290"}  # rpm frees at 60 s, the burst at 300 s
    assert "requests per minute" in refused.detail and "micro-dollars" in refused.detail


# --- concurrency ----------------------------------------------------------------------------


@pytest.mark.parametrize(("rpm", "tpm", "tokens", "expected"), [
    pytest.param(10, None, 0, 10, id="rpm"),
    pytest.param(None, 50, 7, 7, id="tpm"),
])
def test_threads_admitting_at_once_never_exceed_the_limit(
    rpm: int | None, tpm: int | None, tokens: int, expected: int
) -> None:
    limiter, policy = InMemoryLimiter(), _policy(rpm=rpm, tpm=tpm)
    threads_n = 48
    barrier = threading.Barrier(threads_n)
    admitted: list[bool] = []
    record = threading.Lock()

    def worker() -> None:
        barrier.wait()
        for _ in range(5):
            try:
                _sync(limiter.admit("wl_a", policy, tokens=tokens, cost_micros=0, now=100.0))
                ok = True
            except RateLimited:
                ok = False
            with record:
                admitted.append(ok)

    threads = [threading.Thread(target=worker) for _ in range(threads_n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert len(admitted) == threads_n * 5
    assert sum(admitted) == expected


# --- memory ---------------------------------------------------------------------------------


def test_idle_keys_are_pruned_as_traffic_goes_on() -> None:
    limiter, policy = InMemoryLimiter(), _policy(rpm=100, tpm=10_000)
    for i in range(1000):
        _sync(limiter.admit(f"wl_{i}", policy, tokens=5, cost_micros=0, now=0.0))
        _settle(limiter, policy, 1.0, key=f"wl_{i}", held_tokens=5, used_tokens=5)
    assert len(limiter) == 1000
    for i in range(1000):
        _sync(limiter.admit("wl_busy", Policy(), tokens=0, cost_micros=0, now=61.0 + i / 1000))
    assert len(limiter) == 1


def test_prune_keeps_keys_that_still_count() -> None:
    limiter = InMemoryLimiter()
    minute, burst = _policy(rpm=10), _policy(burst=(3600, 10**6))
    _sync(limiter.admit("running", minute, tokens=5, cost_micros=0, now=0.0))  # never settled yet
    _sync(limiter.admit("recent", minute, tokens=0, cost_micros=0, now=30.0))
    _settle(limiter, minute, 30.0, key="recent")
    _sync(limiter.admit("long-window", burst, tokens=0, cost_micros=5, now=0.0))
    _settle(limiter, burst, 1.0, key="long-window", held_micros=5, used_micros=5)
    _sync(limiter.admit("old", minute, tokens=0, cost_micros=0, now=0.0))
    _settle(limiter, minute, 0.0, key="old")

    assert limiter.prune(70.0) == 1  # "old"
    assert limiter.prune(95.0) == 1  # "recent": its request and settle left the minute at 90 s
    assert limiter.prune(3000.0) == 0  # "running" still runs, though its admission is long gone
    _settle(limiter, minute, 3000.0, key="running", held_tokens=5, used_tokens=5)
    assert limiter.prune(3059.0) == 0
    assert limiter.prune(3060.0) == 1  # "running": its 5 tokens left the minute
    assert limiter.prune(3600.0) == 0  # "long-window": its spend at 1 s counts until 3601 s
    assert limiter.prune(3601.0) == 1
    assert len(limiter) == 0


def test_a_log_stays_short_under_heavy_traffic() -> None:
    limiter, policy = InMemoryLimiter(), _policy(rpm=1_000_000, tpm=10**9)
    for i in range(20_000):
        now = i / 200  # 200 requests a second for 100 s
        _sync(limiter.admit("wl_a", policy, tokens=3, cost_micros=0, now=now))
        _settle(limiter, policy, now, held_tokens=3, used_tokens=2)
    state = limiter._keys["wl_a"]
    assert len(state.requests.entries) <= 601 and len(state.tokens.entries) <= 601
    assert 200 * 60 <= state.requests.total <= 200 * 61


# --- property: counted usage never exceeds a limit ----------------------------------------


@dataclass
class _Call:
    at: int
    tokens: int
    micros: int
    settled_at: int | None = None
    used_tokens: int = 0
    used_micros: int = 0


class _Reference:
    """The limits as stated, computed from the whole history (no logs, no merging)."""

    def __init__(self, rpm: int, tpm: int, window_s: int, limit_micros: int):
        self.rpm, self.tpm, self.window_s, self.limit = rpm, tpm, window_s, limit_micros
        self.calls: list[_Call] = []

    def usage(self, now: float, *, running_done: bool = False) -> tuple[int, int, int]:
        """(requests, tokens, micros) counted at ``now``; ``running_done`` pretends every
        running call finished before ``now`` having used nothing."""
        requests = sum(1 for c in self.calls if c.at > now - 60)
        tokens = micros = 0
        for c in self.calls:
            if c.settled_at is None:
                if not running_done:
                    tokens += c.tokens
                    micros += c.micros
            else:
                tokens += c.used_tokens if c.settled_at > now - 60 else 0
                micros += c.used_micros if c.settled_at > now - self.window_s else 0
        return requests, tokens, micros

    def fits(self, now: float, tokens: int, micros: int, *, running_done: bool = False) -> bool:
        r, t, m = self.usage(now, running_done=running_done)
        return r + 1 <= self.rpm and t + tokens <= self.tpm and m + micros <= self.limit

    def admission_time_usage(self, now: int) -> tuple[int, int]:
        """Usage attributed to admission (held while running, actual once settled), as the
        brief states tpm and burst: this must stay under the limits too."""
        tokens = sum(c.used_tokens if c.settled_at is not None else c.tokens
                     for c in self.calls if c.at > now - 60)
        micros = sum(c.used_micros if c.settled_at is not None else c.micros
                     for c in self.calls if c.at > now - self.window_s)
        return tokens, micros


# Small steps and amounts so that runs often sit exactly on a limit or a window's edge.
_dt = st.one_of(st.integers(0, 3), st.sampled_from([10, 30, 59, 60, 61]))
_admit = st.tuples(st.just("admit"), _dt, st.integers(0, 30), st.integers(0, 30))
_settle_op = st.tuples(st.just("settle"), _dt, st.integers(0, 10**6), st.integers(0, 10**6))


@settings(max_examples=300, deadline=None)
@given(
    rpm=st.integers(1, 6),
    tpm=st.integers(1, 80),
    window_s=st.integers(1, 120),
    limit_micros=st.integers(0, 80),
    ops=st.lists(st.one_of(_admit, _settle_op), max_size=60),
)
def test_random_admits_and_settles_never_exceed_any_limit(
    rpm: int, tpm: int, window_s: int, limit_micros: int, ops: list[tuple[str, int, int, int]]
) -> None:
    limiter = InMemoryLimiter()
    policy = _policy(rpm=rpm, tpm=tpm, burst=(window_s, limit_micros))
    ref = _Reference(rpm, tpm, window_s, limit_micros)
    now = 0
    for kind, dt, a, b in ops:
        now += dt
        if kind == "admit":
            expected = ref.fits(now, a, b)
            try:
                _sync(limiter.admit("wl_a", policy, tokens=a, cost_micros=b, now=float(now)))
            except RateLimited as exc:
                # Refused only when the request truly does not fit (never spuriously) ...
                assert not expected
                retry = int(exc.headers["retry-after"])
                assert retry >= 1
                # ... and it would fit after Retry-After at the earliest, not a second before.
                if a <= tpm and b <= limit_micros:
                    assert ref.fits(now + retry, a, b, running_done=True)
                    if retry > 1:
                        assert not ref.fits(now + retry - 1, a, b, running_done=True)
            else:
                assert expected
                ref.calls.append(_Call(now, a, b))
        else:
            running = [c for c in ref.calls if c.settled_at is None]
            if not running:
                continue
            call = running[a % len(running)]
            call.settled_at = now
            call.used_tokens = b % (call.tokens + 1)
            call.used_micros = b % (call.micros + 1)
            _sync(limiter.settle("wl_a", policy, ticket="", held_tokens=call.tokens,
                                 used_tokens=call.used_tokens, held_micros=call.micros,
                                 used_micros=call.used_micros, now=float(now)))
        requests, tokens, micros = ref.usage(now)
        assert limiter.usage("wl_a", policy, float(now)) == Usage(requests, tokens, micros)
        assert requests <= rpm and tokens <= tpm and micros <= limit_micros
        tokens_at_admission, micros_at_admission = ref.admission_time_usage(now)
        assert tokens_at_admission <= tpm and micros_at_admission <= limit_micros
