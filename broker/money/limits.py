"""Rate limits of the gateway: requests per minute, tokens per minute and the burst spend window.

The gateway sees only the :class:`Limiter` Protocol: :class:`InMemoryLimiter` counts in one
process; :mod:`broker.money.limits_redis` and :mod:`broker.money.limits_db` count in a store
every replica shares (``limits.backend``), with the same semantics, so N replicas admit what
one would. Every ``admit`` must be followed by exactly one ``settle`` with the same held amounts
and the ticket ``admit`` returned (in a ``finally``), whatever the outcome.

How usage is counted, per key (the workload):

* ``rpm``: requests admitted in the sliding window ``(now - 60 s, now]``.
* ``tpm``: the tokens of requests still running, at their held worst case, plus the actual
  tokens of requests that settled in the last 60 s.
* ``burst``: the same for micro-dollars, over ``burst.window_s``.
* ``max_concurrent``: requests of the key still running; and, for a ``group`` (the tenant), the
  requests of all its keys still running, against the group's cap. A running request counts
  from its admission to its settlement, so a caller that holds many long streams cannot take
  more than its share of the gateway from the other tenants.

A settled request's actual usage is counted from the moment it settles, not from its admission:
counting it at settle time is exact, O(1), and never counts less than admission-time
attribution would (the held amount until the end, then the actual amount for a full window
after it).

In memory, storage is a sliding log per dimension whose entries are merged when they fall within
``window / 600`` of each other (the merged entry takes the later time). The log therefore holds
at most about 600 entries per dimension whatever the traffic, and the merge only ever keeps
usage counted a little longer (never shorter): at most 0.1 s for a 60 s window. Running totals
make each call O(1) amortized; only a refusal walks the log to compute ``Retry-After``.

Idle keys (nothing in any window, nothing running) are dropped a couple at a time on every
call, and all at once by :meth:`InMemoryLimiter.prune`, so memory follows the active keys.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from broker.errors import RateLimited
from broker.identity.policy import Policy

WINDOW_S = 60.0
"""The window of ``rpm`` and ``tpm``."""

_SLOTS = 600
"""Entries closer than ``window / _SLOTS`` are merged: the bound on a log's length."""

_PRUNE_PER_CALL = 2
"""Keys examined for idleness per call; more than the one a call can add, so backlogs drain."""


class Limiter(Protocol):
    """Admission control for gateway requests. ``now`` is UNIX seconds, passed in by the caller
    so the same clock serves the whole request (and tests need no sleeping); replicas sharing a
    store must keep their clocks in step (NTP)."""

    async def admit(self, key: str, policy: Policy, *, tokens: int, cost_micros: int, now: float,
                    group: str | None = None, group_cap: int | None = None) -> str:
        """Count the request (and hold its worst-case ``tokens`` and ``cost_micros``), or raise
        :class:`broker.errors.RateLimited` with a ``retry-after`` header, counting nothing.
        ``group`` (the tenant) may have at most ``group_cap`` requests running at once.
        Returns the admission's ticket, for ``settle``. A shared store that does not answer
        raises :class:`broker.errors.LimitsUnavailable`: nothing is admitted uncounted."""
        ...

    async def settle(
        self,
        key: str,
        policy: Policy,
        *,
        ticket: str,
        held_tokens: int,
        used_tokens: int,
        held_micros: int,
        used_micros: int,
        now: float,
        group: str | None = None,
    ) -> None:
        """Replace what ``admit`` held by what the request actually used (all of it, even
        above what was held: the limits must learn what really went upstream). Never raises
        for a store that does not answer: the admission's lease then ends its hold."""
        ...


@dataclass(frozen=True, slots=True)
class Usage:
    """What counts against a key's limits at one moment."""

    requests: int
    tokens: int
    micros: int


@dataclass(slots=True)
class _Entry:
    first: float
    last: float
    amount: int


@dataclass(slots=True)
class _Log:
    """A sliding log of amounts with a running total. ``last`` increases along the log."""

    entries: deque[_Entry] = field(default_factory=deque)
    total: int = 0

    def trim(self, now: float, window: float) -> None:
        entries = self.entries
        while entries and entries[0].last + window <= now:
            self.total -= entries.popleft().amount

    def add(self, now: float, amount: int, window: float) -> None:
        if amount <= 0:
            return
        self.total += amount
        entries = self.entries
        if entries:
            tail = entries[-1]
            # A clock read before the lock may arrive slightly out of order: it merges into the
            # tail (keeping the later time), so the log stays ordered and nothing expires early.
            if now - tail.first < window / _SLOTS:
                tail.last = max(tail.last, now)
                tail.amount += amount
                return
        entries.append(_Entry(now, now, amount))

    def frees_at(self, need: int, window: float) -> float:
        """When at least ``need`` of the counted amount will have left the window."""
        freed = 0
        for entry in self.entries:
            freed += entry.amount
            if freed >= need:
                return entry.last + window
        raise AssertionError("asked to free more than the log holds")


