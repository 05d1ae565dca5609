"""Rate limits, burst windows and failed-secret counters in Redis, shared by every replica
(``limits.backend = "redis"``).

Each operation is one Lua script, so its checks and its counts happen at once whatever the
replicas do. The semantics are :mod:`broker.money.limits`'s, with two differences, both on the
side of counting more:

* The sliding logs are bucketed: an amount is kept in a bucket of ``window / 60`` and counts
  until the bucket's end plus ``window / 600`` (never before the in-memory log would let it
  go), so ``Retry-After`` is at most about a sixtieth of the window later than exact.
* A running request is a lease (its ticket in a sorted set scored by when it ends): one that a
  crashed replica never settles stops counting, and stops holding its tokens and micro-dollars,
  after ``sweeper.max_request_s``, longer than any request can run.

Every key expires once nothing in it counts any more, so idle keys vanish. Redis Cluster is not
supported: a key's and its tenant's sets are touched by one script.

Redis that does not answer (``limits.timeout_s``) refuses the request with
:class:`broker.errors.LimitsUnavailable`; a settle it does not take is logged and left to the
lease. The URL is never logged: it may carry a password.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
from typing import Any

import anyio.from_thread
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError
from sqlalchemy import Connection

from broker.errors import BrokerError, ConfigError, LimitsUnavailable
from broker.identity.policy import Policy
from broker.money.limits import (
    WINDOW_S,
    Usage,
    burst_name,
    concurrent_name,
    rate_limited,
    rpm_name,
    tenant_concurrent_name,
    tpm_name,
)

log = logging.getLogger("broker.limits")

# Shared by the scripts: time is integer milliseconds; every number handed to Redis is
# formatted as an integer (Lua would write a large one in exponent notation).
_LUA_COMMON = """
local now = tonumber(ARGV[1])
-- (never "-0", which Redis does not take for an integer)
local function int(x) if x == 0 then return '0' end return string.format('%.0f', x) end
local function num(v) return tonumber(v or '0') or 0 end

-- Drop the buckets whose end plus the window has passed, and their amounts from the total.
local function trim(h, z, dim, window)
  local cutoff = int(now - window)
  local old = redis.call('ZRANGEBYSCORE', z, '-inf', cutoff)
  if #old == 0 then return end
  local freed = 0
  for i = 1, #old do
    freed = freed + num(redis.call('HGET', h, dim .. old[i]))
    redis.call('HDEL', h, dim .. old[i])
  end
  redis.call('ZREMRANGEBYSCORE', z, '-inf', cutoff)
  redis.call('HINCRBY', h, dim, int(-freed))
end

-- Count an amount in its bucket; one that arrives after a later bucket exists joins that one,
-- so the log stays ordered and nothing leaves the window early.
local function add(h, z, dim, amount, window)
  if amount <= 0 then return end
  local width = math.max(1, math.ceil(window / 60))
  local last = (math.floor(now / width) + 1) * width + math.ceil(window / 600)
  local tail = redis.call('ZRANGE', z, -1, -1, 'WITHSCORES')
  if #tail > 0 and tonumber(tail[2]) > last then last = tonumber(tail[2]) end
  local m = int(last)
  redis.call('ZADD', z, m, m)
  redis.call('HINCRBY', h, dim .. m, int(amount))
  redis.call('HINCRBY', h, dim, int(amount))
end

-- Forget the leases that ended (requests of a replica that died), with what they held.
local function expire(h, run)
  local gone = redis.call('ZRANGEBYSCORE', run, '-inf', int(now))
  if #gone == 0 then return end
  local t, m = 0, 0
  for i = 1, #gone do
    local v = redis.call('HGET', h, 'L' .. gone[i])
    if v then
      local sp = string.find(v, ' ')
      t = t + tonumber(string.sub(v, 1, sp - 1))
      m = m + tonumber(string.sub(v, sp + 1))
      redis.call('HDEL', h, 'L' .. gone[i])
    end
  end
  redis.call('ZREMRANGEBYSCORE', run, '-inf', int(now))
  redis.call('HINCRBY', h, 'ht', int(-t))
  redis.call('HINCRBY', h, 'hm', int(-m))
end

