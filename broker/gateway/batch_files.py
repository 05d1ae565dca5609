"""The input file of a batch job, checked line by line as live chat completions are.

Each line ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}`` (chat
completions only) must name a model the token may call (404 and 403 exactly as the gateway's),
all of one provider; its tools must be allowed by the policy (and be client-side: a server-side
tool's fees are not metered in a batch), its body is bounded by the provider's plugin exactly as
a live call's (:meth:`broker.plugin.Provider.bound_request`, then
:func:`broker.gateway.quote.quote` with a budget that lowers no limit), its output limit is set
explicitly (:data:`~broker.gateway.quote.DEFAULT_OUTPUT_LIMIT` when it gave none, so the provider
can never bill beyond it), its model is rewritten to the upstream one, and ``stream`` is refused.
A line with ``n`` > 1 counts ``n`` answers. The first fault is a 400 (or the gateway's 403/404)
whose ``param`` names the line: ``line 3: ...``.

What the broker keeps of a file is its worst case in token units, by model and by line, so that
a batch is held at the prices of its day; never its content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from broker.errors import BrokerError, InvalidRequest, PayloadTooLarge, Unbounded
from broker.gateway import tools
from broker.gateway.calls import Gateway
from broker.gateway.quote import quote
from broker.identity.policy import Policy
from broker.money.bounds import BoundContext
from broker.money.pricing import Usage
from broker.plugin import Operation, Provider
from broker.settings import ModelSettings
from broker.tokens.tokens import VerifiedToken

OP: Operation = "chat"
ENDPOINT = "/v1/chat/completions"
LINE_FIELDS = frozenset({"custom_id", "method", "url", "body"})
MAX_CUSTOM_ID = 512
# A budget no line reaches: each line is quoted at its own output limit, never a lower one.
UNLIMITED_MICROS = 2**62
# Lines checked between two turns of the event loop.
YIELD_EVERY = 64


# --- token units ---------------------------------------------------------------------------


def counts(usage: Usage) -> list[int]:
    """A usage's token classes as stored: [prompt, completion, cached, cache write, 1h write]."""
    return [usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens,
            usage.cache_write_tokens, usage.cache_write_1h_tokens]


def usage_of(stored: list[Any]) -> Usage:
    prompt, completion, cached, write, write_1h = (int(n) for n in stored[:5])
    return Usage(prompt, completion, cached, write, write_1h)


def plus(a: Usage, b: Usage) -> Usage:
    return Usage(a.prompt_tokens + b.prompt_tokens, a.completion_tokens + b.completion_tokens,
                 a.cached_tokens + b.cached_tokens, a.cache_write_tokens + b.cache_write_tokens,
                 a.cache_write_1h_tokens + b.cache_write_1h_tokens)


# --- the input file ------------------------------------------------------------------------


@dataclass
class CheckedFile:
    """An input file as the provider gets it, and its worst case in token units."""

    content: bytes
    provider: Provider
    lines: int
    worst: dict[str, Usage]  # by model
    line_worst: dict[str, tuple[str, Usage]]  # by custom_id: (model, its worst case)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise InvalidRequest(f"duplicate JSON key {k[:100]!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise InvalidRequest(f"{name} is not valid JSON")


