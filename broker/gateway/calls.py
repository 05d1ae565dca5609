"""The metered gateway: every model call is attributed, bounded by its token's slice, and settled.

One call, in order (see ``docs/request-flow.md``):

1. the route verified the token; the model must be configured (404), allowed by the token and
   the workload's policy (403), and not need an approval (403);
2. the provider plugin BOUNDS the request (:mod:`broker.money.bounds`): a proven upper bound on the
   input it can be billed, or a 400 naming a field whose cost cannot be bounded;
3. the provider key is read (cached) before any money moves, so a Vault outage costs nothing;
4. the limiter admits the call at its worst case (429 ``rate_limit_exceeded``: rates, burst,
   the workload's and the tenant's concurrent calls);
5. one transaction reads what remains of the slice, lowers the output-token limit to what it can
   pay for, and HOLDS the worst-case cost with a conditional update (429 ``insufficient_quota``
   when not even one output token fits; 503 when the ledger does not answer, before any
   provider call);
6. the request goes to the provider with the provider key (the client's credentials never do);
7. the actual cost, from the provider's usage, is SETTLED: charged in full, the rest of the hold
   released, one usage event written. Without the provider's usage the charge is a bound, never a
   guess below the bill: the input bound (or the input the provider reported) and the output
   streamed counted as one token per byte, capped by the hold; the whole hold when the request
   was sent and nothing is known. Settlement runs in ``finally`` blocks shielded from
   cancellation, so no path leaves a hold behind; if the process dies, the sweeper settles the
   orphan at the full hold.

The charge is zero when the provider never took the request. It stays within the hold, since
the hold is a bound; a provider that bills more anyway is charged in full (an ``overrun``: the
budgets go past their limits, the call is audited and alerted, and the token is revoked).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from sqlalchemy import Connection, select

from broker.errors import (
    ApprovalRequired,
    InsufficientQuota,
    InvalidRequest,
    InvalidToken,
    ModelNotAllowed,
    ModelNotFound,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
)
from broker.gateway.stream import MeteredStream, body_chunks
from broker.gateway.upstream_http import ProviderPools
from broker.identity.policy import Policy, effective, model_allowed
from broker.money import ledger
from broker.money.bounds import BoundContext, RequestBound
from broker.money.limits import InMemoryLimiter, Limiter
from broker.money.pricing import NOTHING, Price, Usage
from broker.plugin import Operation, Provider, StreamMeter
from broker.revocation import revocation
from broker.revocation.revocation import Entry
from broker.services import Services
from broker.settings import ModelSettings
from broker.storage.models import Workload
from broker.tokens.tokens import LEEWAY_S, VerifiedToken

log = logging.getLogger("broker.gateway")

_workload = Workload.__table__  # type: ignore[attr-defined]

# The output limit set when the client sent none: bounded, so that the hold is.
DEFAULT_OUTPUT_LIMIT = 4096
POLICY_CACHE_S = 5.0
POLICY_CACHE_MAX = 10_000
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
HOLD_ATTEMPTS = 3


@dataclass(frozen=True)
class Outcome:
    """How a call ended and what it used: what settlement charges."""

    status: str
    usage: Usage
    estimated: bool = False


@dataclass
class Call:
    """One gateway request, from its hold to its settlement."""

    token: VerifiedToken
    op: Operation
    model: str
    provider: Provider
    price: Price
    policy: Policy
    body: dict[str, Any]
    stream: bool
    client_wants_usage: bool
    bound: RequestBound
    hold_id: str
    held: int
    remaining: int
    output_limit: int  # per answer; 0 for embeddings
    choices: int
    limiter_tokens: int
    limiter_micros: int
    request_id: str
    client_ip: str | None
    started: float
    settled: bool = False

    @property
    def output_cap(self) -> int:
        """The most output the provider may bill: the limit set on every answer, plus the
        output the request itself may add (an OpenAI prediction)."""
        return self.output_limit * self.choices + self.bound.extra_output_tokens

    def worst(self) -> Usage:
        """The usage the hold was priced at: what is charged when nothing else is known."""
        return self.price.worst_case(self.bound.input_tokens, self.output_cap, self.bound.cache)

    def bounded(self, reported: Usage | None, output_bound: int) -> Usage:
        """The charge when the provider's final usage is missing: the input it reported (else
        the input bound) and the output seen, counted high, never above the hold's."""
        source = reported or self.price.worst_input(self.bound.input_tokens, self.bound.cache)
        seen = max(output_bound, reported.completion_tokens if reported is not None else 0)
        return Usage(source.prompt_tokens, min(self.output_cap, seen), source.cached_tokens,
                     source.cache_write_tokens, source.cache_write_1h_tokens)


