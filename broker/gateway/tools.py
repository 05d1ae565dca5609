"""Tools a gateway call offers the model: checked against the policy, priced, capped and settled.

Every route that carries tools (chat completions, responses, messages) goes through here, in
this order, before the request is bounded:

1. every tool the provider plugin lists (:meth:`broker.plugin.Provider.tools`) must be in the
   workload's ``policy.tools`` (403 ``tool_not_allowed``), or in ``policy.approval_tools`` with a
   live grant of it on the token (403 ``approval_required``);
2. a server-side tool, which the provider runs and bills per call, must have a price
   (``tools.<name>.micros_per_call``), else its cost cannot be bounded (400);
3. its calls are capped: the request's own cap, else ``tools.<name>.default_max_calls``, which
   the broker sets on the request (OpenAI ``max_tool_calls``, Anthropic ``max_uses``), so that the
   provider itself enforces the bound the hold counts (:class:`broker.gateway.quote.ToolLoad`).

At settlement the calls the provider reports are charged at their price and written to the usage
event (``tool_calls``). A call of a tool the request did not offer cannot happen if the provider
honours the request; if it does anyway, the call is charged (at the dearest configured price when
the tool has none), and the workload is suspended with a critical alert saying so.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from broker.errors import ApprovalRequired, BrokerError, ToolNotAllowed, Unbounded
from broker.gateway.quote import NO_TOOLS, ToolLoad
from broker.identity.identities import ROOT_TENANT_ID, Actor
from broker.identity.policy import Policy
from broker.monitoring import alerts, webhooks
from broker.plugin import Operation, Provider
from broker.revocation import actions
from broker.revocation.log import Entry
from broker.settings import Settings
from broker.settings.agents import ToolSettings
from broker.storage.audit import record
from broker.tokens.tokens import VerifiedToken

log = logging.getLogger("broker.gateway")

GATEWAY_ACTOR = Actor(id="broker:gateway", tenant_id=ROOT_TENANT_ID, roles=frozenset({"org-admin"}))
DETECTOR = "unauthorised_tool"


@dataclass(frozen=True)
class ToolPlan:
    """The server-side tools one call may use (by policy name), and the most they can cost."""

    offered: tuple[str, ...] = ()
    load: ToolLoad = NO_TOOLS
    prices: Mapping[str, int] = field(default_factory=dict)


NO_PLAN = ToolPlan()


@dataclass(frozen=True)
class ToolFees:
    """What a call's tool calls cost: the fees, the calls by tool, and the calls of tools the
    call did not offer (which should never happen)."""

    micros: int = 0
    calls: Mapping[str, int] = field(default_factory=dict)
    unauthorised: Mapping[str, int] = field(default_factory=dict)

    @property
    def column(self) -> str | None:
        """The usage event's ``tool_calls``: compact JSON, or None without calls."""
        if not self.calls:
            return None
        return json.dumps(dict(sorted(self.calls.items())), separators=(",", ":"))


def check_allowed(name: str, policy: Policy, token: VerifiedToken) -> None:
    if name in policy.approval_tools:
        if name not in token.grant_tools:
            raise ApprovalRequired(f"the tool {name!r} needs an approval")
        return
    if name not in (policy.tools or ()):
        raise ToolNotAllowed(f"the policy does not allow the tool type {name!r}")


