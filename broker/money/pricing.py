"""Integer price math: what a call costs, and the worst case a request can cost.

Prices are configured in micro-dollars per million tokens. Some are fractions of another (an
Anthropic cache write is 1.25 times the input price; a service tier may cost a percentage of the
list price), so rates are kept internally in units of ``1 / RATE_UNIT`` micro-dollar per million
tokens, where every such fraction is a whole number. A call's cost is the sum over its token
classes, divided once and rounded UP to a whole micro-dollar: the broker never rounds a call down
to free, nothing else is rounded, and a hold computed with the same function bounds the settled
cost exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from broker.settings import ModelSettings

MTOK = 1_000_000
# Quarters (1.25 x input for cache writes) times whole percents (service tiers).
RATE_UNIT = 4 * 100
_DIVISOR = RATE_UNIT * MTOK

CacheTtl = Literal["5m", "1h"]


@dataclass(frozen=True)
class Usage:
    """What one call used, as the provider bills it.

    ``prompt_tokens`` counts every input token (uncached, read from the cache and written to it);
    ``cached_tokens``, ``cache_write_tokens`` and ``cache_write_1h_tokens`` say how many of them
    were billed at the cache-read, cache-write and one-hour cache-write prices.
    """

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    # The provider's id of the context this call left behind, which a later call may continue
    # (an OpenAI response, for ``previous_response_id``): its tokens are remembered, not it.
    context_id: str | None = None
    # The provider's server-side tool calls, by the tool's name (``web_search``): billed per
    # call on top of the tokens (their results are input tokens, inside ``prompt_tokens``).
    tool_calls: tuple[tuple[str, int], ...] = ()

    @property
    def uncached_tokens(self) -> int:
        special = self.cached_tokens + self.cache_write_tokens + self.cache_write_1h_tokens
        return max(0, self.prompt_tokens - special)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


NOTHING = Usage(0, 0)


@dataclass(frozen=True)
class Price:
    """One model's rates, in ``1 / RATE_UNIT`` micro-dollar per million tokens."""

    input: int
    output: int
    cached_input: int
    cache_write: int
    cache_write_1h: int

    @classmethod
    def of(cls, model: ModelSettings, percent: int = 100) -> Price:
        """The model's prices, at ``percent`` of the list (a service tier). Unset prices are
        the provider's defaults, never less than it would bill: cached input at the input
        price, a cache write at 1.25 times it; a one-hour cache write is twice the input."""
        pin = model.input_micros_per_mtok
        cached = model.cached_input_micros_per_mtok
        write = model.cache_write_micros_per_mtok
        return cls(
            input=4 * pin * percent,
            output=4 * model.output_micros_per_mtok * percent,
            cached_input=4 * (pin if cached is None else cached) * percent,
            cache_write=(5 * pin if write is None else 4 * write) * percent,
            cache_write_1h=8 * pin * percent,
        )

    def cost(self, usage: Usage) -> int:
        """What ``usage`` costs, rounded up to a micro-dollar."""
        return -(-self.cost_units(usage) // _DIVISOR)

    def worst_input(self, tokens: int, cache: CacheTtl | None) -> Usage:
        """``tokens`` of input split across the classes the request allows so that they cost
        the most. Cost is linear in each class, so the worst split puts every token in the
        dearest class: a cache read or write can only happen as the request allows. Classes are
        compared by exact cost, not rounded: two classes that round to the same micro-dollar
        alone can differ once the output's cost is added."""
        options = [Usage(tokens, 0), Usage(tokens, 0, cached_tokens=tokens)]
        if cache is not None:
            options.append(Usage(tokens, 0, cache_write_tokens=tokens))
        if cache == "1h":
            options.append(Usage(tokens, 0, cache_write_1h_tokens=tokens))
        return max(options, key=self.cost_units)

    def worst_case(self, input_tokens: int, output_tokens: int, cache: CacheTtl | None) -> Usage:
        worst = self.worst_input(input_tokens, cache)
        return Usage(worst.prompt_tokens, output_tokens, worst.cached_tokens,
                     worst.cache_write_tokens, worst.cache_write_1h_tokens)

    def input_rate(self, cache: CacheTtl | None) -> int:
        """The rate of the dearest input class a request may be billed at."""
        rates = [self.input, self.cached_input]
        if cache is not None:
            rates.append(self.cache_write)
        if cache == "1h":
            rates.append(self.cache_write_1h)
        return max(rates)

    def max_output_tokens(self, input_usage: Usage, budget_micros: int) -> int | None:
        """The largest completion count whose cost with ``input_usage`` stays within
        ``budget_micros``.

        ``None`` when money sets no limit (output is free and the input fits); a negative number
        when not even the input fits. Exact, because ``ceil(x / D) <= B`` iff ``x <= B * D``.
        """
        room = budget_micros * _DIVISOR - self.cost_units(input_usage)
        if room < 0:
            return -1
        if self.output == 0:
            return None
        return room // self.output

    def max_output_in_turns(self, input_tokens: int, cache: CacheTtl | None, turns: int,
                            fixed_micros: int, budget_micros: int) -> int | None:
        """The largest output count ``o`` such that ``turns`` model turns, each reading
        ``input_tokens + o`` at the dearest input rate, plus ``o`` of output and
        ``fixed_micros``, cost at most ``budget_micros`` (a request whose server-side tools make
        the provider sample again after each call). ``None`` and negative as
        :meth:`max_output_tokens`; exact for the same reason."""
        rate = self.input_rate(cache)
        room = (budget_micros - fixed_micros) * _DIVISOR - rate * turns * input_tokens
        if room < 0:
            return -1
        per_token = rate * turns + self.output
        if per_token == 0:
            return None
        return room // per_token

    def cost_units(self, usage: Usage) -> int:
        """The exact cost of ``usage`` in ``1 / (RATE_UNIT * MTOK)`` micro-dollars."""
        return (
            usage.uncached_tokens * self.input
            + usage.cached_tokens * self.cached_input
            + usage.cache_write_tokens * self.cache_write
            + usage.cache_write_1h_tokens * self.cache_write_1h
            + usage.completion_tokens * self.output
        )