@dataclass(frozen=True)
class Reply:
    """A complete (non-stream) answer for the client."""

    status: int
    content: bytes
    headers: dict[str, str]


class Gateway:
    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.settings = svc.settings
        self.providers = svc.providers
        self.keys = svc.provider_keys
        self.limiter: Limiter = InMemoryLimiter()
        self._policies: dict[str, tuple[float, Policy]] = {}
        self.pools = ProviderPools()
        self._contexts = {
            name: BoundContext.of(spec, svc.settings.providers[spec.provider],
                                  max_media_bytes=svc.settings.server.max_body_bytes)
            for name, spec in svc.settings.models.items()}
        gate = svc.token_gate
        if isinstance(gate, revocation.Denylist):
            gate.listeners.append(self._forget_policy)

    def _forget_policy(self, entry: Entry) -> None:
        if entry.kind == "workload":
            self._policies.pop(entry.target, None)

    async def aclose(self) -> None:
        await self.pools.aclose()

    # --- admission ---------------------------------------------------------------------

    def visible_models(self, token: VerifiedToken) -> list[tuple[str, ModelSettings]]:
        return [(n, m) for n, m in self.settings.models.items() if model_allowed(n, token.models)]

    async def policy(self, workload_id: str) -> Policy:
        """The workload's effective policy, cached briefly to keep the hot path off the database
        (and dropped at once when the workload's tokens are cut or it is suspended)."""
        now = time.monotonic()
        hit = self._policies.get(workload_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        w = _workload.c
        row = await self.svc.db.read(
            lambda conn: conn.execute(select(w.policy, w.kind).where(w.id == workload_id)).first()
        )
        if row is None:
            raise InvalidToken()  # the identity is gone: its tokens are dead
        policy = effective(Policy.model_validate(row[0]), str(row[1]))
        if len(self._policies) >= POLICY_CACHE_MAX:
            self._policies.clear()
        self._policies[workload_id] = (now + POLICY_CACHE_S, policy)
        return policy

    async def begin(
        self,
        token: VerifiedToken,
        op: Operation,
        body: dict[str, Any],
        client_headers: Mapping[str, str],
        *,
        request_id: str,
        client_ip: str | None,
    ) -> Call:
        """Check the call, bound it, admit it, hold its worst case; the caller must then
        settle it."""
        started = time.perf_counter()
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model is required", param="model")
        spec = self.settings.models.get(model)
        if spec is None:
            raise ModelNotFound(f"the model {model[:200]!r} does not exist")
        if not model_allowed(model, token.models):
            raise ModelNotAllowed(f"this token may not use the model {model!r}")
        provider = self.providers[spec.provider]
        if op not in provider.operations:
            raise InvalidRequest(f"the model {model!r} is not served on this route", param="model")
        policy = await self.policy(token.sub)
        if not model_allowed(model, policy.models):
            raise ModelNotAllowed(f"the policy no longer allows the model {model!r}")
        if model_allowed(model, policy.approval_models):
            raise ApprovalRequired(f"the model {model!r} needs an approval")
        stream = body.get("stream", False)
        if not isinstance(stream, bool) or (stream and op == "embeddings"):
            raise InvalidRequest("stream must be a boolean (and is not supported for embeddings)",
                                 param="stream")
        bound = provider.bound_request(op, body, self._contexts[model], client_headers)
        requested, choices = provider.output_limit(op, body)
        # Asking for stream usage may refuse a malformed request: do it before money moves.
        client_wants_usage = provider.ask_stream_usage(op, body) if stream else False
        price = Price.of(spec, bound.price_percent)
        wanted = 0 if op == "embeddings" else requested or DEFAULT_OUTPUT_LIMIT
        # The whole slice bounds what the limiter is asked to hold, without a database read.
        affordable = _affordable(price, bound, token.budget_micros)
        if affordable is not None and op != "embeddings":
            wanted = max(1, min(wanted, affordable // choices))
        await self.keys.get(spec.provider)  # a Vault outage refuses the call before money moves
        worst = price.worst_case(bound.input_tokens, wanted * choices + bound.extra_output_tokens,
                                 bound.cache)
        limiter_tokens, limiter_micros = worst.tokens, price.cost(worst)
        tenant_cap = self.settings.gateway.tenant_max_concurrent
        self.limiter.admit(token.sub, policy, tokens=limiter_tokens, cost_micros=limiter_micros,
                           now=time.time(), group=token.tenant, group_cap=tenant_cap)
        hold_id = "h_" + secrets.token_hex(12)
        try:
            limit, held, remaining = await self.svc.db.run(
                lambda conn: _hold(conn, hold_id, token.jti, op, price, bound, wanted, choices)
            )
        except BaseException:
            self.limiter.settle(token.sub, policy, held_tokens=limiter_tokens, used_tokens=0,
                                held_micros=limiter_micros, used_micros=0, now=time.time(),
                                group=token.tenant)
            raise
        call = Call(
            token=token, op=op, model=model, provider=provider, price=price, policy=policy,
            body=body, stream=stream, client_wants_usage=client_wants_usage, bound=bound,
            hold_id=hold_id, held=held, remaining=remaining, output_limit=limit,
            choices=choices, limiter_tokens=limiter_tokens, limiter_micros=limiter_micros,
            request_id=request_id, client_ip=client_ip, started=started,
        )
        try:
            if op != "embeddings":
                provider.set_output_limit(op, body, limit)
            body["model"] = spec.upstream_model or model
        except BaseException:
            await self.settle(call, Outcome("refused", NOTHING))
            raise
        return call

    # --- forwarding --------------------------------------------------------------------

    async def forward(self, call: Call, client_headers: Mapping[str, str]) -> Reply | MeteredStream:
        """Send the call upstream. A non-stream call is settled before this returns; a stream
        is handed over to the returned :class:`MeteredStream`, which settles it."""
        provider = call.provider
        # Once the request is on its way the provider may bill all of it, even if we never
        # learn the answer (cancelled, timed out, unreadable): the whole hold.
        taken = Outcome("cancelled", call.worst(), estimated=True)
        outcome = Outcome("not_sent", NOTHING)
        handed_over = False
        try:
            key = await self.keys.get(provider.config.name)
            upstream = provider.build_request(call.op, call.body, key=key,
                                              client_headers=client_headers)
            config = provider.config
            up = self.pools.get(config.name, provider.transport(), timeout_s=config.timeout_s,
                                max_connections=self.settings.providers[config.name].max_connections)
            request = up.request(upstream.url, upstream.headers, upstream.content)
            outcome = taken
            try:
                response = await up.send(request)
            except (httpx.ConnectTimeout, httpx.PoolTimeout):
                outcome = Outcome("upstream_timeout", NOTHING)
                raise UpstreamTimeout() from None
            except httpx.TimeoutException:
                outcome = Outcome("upstream_timeout", taken.usage, estimated=True)
                raise UpstreamTimeout() from None
            except httpx.HTTPError:
                outcome = Outcome("upstream_error", NOTHING)
                raise UpstreamError("the provider could not be reached") from None
            ok = response.status_code == 200
            try:
                if ok and call.stream:
                    handed_over = True
                    return self._stream(call, response)
                outcome = taken if ok else Outcome("upstream_error", NOTHING)
                raw = await _read_capped(response)
            except (UpstreamError, httpx.HTTPError) as exc:
                timed_out = isinstance(exc, httpx.TimeoutException)
                outcome = Outcome("upstream_timeout" if timed_out else "upstream_error",
                                  taken.usage if ok else NOTHING, estimated=ok)
                if isinstance(exc, UpstreamError):
                    raise
                raise UpstreamTimeout() if timed_out else UpstreamError(
                    "the provider's answer was cut off") from None
            finally:
                if not handed_over:
                    await response.aclose()
            if response.status_code != 200:
                outcome, error = _refusal(response)
                if error is not None:
                    raise error
                return Reply(response.status_code, raw, {"content-type": "application/json"})
            outcome, parsed = self._completed(call, raw)
            if parsed is None:
                raise UpstreamError("the provider's answer is not JSON")
            cost, remaining = await self.settle(call, outcome)
            headers = {"content-type": "application/json", "x-broker-cost-micros": str(cost)}
            if remaining is not None:
                headers["x-broker-budget-remaining-micros"] = str(remaining)
            return Reply(200, raw, headers)
        finally:
            if not handed_over and not call.settled:
                await self.settle(call, outcome)

    def _stream(self, call: Call, response: httpx.Response) -> MeteredStream:
        def is_live() -> bool:
            gate = self.svc.token_gate
            return gate is None or bool(gate.is_live(call.token))

        async def settle(status: str, meter: StreamMeter) -> None:
            if meter.final and meter.usage is not None:
                outcome = Outcome(status, meter.usage)
            else:
                outcome = Outcome(status, call.bounded(meter.usage, meter.output_bound),
                                  estimated=True)
            await self.settle(call, outcome)

        gateway = self.settings.gateway
        # The stream may not outlive its token (plus the leeway), nor the broker's own cap.
        lifetime = min(call.token.exp + LEEWAY_S - time.time(), float(gateway.max_stream_s))
        meter = call.provider.stream_meter(call.op, client_wants_usage=call.client_wants_usage)
        return MeteredStream(response, meter, limit=call.output_limit * call.choices,
                             remaining=call.remaining, deadline=time.monotonic() + lifetime,
                             drain_s=float(gateway.drain_s), is_live=is_live, settle=settle)

    def _completed(self, call: Call, raw: bytes) -> tuple[Outcome, Any]:
        try:
            parsed = json.loads(raw)
        except ValueError:
            return Outcome("upstream_error", call.worst(), estimated=True), None
        usage = call.provider.read_usage(call.op, parsed)
        if usage is not None:
            return Outcome("ok", usage), parsed
        out = call.provider.output_bound(call.op, parsed)
        return Outcome("ok", call.bounded(None, out), estimated=True), parsed

    # --- settlement --------------------------------------------------------------------

    async def settle(self, call: Call, outcome: Outcome) -> tuple[int, int | None]:
        """Charge the outcome in full, release the rest of the hold, write the usage event,
        once. Shielded: a cancelled request still settles. Returns (cost, what remains of the
        slice). A charge above the hold (the provider billed more than the bound) is an
        overrun: charged all the same, audited, alerted, and the token revoked."""
        if call.settled:
            return 0, None
        call.settled = True
        usage = outcome.usage
        cost = call.price.cost(usage)
        status = "overrun" if cost > call.held else outcome.status
        now = time.time()
        event = {
            "request_id": call.request_id[:64],
            "ts": int(now),
            "model": call.model,
            "provider": call.provider.config.name,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "status": status,
            "latency_ms": int((time.perf_counter() - call.started) * 1000),
            "stream": call.stream,
            "estimated": outcome.estimated,
            "client_ip": call.client_ip[:64] if call.client_ip else None,
        }
        remaining: int | None = None
        with anyio.CancelScope(shield=True):
            try:
                remaining = await self.svc.db.run(
                    lambda conn: self._settle_in(conn, call, cost, event, outcome.status))
            except Exception as exc:
                # The hold stays; the sweeper settles it at the full amount once it is orphaned.
                log.error("settling hold %s failed: %s", call.hold_id, type(exc).__name__)
            finally:
                self.limiter.settle(call.token.sub, call.policy, held_tokens=call.limiter_tokens,
                                    used_tokens=usage.tokens, held_micros=call.limiter_micros,
                                    used_micros=cost, now=now, group=call.token.tenant)
        return cost, remaining

    def _settle_in(self, conn: Connection, call: Call, cost: int, event: dict[str, Any],
                   ended: str) -> int | None:
        done = ledger.settle_hold(conn, hold_id=call.hold_id, cost=cost, event=event)
        if done is None:
            return None
        if done.excess:
            entry = revocation.revoke_for_overrun(
                conn, jti=done.jti, workload_id=done.workload_id, tenant_id=done.tenant_id,
                excess=done.excess,
                detail={"request_id": event["request_id"], "model": call.model,
                        "provider": call.provider.config.name, "held_micros": call.held,
                        "cost_micros": cost, "ended": ended},
                now=int(event["ts"]),
            )
            self._alert_overrun(call, done.excess, entry)
        return done.remaining

    def _alert_overrun(self, call: Call, excess: int, entry: Entry | None) -> None:
        provider = call.provider.config.name
        log.warning("overrun: provider %s billed call %s of workload %s %d micro-dollars above "
                    "its hold; the token is revoked", provider, call.request_id[:64],
                    call.token.sub, excess)
        self.svc.metrics.overruns.labels(provider).inc()
        self.svc.metrics.overrun_micros.labels(provider).inc(excess)
        # Applied here before the commit is harmless: the gate only refuses more.
        revocation.apply_here(self.svc.token_gate, entry)


def _affordable(price: Price, bound: RequestBound, budget: int) -> int | None:
    """The most output tokens (for all answers together) that ``budget`` pays for beside the
    request's worst-case input and extra output; None when money sets no limit."""
    most = price.max_output_tokens(price.worst_input(bound.input_tokens, bound.cache), budget)
    if most is None:
        return None
    return most - bound.extra_output_tokens


def _hold(
    conn: Connection, hold_id: str, jti: str, op: Operation, price: Price, bound: RequestBound,
    wanted: int, choices: int,
) -> tuple[int, int, int]:
    """(output limit per answer, amount held, what remains of the slice). The limit is the
    largest the remaining slice pays for, at most ``wanted``; retried when a concurrent hold
    took the room between the read and the conditional update (PostgreSQL)."""

    def amount_for(limit: int) -> int:
        return price.cost(price.worst_case(
            bound.input_tokens, limit * choices + bound.extra_output_tokens, bound.cache))

    # Most calls fit as asked: try that first, and read the slice only when it does not.
    amount = amount_for(wanted)
    now = int(time.time())
    with contextlib.suppress(InsufficientQuota):
        return wanted, amount, ledger.place_hold(conn, hold_id=hold_id, jti=jti, amount=amount,
                                                 now=now)
    for _ in range(HOLD_ATTEMPTS):
        remaining = ledger.slice_remaining(conn, jti)
        if remaining is None:
            raise InsufficientQuota("this token has no budget slice")
        limit = wanted
        affordable = _affordable(price, bound, remaining)
        if affordable is not None and op != "embeddings":
            limit = min(limit, affordable // choices)
            if limit < 1:
                raise InsufficientQuota("the token's remaining slice cannot pay for an answer")
        elif affordable is not None and affordable < 0:
            raise InsufficientQuota("the token's remaining slice cannot pay for this input")
        amount = amount_for(limit)
        try:
            left = ledger.place_hold(conn, hold_id=hold_id, jti=jti, amount=amount, now=now)
        except InsufficientQuota:
            continue
        return limit, amount, left
    raise InsufficientQuota("the token's remaining slice is taken by running requests")


def _refusal(response: httpx.Response) -> tuple[Outcome, Exception | None]:
    """How an upstream error status reaches the client; the provider took nothing."""
    status = response.status_code
    if status == 429:
        retry = response.headers.get("retry-after", "")
        headers = {"retry-after": retry} if retry.isdigit() else {}
        return Outcome("upstream_rate_limited", NOTHING), RateLimited(
            "the provider is rate limiting this model", headers=headers)
    if status in (401, 403, 407):
        log.error("provider refused the broker's credentials (HTTP %d)", status)
        return Outcome("upstream_error", NOTHING), UpstreamError("the provider refused the call")
    if 400 <= status < 500:
        # The client's request is at fault: its own provider error, in its own wire format.
        return Outcome("upstream_rejected", NOTHING), None
    return Outcome("upstream_error", NOTHING), UpstreamError(f"the provider answered {status}")


async def _read_capped(response: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in body_chunks(response):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise UpstreamError("the provider's answer is too large")
        chunks.append(chunk)
    return b"".join(chunks)