@dataclass(slots=True)
class _KeyState:
    requests: _Log = field(default_factory=_Log)
    tokens: _Log = field(default_factory=_Log)
    spend: _Log = field(default_factory=_Log)
    held_tokens: int = 0
    held_micros: int = 0
    running: int = 0
    spend_window: float = 0.0

    def trim(self, now: float) -> None:
        self.requests.trim(now, WINDOW_S)
        self.tokens.trim(now, WINDOW_S)
        self.spend.trim(now, self.spend_window)

    def idle(self) -> bool:
        return (
            self.running == 0
            and not self.requests.entries
            and not self.tokens.entries
            and not self.spend.entries
        )


def _retry_after(at: float, now: float) -> int:
    return max(1, math.ceil(at - now))


def refusal(total: int, held: int, amount: int, limit: int, window: float, now: float,
            what: str, frees_at: Callable[[int], float]) -> tuple[int, str] | None:
    """None when ``amount`` fits under ``limit`` next to the ``total`` logged and the ``held``;
    else the seconds until it could fit, assuming the running requests finished at once (the
    earliest that can happen), or the whole window when ``amount`` alone is over the limit, and
    why. ``frees_at(need)`` is when at least ``need`` of the logged total has left the window:
    the only part that differs between stores, asked for only on a refusal."""
    if total + held + amount <= limit:
        return None
    if amount > limit:
        return max(1, math.ceil(window)), f"this request alone exceeds {what}"
    need = total + amount - limit
    if need <= 0:
        # Only running requests stand in the way; they may finish any moment.
        return 1, what
    return _retry_after(frees_at(need), now), what


def concurrency_refusals(policy: Policy, running: int, group_running: int | None,
                         group_cap: int | None) -> list[tuple[int, str]]:
    """The concurrency limits a new request would break (a running request may finish any
    moment: retry soon)."""
    out: list[tuple[int, str]] = []
    if policy.max_concurrent is not None and running >= policy.max_concurrent:
        out.append((1, concurrent_name(policy.max_concurrent)))
    if group_running is not None and group_cap is not None and group_running >= group_cap:
        out.append((1, tenant_concurrent_name(group_cap)))
    return out


def concurrent_name(max_concurrent: int) -> str:
    return f"{max_concurrent} concurrent calls"


def tenant_concurrent_name(group_cap: int) -> str:
    return f"the tenant's {group_cap} concurrent calls"


def rpm_name(rpm: int) -> str:
    return f"{rpm} requests per minute"


def tpm_name(tpm: int) -> str:
    return f"{tpm} tokens per minute"


def burst_name(limit_micros: int, window_s: int) -> str:
    return f"{limit_micros} micro-dollars per {window_s} s"


def rate_limited(refusals: list[tuple[int, str]]) -> RateLimited:
    """The one error of a refused admission: every limit must pass at once, so the request
    fits when the slowest one frees up."""
    wait = max(w for w, _ in refusals)
    limits = ", ".join(name for _, name in refusals)
    return RateLimited(f"rate limit exceeded ({limits}); retry after {wait} s",
                       headers={"retry-after": str(wait)})


def _refusal(log: _Log, held: int, amount: int, limit: int, window: float, now: float,
             what: str) -> tuple[int, str] | None:
    return refusal(log.total, held, amount, limit, window, now, what,
                   lambda need: log.frees_at(need, window))