-- Keep the key's parts as long as anything in them counts, and not longer.
local function keep(window)
  local ttl = window + math.ceil(window / 60) + math.ceil(window / 600) + 1000
  local newest = redis.call('ZRANGE', KEYS[5], -1, -1, 'WITHSCORES')
  if #newest > 0 then ttl = math.max(ttl, tonumber(newest[2]) - now + 1000) end
  for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], int(ttl)) end
end
"""

# KEYS: the key's hash, its rpm, tpm and spend buckets, its leases; the group's leases.
# ARGV: now, tokens, micros, rpm, tpm, burst window, burst limit, max concurrent, group cap
# (-1: no such limit; burst window 0: no burst), ticket, lease, has group (0/1).
# Returns {1}, or {0, code, wait, alone, ...} for each limit broken (codes: see _CODES).
_ADMIT = _LUA_COMMON + """
local h = KEYS[1]
local tokens, micros = tonumber(ARGV[2]), tonumber(ARGV[3])
local rpm, tpm = tonumber(ARGV[4]), tonumber(ARGV[5])
local burst, blimit = tonumber(ARGV[6]), tonumber(ARGV[7])
local maxc, cap = tonumber(ARGV[8]), tonumber(ARGV[9])
local ticket, lease, grouped = ARGV[10], tonumber(ARGV[11]), ARGV[12] == '1'
local MINUTE = @MINUTE@

expire(h, KEYS[5])
trim(h, KEYS[2], 'r', MINUTE)
trim(h, KEYS[3], 't', MINUTE)
trim(h, KEYS[4], 's', burst)
local out = {0}
local function refuse(code, wait, alone)
  out[#out + 1] = code; out[#out + 1] = wait; out[#out + 1] = alone
end
-- When at least `need` of the logged total has left the window.
local function frees_at(z, dim, need)
  local e = redis.call('ZRANGE', z, 0, -1, 'WITHSCORES')
  local freed = 0
  for i = 1, #e, 2 do
    freed = freed + num(redis.call('HGET', h, dim .. e[i]))
    if freed >= need then return tonumber(e[i + 1]) end
  end
  return now
end
local function check(code, total, held, amount, limit, window, z, dim)
  if limit < 0 or total + held + amount <= limit then return end
  if amount > limit then return refuse(code, math.ceil(window / 1000), 1) end
  local need = total + amount - limit
  if need <= 0 then return refuse(code, 1, 0) end
  local at = frees_at(z, dim, need) + window
  refuse(code, math.max(1, math.ceil((at - now) / 1000)), 0)
end

if maxc >= 0 and redis.call('ZCARD', KEYS[5]) >= maxc then refuse(1, 1, 0) end
if grouped then
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', int(now))
  if cap >= 0 and redis.call('ZCARD', KEYS[6]) >= cap then refuse(2, 1, 0) end
end
local ht, hm = num(redis.call('HGET', h, 'ht')), num(redis.call('HGET', h, 'hm'))
check(3, num(redis.call('HGET', h, 'r')), 0, 1, rpm, MINUTE, KEYS[2], 'r')
check(4, num(redis.call('HGET', h, 't')), ht, tokens, tpm, MINUTE, KEYS[3], 't')
if burst > 0 then
  check(5, num(redis.call('HGET', h, 's')), hm, micros, blimit, burst, KEYS[4], 's')
end
if #out > 1 then
  keep(math.max(MINUTE, burst))
  return out
end
add(h, KEYS[2], 'r', 1, MINUTE)
redis.call('HINCRBY', h, 'ht', ARGV[2])
redis.call('HINCRBY', h, 'hm', ARGV[3])
redis.call('HSET', h, 'L' .. ticket, ARGV[2] .. ' ' .. ARGV[3])
local ends = int(now + lease)
redis.call('ZADD', KEYS[5], ends, ticket)
if grouped then
  redis.call('ZADD', KEYS[6], ends, ticket)
  redis.call('PEXPIRE', KEYS[6], int(lease + 1000))
end
keep(math.max(MINUTE, burst))
return {1}
"""

# KEYS: as for _ADMIT. ARGV: now, ticket, used tokens, used micros, burst window, has group.
_SETTLE = _LUA_COMMON + """
local h = KEYS[1]
local ticket, burst = ARGV[2], tonumber(ARGV[5])
local MINUTE = @MINUTE@
expire(h, KEYS[5])
-- Only what this admission still holds is released: a settle whose lease already ended, or
-- that names no admission, cannot bank credit.
local v = redis.call('HGET', h, 'L' .. ticket)
if v then
  local sp = string.find(v, ' ')
  redis.call('HINCRBY', h, 'ht', int(-tonumber(string.sub(v, 1, sp - 1))))
  redis.call('HINCRBY', h, 'hm', int(-tonumber(string.sub(v, sp + 1))))
  redis.call('HDEL', h, 'L' .. ticket)
  redis.call('ZREM', KEYS[5], ticket)
end
if ARGV[6] == '1' then redis.call('ZREM', KEYS[6], ticket) end
trim(h, KEYS[2], 'r', MINUTE)
trim(h, KEYS[3], 't', MINUTE)
trim(h, KEYS[4], 's', burst)
add(h, KEYS[3], 't', tonumber(ARGV[3]), MINUTE)
if burst > 0 then add(h, KEYS[4], 's', tonumber(ARGV[4]), burst) end
keep(math.max(MINUTE, burst))
return 1
"""

# KEYS: as for _ADMIT. ARGV: now, burst window. Returns {requests, tokens, micros, running}.
_USAGE = _LUA_COMMON + """
local h = KEYS[1]
local burst = tonumber(ARGV[2])
expire(h, KEYS[5])
trim(h, KEYS[2], 'r', @MINUTE@)
trim(h, KEYS[3], 't', @MINUTE@)
trim(h, KEYS[4], 's', burst)
return {num(redis.call('HGET', h, 'r')),
        num(redis.call('HGET', h, 't')) + num(redis.call('HGET', h, 'ht')),
        num(redis.call('HGET', h, 's')) + num(redis.call('HGET', h, 'hm')),
        redis.call('ZCARD', KEYS[5])}
"""

# An event window: KEYS[1] holds the newest `limit` events (only the limit-th newest decides).
# ARGV: now, window, limit, mode (check | record | take), the event's id. Returns the wait (s).
_WINDOW = """
local now, window, limit, mode = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now - window))
local n = redis.call('ZCARD', KEYS[1])
local wait = 0
if n >= limit then
  local e = redis.call('ZRANGE', KEYS[1], n - limit, n - limit, 'WITHSCORES')
  wait = math.max(1, math.floor((tonumber(e[2]) + window - now) / 1000) + 1)
