"""Integer price math: micro-dollars per million tokens, always rounded up.

A call's cost is ``ceil((prompt * input_price + completion * output_price) / 1_000_000)``: the
broker never rounds a call down to free, and a hold computed with the same function bounds the
settled cost exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.settings import ModelSettings

MTOK = 1_000_000


@dataclass(frozen=True)
class Price:
    input_micros_per_mtok: int
    output_micros_per_mtok: int

    @classmethod
    def of(cls, model: ModelSettings) -> Price:
        return cls(model.input_micros_per_mtok, model.output_micros_per_mtok)


def cost_micros(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    """What ``prompt_tokens`` in and ``completion_tokens`` out cost, rounded up to a micro."""
    total = prompt_tokens * price.input_micros_per_mtok + completion_tokens * price.output_micros_per_mtok
    return -(-total // MTOK)


def max_output_tokens(price: Price, prompt_tokens: int, budget_micros: int) -> int | None:
    """The largest completion count whose cost with ``prompt_tokens`` stays within ``budget_micros``.

    ``None`` when money sets no limit (output is free and the input fits); a negative number
    when not even the input fits. Exact, because ``ceil(x / M) <= B`` iff ``x <= B * M``.
    """
    room = budget_micros * MTOK - prompt_tokens * price.input_micros_per_mtok
    if room < 0:
        return -1
    if price.output_micros_per_mtok == 0:
        return None
    return room // price.output_micros_per_mtok