def plan(provider: Provider, op: Operation, body: dict[str, Any], policy: Policy,
         token: VerifiedToken, priced: Mapping[str, ToolSettings]) -> ToolPlan:
    """Check the request's tools against the policy, cap the calls of its server-side tools on
    the request, and say what they can cost at most."""
    uses = provider.tools(op, body)
    if not uses:
        return NO_PLAN
    for use in uses:
        check_allowed(use.name, policy, token)
    server = [use for use in uses if use.server]
    if not server:
        return NO_PLAN
    for use in server:
        if use.name not in priced:
            raise Unbounded(f"tools[{use.index}]: the server-side tool {use.name!r} has no "
                            f"price (tools.{use.name}.micros_per_call)",
                            param=f"tools[{use.index}]")
    calls = results = fees = 0
    shared = [use for use in server if use.shared]
    if shared:
        # One cap for all of them: each call may be the dearest of them.
        cap = shared[0].max_calls or max(priced[u.name].default_max_calls for u in shared)
        result = max(priced[u.name].result_tokens_per_call for u in shared)
        provider.cap_tools(op, body, shared[0], cap, result)
        calls, results = cap, cap * result
        fees = cap * max(priced[u.name].micros_per_call for u in shared)
    for use in server:
        if use.shared:
            continue
        cost = priced[use.name]
        cap = use.max_calls or cost.default_max_calls
        provider.cap_tools(op, body, use, cap, cost.result_tokens_per_call)
        calls += cap
        results += cap * cost.result_tokens_per_call
        fees += cap * cost.micros_per_call
    offered = tuple(dict.fromkeys(use.name for use in server))
    return ToolPlan(offered, ToolLoad(calls, results, fees),
                    {name: priced[name].micros_per_call for name in offered})


def fees(tool_plan: ToolPlan, reported: tuple[tuple[str, int], ...],
         priced: Mapping[str, ToolSettings]) -> ToolFees:
    """The fees of the calls the provider reported, by the names the request offered them
    under (a ``web_search_call`` of an offered ``web_search_preview`` is a call of it)."""
    if not reported:
        return ToolFees()
    micros = 0
    calls: dict[str, int] = {}
    unauthorised: dict[str, int] = {}
    for name, count in reported:
        offered = _offered(name, tool_plan.offered)
        if offered is not None:
            price = tool_plan.prices[offered]
        else:
            offered = name
            unauthorised[name] = unauthorised.get(name, 0) + count
            known = priced.get(name)
            price = known.micros_per_call if known is not None else max(
                (t.micros_per_call for t in priced.values()), default=0)
        calls[offered] = calls.get(offered, 0) + count
        micros += count * price
    return ToolFees(micros, calls, unauthorised)


def _offered(name: str, offered: tuple[str, ...]) -> str | None:
    if name in offered:
        return name
    return next((o for o in offered if o.startswith(name)), None)


def flag_unauthorised(conn: Connection, settings: Settings, *, workload_id: str, tenant_id: str,
                      unauthorised: Mapping[str, int], detail: dict[str, Any],
                      now: int) -> tuple[alerts.AlertRecord, Entry | None]:
    """Suspend the workload and raise a critical alert: the provider ran a tool the request
    did not offer, which the broker's bound never counted."""
    named = ", ".join(f"{count} x {name!r}" for name, count in sorted(unauthorised.items()))
    summary = (f"the provider reported tool calls the request did not offer ({named}); this "
               "should never happen: they are charged, and the workload is suspended until an "
               "admin resumes it")
    entry = None
    done = "alert"
    with contextlib.suppress(BrokerError):  # gone, or an admin's own identity
        _view, entry = actions.suspend(conn, GATEWAY_ACTOR, "workload", workload_id,
                                       summary[:512], now)
        if entry is not None:
            done = "suspend"
    evidence = {**detail, "tool_calls": dict(unauthorised)}
    alert = alerts.create(conn, tenant_id=tenant_id, workload_id=workload_id, detector=DETECTOR,
                          severity="critical", action=done, summary=summary, evidence=evidence,
                          now=now)
    record(conn, GATEWAY_ACTOR.id, "alert.raise", alert.id,
           {"workload_id": workload_id, "tenant_id": tenant_id, "detector": DETECTOR,
            "severity": "critical", "action": done, "summary": summary}, now)
    webhooks.enqueue(conn, settings.alerts, alerts.view(alert), now)
    log.error("alert %s: %s on workload %s: %s", alert.id, DETECTOR, workload_id, summary)
    return alert, entry
