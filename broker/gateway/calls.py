"""The metered gateway: every model call is attributed, bounded by its token's slice, and settled.

One call, in order (see ``docs/request-flow.md``):

1. the route verified the token; the model must be configured (404), allowed by the token and
   the workload's policy (403), and not need an approval (403);
2. the provider plugin BOUNDS the request (:mod:`broker.money.bounds`): a proven upper bound on the
   input it can be billed, or a 400 naming a field whose cost cannot be bounded;
3. the call is QUOTED once (:mod:`broker.gateway.quote`): its output limit, lowered to what the
   token's slice pays for, and the worst-case cost of it all, which every later step uses;
4. the provider key is read (cached) before any money moves, so a Vault outage costs nothing;
5. the limiter admits the call at its quote (429 ``rate_limit_exceeded``: rates, burst, the
   workload's and the tenant's concurrent calls);
6. one transaction HOLDS the quote's cost with a conditional update; when the rest of the slice
   is smaller, it reads it and shrinks the quote to it (429 ``insufficient_quota`` when not even
   one output token fits; 503 when the ledger does not answer, before any provider call);
7. the request goes to the provider with the provider key (the client's credentials never do);
8. the actual cost, from the provider's usage, is SETTLED: charged in full, the rest of the hold
   released, one usage event written with its :class:`~broker.money.outcome.Outcome`. Without the
   provider's usage the charge is a bound, never a guess below the bill: the input bound (or the
   input the provider reported) and the output streamed counted as one token per byte, capped by
   the hold; the whole hold when the request was sent and nothing is known. Every way out of
   :meth:`Gateway.forward` and :class:`MeteredStream` settles, shielded from cancellation, so no
   path leaves a hold behind; if the process dies, the sweeper settles the orphan at the full
   hold.

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
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from sqlalchemy import Connection, select

from broker.approvals import grants
from broker.approvals.grants import GrantRecord
from broker.errors import (
    ApprovalRequired,
    InsufficientQuota,
    InvalidRequest,
    InvalidToken,
    ModelNotAllowed,
    ModelNotFound,
    UpstreamError,
)
from broker.gateway import conversations, tools
from broker.gateway.charges import (
    Charge,
    Ended,
    nothing,
    read,
    refusal,
    send,
    unfinished,
    whole_hold,
)
from broker.gateway.quote import Quote, quote
from broker.gateway.stream import MeteredStream
from broker.gateway.upstream_http import ProviderPools, Upstream
from broker.identity.policy import Policy, effective, model_allowed
from broker.money import ledger
from broker.money.bounds import BoundContext
from broker.money.limits import Limiter
from broker.money.outcome import Outcome
from broker.money.pricing import NOTHING, Usage
from broker.monitoring import alerts
from broker.monitoring.detectors import Observation
from broker.plugin import Operation, Provider, StreamMeter
from broker.revocation import actions
from broker.revocation.denylist import Denylist, apply_here
from broker.revocation.log import Entry
from broker.services import Services
from broker.settings import ModelSettings
from broker.storage.group_commit import GroupCommit
from broker.storage.models import Workload
from broker.tokens.tokens import LEEWAY_S, VerifiedToken

log = logging.getLogger("broker.gateway")

_workload = Workload.__table__  # type: ignore[attr-defined]

POLICY_CACHE_S = 5.0
POLICY_CACHE_MAX = 10_000
HOLD_ATTEMPTS = 3


# Outcomes the monitor's ``failures`` detector counts (with the gateway's own refusals).
_FAILED_UPSTREAM = frozenset({Outcome.UPSTREAM_ERROR, Outcome.UPSTREAM_TIMEOUT,
                              Outcome.UPSTREAM_RATE_LIMITED})


@dataclass
class Call:
    """One gateway request, from its hold to its settlement."""

    token: VerifiedToken
    op: Operation
    model: str
    provider: Provider
    policy: Policy
    body: dict[str, Any]
    stream: bool
    client_wants_usage: bool
    quote: Quote  # what is held, and what settlement charges against
    admitted: Quote  # what the limiter holds: the quote before the hold shrank it, if it did
    hold_id: str
    remaining: int
    request_id: str
    client_ip: str | None
    started: float
    # The request as the client sent it (a shallow copy taken before the broker changed it):
    # what the monitor's loop fingerprint is made of.
    original: dict[str, Any] | None = None
    tools: tools.ToolPlan = tools.NO_PLAN
    settled: bool = False
    ticket: str = ""  # the limiter's admission, which its settle names


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
        self.limiter: Limiter = svc.limiter
        self._policies: dict[str, tuple[float, Policy]] = {}
        self.pools = ProviderPools()
        # Holds and settlements of concurrent calls share transactions.
        self.writes = GroupCommit(svc.db)
        results = {name: tool.result_tokens_per_call for name, tool in svc.settings.tools.items()}
        self._contexts = {
            name: BoundContext.of(spec, svc.settings.providers[spec.provider],
                                  max_media_bytes=svc.settings.server.max_body_bytes,
                                  tool_result_tokens=results)
            for name, spec in svc.settings.models.items()}
        gate = svc.token_gate
        if isinstance(gate, Denylist):
            gate.listeners.append(self._forget_policy)

    def _forget_policy(self, entry: Entry) -> None:
        if entry.kind == "workload":
            self._policies.pop(entry.target, None)
        elif entry.kind == "grant":
            self._policies.clear()  # the entry names the grant, not its workload; rare

    async def aclose(self) -> None:
        await self.pools.aclose()

    # --- admission ---------------------------------------------------------------------

    def visible_models(self, token: VerifiedToken) -> list[tuple[str, ModelSettings]]:
        return [(n, m) for n, m in self.settings.models.items() if model_allowed(n, token.models)]

    def forget_policy(self, workload_id: str) -> None:
        """Drop a workload's cached policy: its limits changed (a grant, a throttle)."""
        self._policies.pop(workload_id, None)

    async def policy(self, workload_id: str) -> Policy:
        """The workload's effective policy (its rates raised by its live grants, then cut by an
        open throttle), cached briefly to keep the hot path off the database: dropped at once
        when the workload's tokens are cut, it is suspended or its limits change, and never
        kept past a grant's expiry."""
        now = time.monotonic()
        hit = self._policies.get(workload_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        w = _workload.c
        wall = int(time.time())

        def read(conn: Connection) -> tuple[Any, list[GrantRecord], bool] | None:
            row = conn.execute(select(w.policy, w.kind).where(w.id == workload_id)).first()
            if row is None:
                return None
            return row, grants.live_for(conn, workload_id, wall), alerts.throttled(conn, workload_id)

        found = await self.svc.db.read(read)
        if found is None:
            raise InvalidToken()  # the identity is gone: its tokens are dead
        row, live, throttled = found
        policy = grants.raise_rates(effective(Policy.model_validate(row[0]), str(row[1])), live)
        if throttled:
            policy = alerts.throttle(policy, self.settings.monitoring.throttle_factor)
        keep = POLICY_CACHE_S
        if live:
            keep = min(keep, max(0.0, min(g.expires_at for g in live) - time.time()))
        if len(self._policies) >= POLICY_CACHE_MAX:
            self._policies.clear()
        self._policies[workload_id] = (now + keep, policy)
        return policy

    @contextlib.asynccontextmanager
    async def counted(self, token: VerifiedToken, policy: Policy) -> AsyncIterator[None]:
        """A request that holds no money itself (token counting, batch files and jobs) but
        counts against the workload's request rate and its and its tenant's concurrency."""
        ticket = await self.limiter.admit(token.sub, policy, tokens=0, cost_micros=0,
                                          now=time.time(), group=token.tenant,
                                          group_cap=self.settings.gateway.tenant_max_concurrent)
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):  # a cancelled request still leaves the count
                await self.limiter.settle(token.sub, policy, ticket=ticket, held_tokens=0,
                                          used_tokens=0, held_micros=0, used_micros=0,
                                          now=time.time(), group=token.tenant)

    async def admit_model(self, token: VerifiedToken, model: object, op: Operation
                          ) -> tuple[str, ModelSettings, Provider, Policy]:
        """The model a call names, if it exists, is served on this route and may be called
        with this token under the workload's current policy; and that policy."""
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model is required", param="model")
        spec = self.settings.models.get(model)
        if spec is None:
            raise ModelNotFound(f"the model {model[:200]!r} does not exist")
        granted = model_allowed(model, token.grant_models)
        if not (granted or model_allowed(model, token.models)):
            raise ModelNotAllowed(f"this token may not use the model {model!r}")
        provider = self.providers[spec.provider]
        if op not in provider.operations:
            raise InvalidRequest(f"the model {model!r} is not served on this route", param="model")
        policy = await self.policy(token.sub)
        if model_allowed(model, policy.approval_models):
            # Only a live grant for it lets a token call it (the gate refused the token if
            # one of its grants was revoked or has expired).
            if not granted:
                raise ApprovalRequired(f"the model {model!r} needs an approval")
        elif not model_allowed(model, policy.models):
            raise ModelNotAllowed(f"the policy no longer allows the model {model!r}")
        return model, spec, provider, policy

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
        original = dict(body) if self.svc.monitor is not None else None
        model, spec, provider, policy = await self.admit_model(token, body.get("model"), op)
        stream = body.get("stream", False)
        if not isinstance(stream, bool) or (stream and op == "embeddings"):
            raise InvalidRequest("stream must be a boolean (and is not supported for embeddings)",
                                 param="stream")
        ctx = self._contexts[model]
        continued = provider.continues(op, body)
        if continued is not None:
            ctx = await conversations.continuing(self.svc.db, ctx, continued,
                                                 tenant_id=token.tenant, provider=spec.provider)
        plan = tools.plan(provider, op, body, policy, token, self.settings.tools)
        bound = provider.bound_request(op, body, ctx, client_headers)
        requested, choices = provider.output_limit(op, body)
        # Asking for stream usage may refuse a malformed request: do it before money moves.
        client_wants_usage = provider.ask_stream_usage(op, body) if stream else False
        # Quoted against the whole slice, so the limiter's worst case needs no database read.
        admitted = quote(bound, spec, op=op, requested=requested, choices=choices,
                         budget=token.budget_micros, tools=plan.load)
        await self.keys.get(spec.provider)  # a Vault outage refuses the call before money moves
        ticket = await self.limiter.admit(
            token.sub, policy, tokens=admitted.worst.tokens, cost_micros=admitted.held,
            now=time.time(), group=token.tenant,
            group_cap=self.settings.gateway.tenant_max_concurrent)
        hold_id = "h_" + secrets.token_hex(12)
        try:
            held, remaining = await self.writes.run(
                lambda conn: _hold(conn, hold_id, token.jti, admitted))
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._unadmit(token, policy, admitted, ticket, NOTHING, 0, time.time())
            raise
        call = Call(
            token=token, op=op, model=model, provider=provider, policy=policy, body=body,
            stream=stream, client_wants_usage=client_wants_usage, quote=held, admitted=admitted,
            hold_id=hold_id, remaining=remaining, request_id=request_id, client_ip=client_ip,
            started=started, original=original, tools=plan, ticket=ticket,
        )
        try:
            if op != "embeddings":
                provider.set_output_limit(op, body, held.output_limit)
            body["model"] = spec.upstream_model or model
        except BaseException:
            await self.settle(call, nothing(Outcome.REFUSED))
            raise
        return call

    # --- forwarding --------------------------------------------------------------------

    async def forward(self, call: Call, client_headers: Mapping[str, str]) -> Reply | MeteredStream:
        """Send the call upstream. A non-stream call is settled before this returns; a stream
        is handed over to the returned :class:`MeteredStream`, which settles it. Every other
        way out settles here, once: a failure with the charge it names, anything else (a
        cancellation) by how far the call got: once the request is out, the provider may bill
        all of it."""
        request: httpx.Request | None = None
        response: httpx.Response | None = None
        try:
            up, request = await self._prepare(call, client_headers)
            response = await send(up, request, call.quote)
            if response.status_code == 200 and call.stream:
                return self._stream(call, response)
            charge, reply = self._answer(call, response, await read(response, call.quote))
        except Ended as ended:
            await self.settle(call, ended.charge)
            raise ended.error from None
        except BaseException:
            await self.settle(call, unfinished(call.quote, request, response))
            raise
        cost, remaining = await self.settle(call, charge)
        if reply.status != 200:
            return reply
        headers = {**reply.headers, "x-broker-cost-micros": str(cost)}
        if remaining is not None:
            headers["x-broker-budget-remaining-micros"] = str(remaining)
        return Reply(200, reply.content, headers)

    async def _prepare(self, call: Call, client_headers: Mapping[str, str]
                       ) -> tuple[Upstream, httpx.Request]:
        provider = call.provider
        key = await self.keys.get(provider.config.name)
        upstream = provider.build_request(call.op, call.body, key=key,
                                          client_headers=client_headers)
        up = self.pool(provider)
        return up, up.request(upstream.url, upstream.headers, upstream.content)

    def pool(self, provider: Provider) -> Upstream:
        """The provider's own connection pool."""
        config = provider.config
        return self.pools.get(config.name, provider.transport(), timeout_s=config.timeout_s,
                              max_connections=self.settings.providers[config.name].max_connections)

    def _answer(self, call: Call, response: httpx.Response, raw: bytes) -> tuple[Charge, Reply]:
        """The charge and the client's reply of a complete answer; raises :class:`Ended`
        when the client gets an error instead."""
        if response.status_code != 200:
            charge, error = refusal(response)
            if error is not None:
                raise Ended(charge, error)
            return charge, Reply(response.status_code, raw, {"content-type": "application/json"})
        try:
            parsed = json.loads(raw)
        except ValueError:
            raise Ended(whole_hold(Outcome.UPSTREAM_ERROR, call.quote),
                         UpstreamError("the provider's answer is not JSON")) from None
        usage = call.provider.read_usage(call.op, parsed)
        if usage is not None:
            charge = Charge(Outcome.OK, usage)
        else:
            out = call.provider.output_bound(call.op, parsed)
            charge = Charge(Outcome.OK, call.quote.bounded(None, out), estimated=True)
        if parsed is None:  # JSON, but no answer: what it reported is charged all the same
            raise Ended(charge, UpstreamError("the provider's answer is not JSON"))
        return charge, Reply(200, raw, {"content-type": "application/json"})

    def _stream(self, call: Call, response: httpx.Response) -> MeteredStream:
        def is_live() -> bool:
            gate = self.svc.token_gate
            return gate is None or bool(gate.is_live(call.token))

        async def settle(outcome: Outcome, meter: StreamMeter) -> None:
            if meter.final and meter.usage is not None:
                charge = Charge(outcome, meter.usage)
            else:
                charge = Charge(outcome, call.quote.bounded(meter.usage, meter.output_bound),
                                estimated=True)
            await self.settle(call, charge)

        gateway = self.settings.gateway
        # The stream may not outlive its token (plus the leeway), nor the broker's own cap.
        lifetime = min(call.token.exp + LEEWAY_S - time.time(), float(gateway.max_stream_s))
        if call.token.grant_exp is not None:
            lifetime = min(lifetime, call.token.grant_exp - time.time())  # a grant ends exactly
        meter = call.provider.stream_meter(call.op, client_wants_usage=call.client_wants_usage)
        return MeteredStream(response, meter, limit=call.quote.answer_tokens,
                             remaining=call.remaining, deadline=time.monotonic() + lifetime,
                             drain_s=float(gateway.drain_s), is_live=is_live, settle=settle)

    # --- settlement --------------------------------------------------------------------

    async def settle(self, call: Call, charge: Charge) -> tuple[int, int | None]:
        """Charge in full, release the rest of the hold, write the usage event, once.
        Shielded: a cancelled request still settles. Returns (cost, what remains of the
        slice). A charge above the hold (the provider billed more than the bound) is an
        overrun: charged all the same, audited, alerted, and the token revoked."""
        if call.settled:
            return 0, None
        call.settled = True
        usage = charge.usage
        # Without the provider's count, every call the cap allowed may have been made.
        fees = (tools.ToolFees(call.quote.tools.fee_micros) if charge.estimated
                else tools.fees(call.tools, usage.tool_calls, self.settings.tools))
        cost = call.quote.price.cost(usage) + fees.micros
        status = Outcome.OVERRUN if cost > call.quote.held else charge.outcome
        now = time.time()
        event = {
            "request_id": call.request_id[:64],
            "ts": int(now),
            "model": call.model,
            "provider": call.provider.config.name,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "status": status.value,
            "latency_ms": int((time.perf_counter() - call.started) * 1000),
            "stream": call.stream,
            "estimated": charge.estimated,
            "client_ip": call.client_ip[:64] if call.client_ip else None,
            "tool_calls": fees.column,
        }
        remaining: int | None = None
        with anyio.CancelScope(shield=True):
            try:
                remaining = await self.writes.run(
                    lambda conn: self._settle_in(conn, call, cost, event, charge, fees))
            except Exception as exc:
                # The hold stays; the sweeper settles it at the full amount once it is orphaned.
                log.error("settling hold %s failed: %s", call.hold_id, type(exc).__name__)
            finally:
                await self._unadmit(call.token, call.policy, call.admitted, call.ticket, usage,
                                    cost, now)
        self._observe(call, usage, cost, status, now)
        return cost, remaining

    def _observe(self, call: Call, usage: Usage, cost: int, status: Outcome, now: float) -> None:
        monitor = self.svc.monitor
        if monitor is None:
            return
        token = call.token
        monitor.observe(Observation(
            ts=now, workload_id=token.sub, tenant_id=token.tenant, kind=token.kind,
            signal="usage", model=call.model, cost_micros=cost, tokens=usage.tokens,
            price_micros_per_mtok=self.settings.models[call.model].output_micros_per_mtok,
            client_ip=call.client_ip), call.original)
        if status in _FAILED_UPSTREAM:
            monitor.refusal(token.sub, "upstream_error", authenticated=True,
                            tenant_id=token.tenant, kind=token.kind, client_ip=call.client_ip)

    async def _unadmit(self, token: VerifiedToken, policy: Policy, admitted: Quote, ticket: str,
                       used: Usage, cost: int, now: float) -> None:
        # The limiter must be told the very amounts it admitted, whatever the hold became.
        await self.limiter.settle(token.sub, policy, ticket=ticket,
                                  held_tokens=admitted.worst.tokens, used_tokens=used.tokens,
                                  held_micros=admitted.held, used_micros=cost, now=now,
                                  group=token.tenant)

    def _settle_in(self, conn: Connection, call: Call, cost: int, event: dict[str, Any],
                   charge: Charge, fees: tools.ToolFees) -> int | None:
        done = ledger.settle_hold(conn, hold_id=call.hold_id, cost=cost, event=event)
        if done is None:
            return None
        if fees.unauthorised:
            _alert, cut = tools.flag_unauthorised(
                conn, self.settings, workload_id=done.workload_id, tenant_id=done.tenant_id,
                unauthorised=fees.unauthorised, now=int(event["ts"]),
                detail={"request_id": event["request_id"], "model": call.model,
                        "provider": call.provider.config.name, "offered": list(call.tools.offered)})
            apply_here(self.svc.token_gate, cut)
        ended, usage = charge.outcome, charge.usage
        if usage.context_id is not None and not charge.estimated:
            conversations.remember(conn, usage.context_id, tenant_id=call.token.tenant,
                                   provider=call.provider.config.name,
                                   tokens=usage.prompt_tokens + usage.completion_tokens,
                                   now=int(event["ts"]))
        if done.excess:
            entry = actions.revoke_for_overrun(
                conn, jti=done.jti, workload_id=done.workload_id, tenant_id=done.tenant_id,
                excess=done.excess,
                detail={"request_id": event["request_id"], "model": call.model,
                        "provider": call.provider.config.name, "held_micros": call.quote.held,
                        "cost_micros": cost, "ended": ended.value},
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
        apply_here(self.svc.token_gate, entry)


def _hold(conn: Connection, hold_id: str, jti: str, admitted: Quote) -> tuple[Quote, int]:
    """(the quote held, what remains of the slice). Most calls fit as admitted: that is tried
    first, and the slice read only when it does not; the quote then shrinks to what remains,
    retried when a concurrent hold took the room between the read and the conditional update
    (PostgreSQL)."""
    now = int(time.time())
    with contextlib.suppress(InsufficientQuota):
        return admitted, ledger.place_hold(conn, hold_id=hold_id, jti=jti, amount=admitted.held,
                                           now=now)
    for _ in range(HOLD_ATTEMPTS):
        remaining = ledger.slice_remaining(conn, jti)
        if remaining is None:
            # Revoked in the ledger (a suspension, a revoked grant) before this replica's
            # denylist heard of it: the token is dead, whatever its money.
            raise InvalidToken()
        held = admitted.within(remaining)
        try:
            return held, ledger.place_hold(conn, hold_id=hold_id, jti=jti, amount=held.held,
                                           now=now)
        except InsufficientQuota:
            continue
    raise InsufficientQuota("the token's remaining slice is taken by running requests")