def _parse_line(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates,
                           parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise InvalidRequest("not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidRequest("a request line must be a JSON object")
    return value


def _in_body(exc: BrokerError) -> BrokerError:
    """An error about a field of the line's body, named as such (``body.max_tokens``)."""
    exc.param = f"body.{exc.param}" if exc.param else "body"
    return exc


def _at_line(exc: BrokerError, number: int) -> BrokerError:
    """The same error (its status and code unchanged), naming the line it is about."""
    exc.detail = f"line {number}: {exc.detail}"
    exc.param = f"line {number}: {exc.param or 'body'}"
    exc.args = (exc.detail,)
    return exc


class _FileChecker:
    """Checks the lines of one file in order (models admitted once each)."""

    def __init__(self, gateway: Gateway, token: VerifiedToken) -> None:
        self.gateway = gateway
        self.token = token
        self.settings = gateway.settings
        self.admitted: dict[str, tuple[ModelSettings, Provider, BoundContext]] = {}
        self.provider: str | None = None
        self.policy = Policy()  # the workload's, as admitting the first model read it
        self.worst: dict[str, Usage] = {}
        self.line_worst: dict[str, tuple[str, Usage]] = {}

    async def line(self, text: str) -> str:
        """The line as the provider gets it."""
        entry = _parse_line(text)
        if set(entry) != LINE_FIELDS:
            raise InvalidRequest("a request line has exactly custom_id, method, url and body")
        custom_id = entry["custom_id"]
        if not isinstance(custom_id, str) or not 0 < len(custom_id) <= MAX_CUSTOM_ID \
                or "\x00" in custom_id or not custom_id.isprintable():
            raise InvalidRequest(f"custom_id must be printable text of 1 to {MAX_CUSTOM_ID} "
                                 "characters", param="custom_id")
        if custom_id in self.line_worst:
            raise InvalidRequest(f"duplicate custom_id {custom_id[:100]!r}", param="custom_id")
        if entry["method"] != "POST" or entry["url"] != ENDPOINT:
            raise InvalidRequest(f"only POST {ENDPOINT} is supported in a batch", param="url")
        body = entry["body"]
        if not isinstance(body, dict):
            raise InvalidRequest("body must be a JSON object", param="body")
        if body.get("stream") not in (None, False):
            raise InvalidRequest("stream is not supported in a batch", param="body.stream")
        try:
            model, spec, provider, ctx = await self._admit(body.get("model"))
        except BrokerError as exc:
            exc.param = "model"
            raise _in_body(exc) from None
        try:
            worst = self._bound(body, spec, provider, ctx)
        except BrokerError as exc:
            raise _in_body(exc) from None
        body["model"] = spec.upstream_model or model
        self.worst[model] = plus(self.worst.get(model, Usage(0, 0)), worst)
        self.line_worst[custom_id] = (model, worst)
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": ENDPOINT,
                           "body": body}, separators=(",", ":"))

    def _bound(self, body: dict[str, Any], spec: ModelSettings, provider: Provider,
               ctx: BoundContext) -> Usage:
        """The line's worst case, as a live call's: its output limit set on the body."""
        # The tools a line offers are checked against the policy as a live call's are; a
        # server-side tool's per-call fees are not metered in a batch.
        if tools.plan(provider, OP, body, self.policy, self.token,
                      self.settings.tools).load.calls:
            raise Unbounded("server-side tools are not supported in a batch", param="tools")
        bound = provider.bound_request(OP, body, ctx, {})
        if bound.price_percent != 100:
            raise Unbounded("a batch is billed at the batch price, not a service tier's",
                            param="service_tier")
        requested, choices = provider.output_limit(OP, body)
        worst = quote(bound, spec, op=OP, requested=requested, choices=choices,
                      budget=UNLIMITED_MICROS)
        # Set even when the client gave one: the provider then bills at most this per answer.
        provider.set_output_limit(OP, body, worst.output_limit)
        return worst.worst

    async def _admit(self, model: object) -> tuple[str, ModelSettings, Provider, BoundContext]:
        if isinstance(model, str) and model in self.admitted:
            return (model, *self.admitted[model])
        name, spec, provider, self.policy = await self.gateway.admit_model(self.token, model, OP)
        if self.provider is not None and spec.provider != self.provider:
            raise InvalidRequest("every line of a batch must use models of one provider")
        self.provider = spec.provider
        ctx = BoundContext.of(spec, self.settings.providers[spec.provider],
                              max_media_bytes=self.settings.server.max_body_bytes)
        self.admitted[name] = (spec, provider, ctx)
        return name, spec, provider, ctx


async def check_file(gateway: Gateway, token: VerifiedToken, raw: bytes) -> CheckedFile:
    """The file rewritten for the provider, or the first fault, naming its line (1-based)."""
    limits = gateway.settings.batches
    if len(raw) > limits.max_file_bytes:
        raise PayloadTooLarge(f"the file exceeds {limits.max_file_bytes} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("the file is not UTF-8 text", param="file") from None
    checker = _FileChecker(gateway, token)
    out: list[str] = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue  # a blank line (the last newline) is no request
        if len(out) >= limits.max_lines:
            raise InvalidRequest(f"the file holds more than {limits.max_lines} requests "
                                 "(batches.max_lines)", param="file")
        try:
            out.append(await checker.line(line))
        except BrokerError as exc:
            raise _at_line(exc, number) from None
        if len(out) % YIELD_EVERY == 0:
            # A large file is seconds of CPU: let the worker's other requests through meanwhile.
            await anyio.sleep(0)
    if not out:
        raise InvalidRequest("the file holds no request", param="file")
    assert checker.provider is not None
    return CheckedFile(("\n".join(out) + "\n").encode(), gateway.providers[checker.provider],
                       len(out), checker.worst, checker.line_worst)


def multipart(filename: str, content: bytes) -> tuple[bytes, str]:
    """The provider's upload body (OpenAI's: ``purpose`` and ``file``) and its content type."""
    encoded = httpx.Request("POST", "http://upload.invalid", data={"purpose": "batch"},
                            files={"file": (filename, content, "application/jsonl")})
    return encoded.read(), encoded.headers["content-type"]
