"""Spend policy: the schema admins write, the defaults per identity kind, and model matching.

Policies are strict: an unknown field, a float for money or a negative amount is refused,
because a typo in a policy must never silently weaken it.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr

from broker.identity.names import normalize_name
from broker.settings import MAX_MICROS, BudgetLimit
from broker.settings.monitoring import MonitorAction

Kind = Literal["agent", "service", "interactive", "admin"]
Role = Literal["org-admin", "tenant-admin", "auditor"]
KINDS: tuple[str, ...] = ("agent", "service", "interactive", "admin")

Micros = Annotated[StrictInt, Field(ge=0, le=MAX_MICROS)]

_MODEL_PATTERN = re.compile(r"^[A-Za-z0-9._:/@*?\-\[\]]{1,256}$")


def _check_model_pattern(value: str) -> str:
    if not _MODEL_PATTERN.match(value):
        raise ValueError("must be a model name or glob of 1 to 256 safe characters")
    return value


_TOOL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def _check_tool_name(value: str) -> str:
    if not _TOOL_NAME.match(value):
        raise ValueError("must be a tool type name: lower case letters, digits and _")
    return value


Name = Annotated[StrictStr, AfterValidator(normalize_name)]
ToolName = Annotated[StrictStr, AfterValidator(_check_tool_name)]
BatchRule = Literal["allowed", "approval", "denied"]
ModelPattern = Annotated[StrictStr, AfterValidator(_check_model_pattern)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Rate(_Strict):
    rpm: StrictInt | None = Field(default=None, ge=1, le=1_000_000)
    tpm: StrictInt | None = Field(default=None, ge=1, le=10**12)


class Burst(_Strict):
    window_s: StrictInt = Field(ge=1, le=86_400)
    limit_micros: Micros


def _check_cidr(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ValueError("must be an IP network (CIDR)") from None


Cidr = Annotated[StrictStr, AfterValidator(_check_cidr)]


class MonitoringPolicy(_Strict):
    """Per-workload overrides of what each detector does (``monitoring.actions`` by kind when
    unset; ``off`` silences a detector for this workload), and the networks it calls from."""

    velocity: MonitorAction | None = None
    failures: MonitorAction | None = None
    new_model: MonitorAction | None = None
    origin: MonitorAction | None = None
    loop: MonitorAction | None = None
    # Calls from outside these networks raise ``origin`` from the first call, without learning.
    cidrs: list[Cidr] = Field(default_factory=list, max_length=64)


class Policy(_Strict):
    models: list[ModelPattern] = Field(default_factory=list, max_length=256)
    approval_models: list[ModelPattern] = Field(default_factory=list, max_length=256)
    token_ttl_s: StrictInt | None = Field(default=None, ge=1, le=900)
    token_budget_micros: Micros | None = None
    budgets: list[BudgetLimit] = Field(default_factory=list, max_length=8)
    rate: Rate | None = None
    burst: Burst | None = None
    # Tokens of the workload alive at once, and its gateway calls running at once.
    max_live_tokens: StrictInt | None = Field(default=None, ge=1, le=1_000_000)
    max_concurrent: StrictInt | None = Field(default=None, ge=1, le=1_000_000)
    monitoring: MonitoringPolicy | None = None
    # Tool types the workload may send (``function``: client-side functions; server-side tools
    # by name, as ``tools.<name>`` prices them), and those that need a live grant.
    tools: list[ToolName] | None = Field(default=None, max_length=64)
    approval_tools: list[ToolName] = Field(default_factory=list, max_length=64)
    # Whether the workload may launch batch jobs: freely, under a live grant, or not at all.
    batch: BatchRule | None = None


# Autonomous agents get the strictest defaults: short tokens, small slices, tight rates.
# Every kind may send client-side functions and nothing the provider runs (and bills per call)
# unless its policy says so; an agent's batch jobs need an approval.
KIND_DEFAULTS: dict[str, Policy] = {
    "agent": Policy(token_ttl_s=300, token_budget_micros=500_000, rate=Rate(rpm=60, tpm=100_000),
                    max_live_tokens=20, max_concurrent=8, tools=["function"], batch="approval"),
    "service": Policy(token_ttl_s=600, token_budget_micros=1_000_000,
                      rate=Rate(rpm=600, tpm=1_000_000), max_live_tokens=100, max_concurrent=64,
                      tools=["function"], batch="allowed"),
    "interactive": Policy(token_ttl_s=900, token_budget_micros=1_000_000,
                          rate=Rate(rpm=120, tpm=400_000), max_live_tokens=20, max_concurrent=16,
                          tools=["function"], batch="allowed"),
    "admin": Policy(token_ttl_s=300, token_budget_micros=0, max_live_tokens=20, max_concurrent=4,
                    tools=["function"], batch="denied"),
}


def effective(policy: Policy, kind: str) -> Policy:
    """The policy with every unset field filled from the kind's defaults."""
    base = KIND_DEFAULTS[kind]
    return policy.model_copy(
        update={
            "token_ttl_s": policy.token_ttl_s if policy.token_ttl_s is not None else base.token_ttl_s,
            "token_budget_micros": policy.token_budget_micros
            if policy.token_budget_micros is not None
            else base.token_budget_micros,
            "rate": policy.rate if policy.rate is not None else base.rate,
            "burst": policy.burst if policy.burst is not None else base.burst,
            "max_live_tokens": policy.max_live_tokens if policy.max_live_tokens is not None
            else base.max_live_tokens,
            "max_concurrent": policy.max_concurrent if policy.max_concurrent is not None
            else base.max_concurrent,
            "tools": policy.tools if policy.tools is not None else base.tools,
            "batch": policy.batch if policy.batch is not None else base.batch,
        }
    )


def model_allowed(model: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """Case-sensitive glob match; an empty pattern list allows nothing (fail closed)."""
    return any(fnmatch.fnmatchcase(model, p) for p in patterns)


def scope_within(requested: str, allowed: list[str]) -> bool:
    """A requested scope entry (a name or a glob) is allowed when policy patterns cover it.

    A glob is only granted when the very same glob is in the policy, or when it has no
    wildcards and matches: narrowing never widens.
    """
    if any(ch in requested for ch in "*?["):
        return requested in allowed or any(
            p.endswith("*") and requested.startswith(p[:-1]) and not any(c in p[:-1] for c in "*?[")
            for p in allowed
        )
    return model_allowed(requested, allowed)