class InMemoryLimiter:
    """The :class:`Limiter` of one process: every check and count happens under one lock, so
    concurrent requests of a key (database work runs in threads) cannot slip past a limit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: OrderedDict[str, _KeyState] = OrderedDict()
        self._groups: dict[str, int] = {}  # group -> requests running

    def __len__(self) -> int:
        """How many keys are tracked (for tests and metrics)."""
        return len(self._keys)

    async def admit(self, key: str, policy: Policy, *, tokens: int, cost_micros: int, now: float,
                    group: str | None = None, group_cap: int | None = None) -> str:
        if tokens < 0 or cost_micros < 0:
            raise ValueError("tokens and cost_micros must not be negative")
        rate, burst = policy.rate, policy.burst
        with self._lock:
            state = self._touch(key, policy, now)
            checks: list[tuple[int, str] | None] = []
            checks.extend(concurrency_refusals(
                policy, state.running, self._groups.get(group, 0) if group is not None else None,
                group_cap))
            if rate is not None and rate.rpm is not None:
                checks.append(_refusal(state.requests, 0, 1, rate.rpm, WINDOW_S, now,
                                       rpm_name(rate.rpm)))
            if rate is not None and rate.tpm is not None:
                checks.append(_refusal(state.tokens, state.held_tokens, tokens, rate.tpm,
                                       WINDOW_S, now, tpm_name(rate.tpm)))
            if burst is not None:
                checks.append(_refusal(state.spend, state.held_micros, cost_micros,
                                       burst.limit_micros, burst.window_s, now,
                                       burst_name(burst.limit_micros, burst.window_s)))
            refusals = [c for c in checks if c is not None]
            if refusals:
                raise rate_limited(refusals)
            state.requests.add(now, 1, WINDOW_S)
            state.held_tokens += tokens
            state.held_micros += cost_micros
            state.running += 1
            if group is not None:
                self._groups[group] = self._groups.get(group, 0) + 1
        # One process needs no ticket: what a settle releases is named by its amounts.
        return ""

    async def settle(
        self,
        key: str,
        policy: Policy,
        *,
        ticket: str,
        held_tokens: int,
        used_tokens: int,
        held_micros: int,
        used_micros: int,
        now: float,
        group: str | None = None,
    ) -> None:
        if min(held_tokens, used_tokens, held_micros, used_micros) < 0:
            raise ValueError("settled amounts must not be negative")
        with self._lock:
            if group is not None:
                left = self._groups.get(group, 0) - 1
                if left > 0:
                    self._groups[group] = left
                else:
                    self._groups.pop(group, None)
            state = self._touch(key, policy, now)
            # Clamped so that a settle without its admit (a caller's bug) cannot bank credit.
            state.held_tokens = max(0, state.held_tokens - held_tokens)
            state.held_micros = max(0, state.held_micros - held_micros)
            state.running = max(0, state.running - 1)
            # The actual usage is recorded even above the hold (a provider that billed more than
            # the bound): it is what was consumed, and it delays the next admissions accordingly.
            state.tokens.add(now, used_tokens, WINDOW_S)
            if state.spend_window:
                state.spend.add(now, used_micros, state.spend_window)

    def usage(self, key: str, policy: Policy, now: float) -> Usage:
        """What counts against the key's limits at ``now`` (running requests at their holds);
        zeros for an unknown key. Read-only: for rate-limit headers, metrics and tests."""
        with self._lock:
            state = self._keys.get(key)
            if state is None:
                return Usage(0, 0, 0)
            state.spend_window = float(policy.burst.window_s) if policy.burst is not None else 0.0
            state.trim(now)
            return Usage(
                requests=state.requests.total,
                tokens=state.tokens.total + state.held_tokens,
                micros=state.spend.total + state.held_micros,
            )

    def prune(self, now: float) -> int:
        """Drop every idle key; returns how many. For a periodic sweeper: calls prune a few
        keys each already, this also reclaims memory when traffic stops."""
        with self._lock:
            idle = []
            for key, state in self._keys.items():
                state.trim(now)
                if state.idle():
                    idle.append(key)
            for key in idle:
                del self._keys[key]
            return len(idle)

    def _touch(self, key: str, policy: Policy, now: float) -> _KeyState:
        """The key's state, trimmed to ``now`` and moved to the back of the prune queue."""
        self._prune_some(now)
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState()
        else:
            self._keys.move_to_end(key)
        # Spend is kept for the window in force; a widened window starts from what is kept.
        state.spend_window = float(policy.burst.window_s) if policy.burst is not None else 0.0
        state.trim(now)
        return state

    def _prune_some(self, now: float) -> None:
        for _ in range(_PRUNE_PER_CALL):
            if not self._keys:
                return
            key, state = next(iter(self._keys.items()))
            state.trim(now)
            if state.idle():
                del self._keys[key]
            else:
                # Still active: send it to the back so the keys behind it get examined too.
                self._keys.move_to_end(key)
