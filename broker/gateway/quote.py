"""The money of one gateway call, computed once: what it may be billed at most, and what that costs.

A :class:`Quote` is built by :func:`quote` from the provider's bound on the request, the model's
prices and the budget the call must fit in. The limiter admits the call at it, the ledger holds
its :attr:`Quote.held`, the provider is told its :attr:`Quote.output_limit`, the stream's wall is
set from it, and settlement charges against it: nothing downstream prices the call again.

The call is quoted against its token's whole slice, which needs no database read; only when the
part of the slice left is smaller (other calls spent or hold the rest) does the hold shrink the
quote to it, with :meth:`Quote.within`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.errors import InsufficientQuota
from broker.money.bounds import RequestBound
from broker.money.pricing import CacheTtl, Price, Usage
from broker.plugin import Operation
from broker.settings import ModelSettings

# The output limit set when the client sent none: bounded, so that the hold is.
DEFAULT_OUTPUT_LIMIT = 4096


@dataclass(frozen=True)
class ToolLoad:
    """The worst a request's server-side tools can add (:mod:`broker.gateway.tools`): ``calls``
    in all, each adding at most its result ceiling (``result_tokens`` all together) as input,
    and ``fee_micros`` of per-call fees."""

    calls: int = 0
    result_tokens: int = 0
    fee_micros: int = 0


NO_TOOLS = ToolLoad()


@dataclass(frozen=True)
class Quote:
    """The most one call can be billed, and its price.

    ``output_limit`` is set on every answer (0: the operation has no output to limit, as for
    embeddings); ``worst`` is the usage the hold is priced at, and ``held`` its cost: both follow
    from the other fields, so a quote cannot hold one amount and bound another.
    """

    price: Price
    input_tokens: int  # bounds every input token
    cache: CacheTtl | None  # whether (and how long) the request may write the prompt cache
    extra_output_tokens: int  # billable beyond the output limit (an OpenAI prediction)
    output_limit: int
    choices: int
    tools: ToolLoad = NO_TOOLS
    worst: Usage = field(init=False)
    held: int = field(init=False)

    def __post_init__(self) -> None:
        worst = self.price.worst_case(self.billed_input_tokens, self.output_cap, self.cache)
        object.__setattr__(self, "worst", worst)
        object.__setattr__(self, "held", self.price.cost(worst) + self.tools.fee_micros)

    @property
    def billed_input_tokens(self) -> int:
        """Every input token the provider may bill. With server-side tools the provider samples
        again after each call, and every turn reads the input, the results so far and the output
        so far: at most ``calls + 1`` turns of all of it."""
        if not self.tools.calls:
            return self.input_tokens
        return (self.tools.calls + 1) * (self.input_tokens + self.tools.result_tokens
                                         + self.output_cap)

    @property
    def answer_tokens(self) -> int:
        """The output the limit allows, all answers together: the stream's wall is set from it."""
        return self.output_limit * self.choices

    @property
    def output_cap(self) -> int:
        """The most output the provider may bill: the limit on every answer, plus the output the
        request itself may add."""
        return self.answer_tokens + self.extra_output_tokens

    def bounded(self, reported: Usage | None, output_bound: int) -> Usage:
        """The charge when the provider's final usage is missing: the input it reported (else the
        input bound) and the output seen, counted high, never above the hold's."""
        source = reported if reported is not None else self.price.worst_input(
            self.billed_input_tokens, self.cache)
        seen = max(output_bound, reported.completion_tokens if reported is not None else 0)
        return Usage(source.prompt_tokens, min(self.output_cap, seen), source.cached_tokens,
                     source.cache_write_tokens, source.cache_write_1h_tokens)

    def within(self, budget: int) -> Quote:
        """This quote with its output limit lowered to what ``budget`` pays for. Raises
        :class:`InsufficientQuota` when ``budget`` cannot pay for one token per answer (or, without
        answers, for the input)."""
        smaller = _fit(self.price, self.input_tokens, self.cache, self.extra_output_tokens,
                       self.output_limit, self.choices, budget, self.tools)
        if smaller.held <= budget:
            return smaller
        if self.output_limit:
            raise InsufficientQuota("the token's remaining slice cannot pay for an answer")
        raise InsufficientQuota("the token's remaining slice cannot pay for this input")


def quote(bound: RequestBound, model: ModelSettings, *, op: Operation, requested: int | None,
          choices: int, budget: int, tools: ToolLoad = NO_TOOLS) -> Quote:
    """The call's quote against ``budget`` (the token's whole slice): the output limit the client
    asked for (:data:`DEFAULT_OUTPUT_LIMIT` when none), lowered to what ``budget`` pays for.

    Never refused here, and never below one token per answer: a quote ``budget`` cannot pay
    (``held > budget``) is refused where money is held, after the limiter has counted it."""
    price = Price.of(model, bound.price_percent)
    wanted = 0 if op == "embeddings" else requested or DEFAULT_OUTPUT_LIMIT
    return _fit(price, bound.input_tokens, bound.cache, bound.extra_output_tokens, wanted, choices,
                budget, tools)


def _fit(price: Price, input_tokens: int, cache: CacheTtl | None, extra_output_tokens: int,
         wanted: int, choices: int, budget: int, tools: ToolLoad) -> Quote:
    limit = wanted
    if tools.calls:
        most = price.max_output_in_turns(input_tokens + tools.result_tokens, cache,
                                         tools.calls + 1, tools.fee_micros, budget)
    else:
        most = price.max_output_tokens(price.worst_input(input_tokens, cache), budget)
    # None: output is free and the input fits, so money sets no limit. Without answers (wanted
    # 0) there is no limit to lower.
    if most is not None and wanted:
        limit = max(1, min(wanted, (most - extra_output_tokens) // choices))
    return Quote(price, input_tokens, cache, extra_output_tokens, limit, choices, tools)