end
if mode == 'record' or (mode == 'take' and wait == 0) then
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[5])
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(limit + 1))
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return wait
"""


def _script(lua: str) -> str:
    return lua.replace("@MINUTE@", str(math.ceil(WINDOW_S * 1000)))


def _ms(now: float) -> int:
    # Rounded down: a window then ends no earlier than exactly.
    return math.floor(now * 1000)


class RedisStore:
    """One Redis client for the limiter and the windows of a broker; closed at shutdown on the
    event loop that used it."""

    def __init__(self, url: str, *, prefix: str, timeout_s: float):
        try:
            # One retry: a pooled connection that Redis closed (a restart) is reopened once.
            self.client: Redis = Redis.from_url(
                url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
                retry=Retry(NoBackoff(), 1), health_check_interval=0)
        except Exception:
            # Not the exception's text: it may quote the URL, and the URL its password.
            raise ConfigError("invalid configuration: redis.url: not a usable Redis URL") from None
        self.prefix = prefix
        self.admit_script = self.client.register_script(_script(_ADMIT))
        self.settle_script = self.client.register_script(_script(_SETTLE))
        self.usage_script = self.client.register_script(_script(_USAGE))
        self.window_script = self.client.register_script(_WINDOW)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def call(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            log.error("the rate-limit store (Redis) failed: %s", type(exc).__name__)
            raise LimitsUnavailable("the rate-limit store does not answer") from None

    def key_parts(self, key: str, group: str | None) -> list[str]:
        base = f"{self.prefix}k:{key}:"
        # Without a group the script never touches its set; a name is still needed for KEYS.
        group_key = f"{self.prefix}g:{group}" if group is not None else f"{self.prefix}g:"
        return [base + "h", base + "r", base + "t", base + "s", base + "run", group_key]


def _burst_ms(policy: Policy) -> int:
    return policy.burst.window_s * 1000 if policy.burst is not None else 0


class RedisLimiter:
    """The :class:`broker.money.limits.Limiter` of replicas sharing one Redis."""

    def __init__(self, store: RedisStore, *, lease_s: float):
        self.store = store
        self.lease_ms = math.ceil(lease_s * 1000)

    async def admit(self, key: str, policy: Policy, *, tokens: int, cost_micros: int, now: float,
                    group: str | None = None, group_cap: int | None = None) -> str:
        if tokens < 0 or cost_micros < 0:
            raise ValueError("tokens and cost_micros must not be negative")
        rate, burst = policy.rate, policy.burst
        ticket = secrets.token_hex(12)
        args = [
            _ms(now), tokens, cost_micros,
            rate.rpm if rate is not None and rate.rpm is not None else -1,
            rate.tpm if rate is not None and rate.tpm is not None else -1,
            _burst_ms(policy), burst.limit_micros if burst is not None else -1,
            policy.max_concurrent if policy.max_concurrent is not None else -1,
            group_cap if group is not None and group_cap is not None else -1,
            ticket, self.lease_ms, 1 if group is not None else 0,
        ]
        answer = await self.store.call(self.store.admit_script, self.store.key_parts(key, group), args)
        if int(answer[0]) == 1:
            return ticket
        refusals: list[tuple[int, str]] = []
        for i in range(1, len(answer), 3):
            code, wait, alone = int(answer[i]), int(answer[i + 1]), int(answer[i + 2])
            what = _what(code, policy, group_cap)
            refusals.append((wait, f"this request alone exceeds {what}" if alone else what))
        raise rate_limited(refusals)

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
        args = [_ms(now), ticket, used_tokens, used_micros, _burst_ms(policy),
                1 if group is not None else 0]
        try:
            await self.store.call(self.store.settle_script, self.store.key_parts(key, group), args)
        except BrokerError:
            # The request has run; its answer is not withheld. Its lease ends the hold.
            log.warning("a settle of workload %s was not counted; its lease will end it", key)

    async def usage(self, key: str, policy: Policy, now: float) -> Usage:
        """What counts against the key's limits at ``now`` (running requests at their holds)."""
        got = await self.store.call(self.store.usage_script, self.store.key_parts(key, None),
                                    [_ms(now), _burst_ms(policy)])
        return Usage(requests=int(got[0]), tokens=int(got[1]), micros=int(got[2]))


