"""Settings of the agent APIs: server-side tools priced per call (``[tools.<name>]``) and batch
jobs (``[batches]``)."""

from __future__ import annotations

from pydantic import Field, StrictInt

from broker.settings.base import MAX_MICROS
from broker.settings.base import Section as _Section


class ToolSettings(_Section):
    """One server-side tool (``web_search``, ``web_fetch``, ``file_search``, ...), by the name a
    policy gives it. A server-side tool without a table here cannot be priced, so it is refused."""

    # What the provider bills per call, on top of tokens (web search: $10 per 1,000 calls).
    micros_per_call: StrictInt = Field(ge=0, le=MAX_MICROS)
    # The calls a request may make when it sets no cap itself; the broker sets this cap on the
    # request (OpenAI ``max_tool_calls``, Anthropic ``max_uses``), so the hold is a bound.
    default_max_calls: StrictInt = Field(default=5, ge=1, le=1000)
    # The most input tokens one call's result adds (search results are billed as input, and
    # the provider does not cap them): a ceiling the hold counts per call. A provider that
    # bills more is an overrun (charged, alerted, the token refused).
    result_tokens_per_call: StrictInt = Field(default=50_000, ge=0, le=10_000_000)


class BatchSettings(_Section):
    # A job the provider no longer knows (or never finishes) is settled at its full hold after
    # this long: the provider may have billed all of it.
    max_age_s: StrictInt = Field(default=172_800, ge=3600, le=30 * 86_400)
    # How often the leader asks the provider about running jobs.
    poll_interval_s: float = Field(default=60.0, gt=0, le=86_400)
    # Limits of an uploaded batch input file (OpenAI's own: 200 MB and 50,000 requests).
    max_file_bytes: StrictInt = Field(default=50 * 1024 * 1024, ge=1024, le=200 * 1024 * 1024)
    max_lines: StrictInt = Field(default=50_000, ge=1, le=50_000)