def _what(code: int, policy: Policy, group_cap: int | None) -> str:
    """The name of a limit the admit script reports broken, by its code."""
    rate, burst = policy.rate, policy.burst
    if code == 1 and policy.max_concurrent is not None:
        return concurrent_name(policy.max_concurrent)
    if code == 2 and group_cap is not None:
        return tenant_concurrent_name(group_cap)
    if code == 3 and rate is not None and rate.rpm is not None:
        return rpm_name(rate.rpm)
    if code == 4 and rate is not None and rate.tpm is not None:
        return tpm_name(rate.tpm)
    if code == 5 and burst is not None:
        return burst_name(burst.limit_micros, burst.window_s)
    raise AssertionError(f"unknown refusal code {code}")


class RedisWindow:
    """The :class:`broker.identity.credentials.EventWindow` of replicas sharing one Redis;
    ``now`` is UNIX time. Keys are digests: a client id is the caller's to choose."""

    def __init__(self, store: RedisStore, name: str, limit: int, window_s: int):
        self.store = store
        self.name = name
        self.limit = limit
        self.window_s = window_s

    def _key(self, key: tuple[str, str]) -> str:
        digest = hashlib.sha256("\0".join(key).encode("utf-8", "surrogatepass")).hexdigest()
        return f"{self.store.prefix}e:{self.name}:{digest[:40]}"

    async def _run(self, key: tuple[str, str], mode: str, now: float | None) -> int:
        at = _ms(time.time() if now is None else now)
        wait = await self.store.call(
            self.store.window_script, [self._key(key)],
            [at, self.window_s * 1000, self.limit, mode, secrets.token_hex(8)])
        return int(wait)

    async def blocked_for(self, key: tuple[str, str], now: float | None = None) -> int:
        return await self._run(key, "check", now)

    async def record(self, key: tuple[str, str], now: float | None = None) -> None:
        await self._run(key, "record", now)

    async def take(self, key: tuple[str, str], now: float | None = None) -> int:
        return await self._run(key, "take", now)

    def take_within(self, conn: Connection, key: tuple[str, str]) -> int:
        # The client lives on the event loop; this thread waits for it there.
        return anyio.from_thread.run(self.take, key)

