"""The ``openai`` provider plugin, and the OpenAI wire format that other plugins reuse.

Chat completions, embeddings and the Responses API (:mod:`plugins.openai_responses`). Usage
comes from the response's ``usage``; in a chat stream it comes from the final chunk, which the
provider sends only when ``stream_options.include_usage`` is set, so the broker always sets it
and drops that chunk when the client had not asked for it.

The hold's input bound (see :mod:`broker.money.bounds`): every field the plugin knows is counted as
text, image parts by OpenAI's tile rule, PDF files by their pages; audio, server-side web search,
tools other than client functions and any unknown field or part are refused, and an OpenAI
``prediction`` is held as output too (its rejected tokens are billed as completion tokens).

Credentials without a static key (:class:`OpenAIProvider`, not the wire format that
``openai-compatible`` reuses), through the Admin API with the admin key as ``Authorization:
Bearer`` (shapes from the ``openai-node`` SDK's ``resources/admin/organization/projects``):

- Rotation (:class:`KeyAdmin`): each key is a service account of ``providers.<name>.project_id``
  (``POST …/service_accounts`` answers its one key in ``api_key``). A key is deleted by deleting
  its account, which takes the key with it: the API refuses to delete a service account's key
  by itself. Given only a key id, the key's ``owner`` says which account to delete (a user's
  key is deleted directly). The key check is ``GET /models`` with the key.
- The project's hard spend limit (:class:`SpendLimiter`): ``…/spend_limit``, in whole cents
  (``threshold_amount``, USD, monthly), rounded up from micro-dollars. A project without one is
  taken to answer 404: the reference does not say.
- Federation (:class:`Federated`): the RFC 8693 token exchange of the SDK's workload identity
  (JSON body, ``subject_token_type`` JWT). An answer without ``expires_in`` lives an hour, as
  the SDK assumes.

:class:`AdminHttp` and :func:`read_token` serve the other plugins' admin clients too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from broker.plugin import (
    OPENAI_COSTLIEST,
    BoundContext,
    ConfigError,
    EndReason,
    ExchangeRequest,
    FederationTarget,
    InvalidRequest,
    KeyRef,
    MeterState,
    MintedKey,
    Operation,
    ProviderConfig,
    ProviderToken,
    RequestBound,
    SseEvent,
    StreamMeter,
    ToolUse,
    Unbounded,
    UpstreamRequest,
    Usage,
    base64_data,
    base_url,
    check_fields,
    data_url,
    delta_tokens,
    ended_code,
    ended_message,
    image_rule,
    image_tokens,
    json_bytes,
    json_tokens,
    messages_tokens,
    pdf_tokens,
    positive_int,
    text_tokens,
    unsized_tokens,
    without,
)
from plugins import openai_responses as responses
from plugins.provider_admin_http import (
    DEFAULT_TOKEN_LIFE_S,
    JWT_TOKEN_TYPE,
    TOKEN_EXCHANGE,
    AdminHttp,
    bearer_headers,
    path_part,
    read_token,
)

# A chat request's framing: a few tokens per message and for priming the reply.
PER_REQUEST_TOKENS = 3
PER_MESSAGE_TOKENS = 4
# The system text a provider adds, unseen, when tools are offered (a ceiling).
TOOL_FRAMING_TOKENS = 1024
MAX_CHOICES = 128
_LIMIT_FIELDS = ("max_completion_tokens", "max_tokens")
# Fields of a chat completion request whose cost the hold bounds (as text, or as below).
CHAT_FIELDS = frozenset({
    "messages", "model", "frequency_penalty", "function_call", "functions", "logit_bias",
    "logprobs", "max_completion_tokens", "max_tokens", "metadata", "modalities", "n",
    "parallel_tool_calls", "prediction", "presence_penalty", "prompt_cache_key",
    "prompt_cache_retention", "reasoning_effort", "response_format", "safety_identifier", "seed",
    "service_tier", "stop", "store", "stream", "stream_options", "temperature", "tool_choice",
    "tools", "top_logprobs", "top_p", "user", "verbosity",
})
CHAT_REFUSED = {
    "audio": "audio output is billed at audio prices the broker does not know",
    "web_search_options": "web search is a server-side tool billed per call, which the broker "
                          "does not price",
}
EMBEDDING_FIELDS = frozenset({"input", "model", "dimensions", "encoding_format", "user"})
# Tiers billed at the list price; any other needs ``models.<name>.service_tier_percent``.
LIST_PRICE_TIERS = frozenset({"auto", "default"})


def _count(raw: Mapping[str, Any], name: str) -> int | None:
    value = raw.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _usage(raw: Any) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    prompt, completion = _count(raw, "prompt_tokens"), _count(raw, "completion_tokens")
    if prompt is None:
        return None
    if completion is None:
        if raw.get("completion_tokens") is not None:
            return None
        completion = 0  # embeddings report none
    details = raw.get("prompt_tokens_details")
    cached = _count(details, "cached_tokens") if isinstance(details, dict) else None
    return Usage(prompt, completion, cached_tokens=min(cached or 0, prompt))


def _embedding_tokens(value: Any) -> int:
    """Strings count their bytes; token ids (lists of integers) one each."""
    if isinstance(value, str):
        return text_tokens(value)
    if isinstance(value, list):
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return len(value)
        return sum(_embedding_tokens(v) for v in value) + len(value)
    return json_tokens(value)


def _delta_text(delta: Any) -> str:
    if isinstance(delta, str):
        return delta
    if isinstance(delta, dict):
        return "".join(_delta_text(v) for k, v in delta.items() if k not in ("role", "type", "id"))
    if isinstance(delta, list):
        return "".join(_delta_text(v) for v in delta)
    return ""


class OpenAIStreamMeter(MeterState):
    def __init__(self, *, client_wants_usage: bool) -> None:
        super().__init__()
        self.client_wants_usage = client_wants_usage

    def read(self, event: SseEvent) -> bool:
        data = event.data
        if data.startswith("[DONE]"):
            self.done = True
            return True
        chunk = event.json_object()
        if chunk is None:
            return True
        if chunk.get("error"):
            self.failed = True
            return True
        usage = _usage(chunk.get("usage"))
        if usage is not None:
            self.usage, self.final = usage, True
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict) and choice.get("delta"):
                    low, high = delta_tokens(_delta_text(choice["delta"]))
                    self.streamed_tokens += low
                    self.output_bound += high
        return not (usage is not None and not choices and not self.client_wants_usage)

    def epilogue(self, reason: EndReason) -> bytes:
        if reason == "limit":
            return b"data: [DONE]\n\n"
        error = {"message": ended_message(reason), "type": "api_error",
                 "code": ended_code(reason), "param": None}
        return json_bytes_sse({"error": error})


def json_bytes_sse(data: Any) -> bytes:
    return b"data: " + json_bytes(data) + b"\n\n"


class OpenAIWire:
    """The OpenAI chat-completions and embeddings wire format, against ``self.base``."""

    # Which field to set when the client sent no limit; OpenAI's own API prefers the newer one,
    # servers that only mimic it (vLLM, Ollama) all know ``max_tokens``.
    limit_field = "max_completion_tokens"
    operations: frozenset[Operation] = frozenset({"chat", "embeddings", "responses"})

    def __init__(self, config: ProviderConfig, base: str) -> None:
        self.config = config
        self.base = base

    def transport(self) -> httpx.AsyncBaseTransport | None:
        return None

    # --- the hold's bound ----------------------------------------------------------------

    def bound_request(
        self, op: Operation, body: dict[str, Any], ctx: BoundContext,
        client_headers: Mapping[str, str],
    ) -> RequestBound:
        if op == "embeddings":
            check_fields(body, EMBEDDING_FIELDS, ctx)
            return RequestBound(max(1, _embedding_tokens(body.get("input"))))
        if op == "responses":
            return responses.bound(body, ctx, lambda tier: self._tier_percent(tier, ctx),
                                   lambda part, where: self._part_tokens(part, where, ctx))
        check_fields(body, CHAT_FIELDS, ctx, CHAT_REFUSED)
        percent = self._tier_percent(body.get("service_tier"), ctx)
        if body.get("modalities") not in (None, ["text"]):
            raise Unbounded("modalities: only text output is priced by the broker",
                            param="modalities")
        tools = body.get("tools")
        responses.check_client_tools(tools)
        total = PER_REQUEST_TOKENS + json_tokens(without(body, ("messages",)))
        if tools or body.get("functions"):
            total += TOOL_FRAMING_TOKENS
        total += messages_tokens(body.get("messages"), PER_MESSAGE_TOKENS,
                                 lambda part, where: self._part_tokens(part, where, ctx))
        prediction = body.get("prediction")
        extra = json_tokens(prediction) if prediction is not None else 0
        return RequestBound(total, None, extra, percent)

    def _tier_percent(self, tier: Any, ctx: BoundContext) -> int:
        if tier is None or tier in LIST_PRICE_TIERS:
            return 100
        percent = ctx.service_tier_percent.get(tier) if isinstance(tier, str) else None
        if percent is None:
            raise Unbounded(
                f"service_tier: {str(tier)[:40]!r} is billed at a price the broker does not know "
                "(models.<name>.service_tier_percent)", param="service_tier")
        return percent

    def _part_tokens(self, part: Any, where: str, ctx: BoundContext) -> int:
        if not isinstance(part, dict):
            return json_tokens(part)
        kind = part.get("type")
        if kind in ("text", "refusal"):
            return json_tokens(part)
        if kind == "image_url":
            image = part.get("image_url")
            if not isinstance(image, dict):
                raise InvalidRequest(f"{where}.image_url must be an object", param=where)
            decoded = data_url(image.get("url"), ctx, f"{where}.image_url.url")
            if decoded is not None and not decoded[0].startswith("image/"):
                raise Unbounded(f"{where}.image_url.url: not an image", param=where)
            detail = image.get("detail")
            tokens = image_tokens(image_rule(ctx, OPENAI_COSTLIEST),
                                  decoded[1] if decoded else None, where,
                                  detail if isinstance(detail, str) else None)
            return tokens + json_tokens({**part, "image_url": without(image, ("url",))})
        if kind == "file":
            file = part.get("file")
            if not isinstance(file, dict):
                raise InvalidRequest(f"{where}.file must be an object", param=where)
            rest = json_tokens({**part, "file": without(file, ("file_data",))})
            if file.get("file_data") is not None:
                data = file["file_data"]
                decoded = data_url(data, ctx, f"{where}.file.file_data")
                raw = decoded[1] if decoded is not None else base64_data(
                    data, ctx, f"{where}.file.file_data")
                return rest + pdf_tokens(raw, ctx, f"{where}.file.file_data")
            return rest + unsized_tokens(ctx, f"{where}.file.file_id")
        if kind == "input_audio":
            raise Unbounded(f"{where}: audio input is billed at audio prices the broker does "
                            "not know", param=where)
        raise Unbounded(f"{where}.type: the part type {str(kind)[:40]!r} cannot be priced",
                        param=f"{where}.type")

    # --- the output limit ----------------------------------------------------------------

    def output_limit(self, op: Operation, body: dict[str, Any]) -> tuple[int | None, int]:
        if op == "embeddings":
            return 0, 1
        if op == "responses":
            return responses.output_limit(body)
        limits = []
        for name in _LIMIT_FIELDS:
            if body.get(name) is not None:
                value = positive_int(body[name])
                if value is None:
                    raise InvalidRequest(f"{name} must be a positive integer", param=name)
                limits.append(value)
        choices = 1 if body.get("n") is None else positive_int(body["n"])
        if choices is None or choices > MAX_CHOICES:
            raise InvalidRequest(f"n must be an integer from 1 to {MAX_CHOICES}", param="n")
        # The provider honours max_completion_tokens over max_tokens; the larger bounds both.
        return (max(limits) if limits else None), choices

    def set_output_limit(self, op: Operation, body: dict[str, Any], limit: int) -> None:
        if op == "embeddings":
            return
        if op == "responses":
            body["max_output_tokens"] = limit
            return
        present = [name for name in _LIMIT_FIELDS if body.get(name) is not None]
        for name in present or [self.limit_field]:
            body[name] = limit

    def ask_stream_usage(self, op: Operation, body: dict[str, Any]) -> bool:
        if op == "responses":
            return True  # the terminal event always carries usage; nothing to strip
        options = body.get("stream_options")
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise InvalidRequest("stream_options must be an object", param="stream_options")
        asked = options.get("include_usage") is True
        body["stream_options"] = {**options, "include_usage": True}
        return asked

    def tools(self, op: Operation, body: dict[str, Any]) -> list[ToolUse]:
        if op == "responses":
            return responses.tools(body)
        if op == "embeddings":
            return []
        found = responses.tools({"tools": body.get("tools")})
        if body.get("functions"):
            found.append(ToolUse("function", len(found)))
        return found

    def cap_tools(self, op: Operation, body: dict[str, Any], tool: ToolUse, calls: int,
                  result_tokens: int) -> None:
        if op == "responses":
            responses.cap_tools(body, calls)

    def continues(self, op: Operation, body: dict[str, Any]) -> str | None:
        return responses.continues(body) if op == "responses" else None

    # --- the wire ------------------------------------------------------------------------

    def build_request(
        self, op: Operation, body: dict[str, Any], *, key: str, client_headers: Mapping[str, str]
    ) -> UpstreamRequest:
        path = {"embeddings": "/embeddings", "responses": responses.PATH}.get(
            op, "/chat/completions")
        headers = {"content-type": "application/json", "accept": "application/json"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        return UpstreamRequest(self.base + path, headers, json_bytes(body))

    def read_usage(self, op: Operation, response: Any) -> Usage | None:
        if op == "responses":
            return responses.read_usage(response)
        return _usage(response.get("usage")) if isinstance(response, dict) else None

    def output_bound(self, op: Operation, response: Any) -> int:
        if op == "responses":
            return responses.output_bound(response)
        if op == "embeddings" or not isinstance(response, dict):
            return 0
        choices = response.get("choices")
        if not isinstance(choices, list):
            return 0
        return sum(json_tokens(c.get("message")) for c in choices if isinstance(c, dict))

    def stream_meter(self, op: Operation, *, client_wants_usage: bool) -> StreamMeter:
        if op == "responses":
            return responses.ResponsesStreamMeter()
        return OpenAIStreamMeter(client_wants_usage=client_wants_usage)


class OpenAIProvider(OpenAIWire):
    """The ``openai`` plugin: the wire format, and the Admin API's key rotation, project spend
    limit and federation."""

    def __init__(self, config: ProviderConfig) -> None:
        if not config.has_key and config.credential != "federated":
            raise ConfigError(f"invalid configuration: {config.key('vault_path')}: required")
        super().__init__(config, base_url(config, "https://api.openai.com/v1"))
        self.admin = AdminHttp("openai", config.timeout_s)

    def _project(self, project_id: str | None = None) -> str:
        project = project_id or self.config.project_id
        if not project:
            raise ConfigError(f"invalid configuration: {self.config.key('project_id')}: required")
        return f"{self.base}/organization/projects/{path_part(project)}"

    # --- KeyAdmin ------------------------------------------------------------------------

    def create_key(self, admin_key: str, name: str) -> MintedKey:
        step = "creating a service account"
        answer = self.admin.read(step, "POST", f"{self._project()}/service_accounts",
                                 bearer_headers(admin_key), body={"name": name})
        account, key = answer.get("id"), answer.get("api_key")
        key_id = key.get("id") if isinstance(key, dict) else None
        value = key.get("value") if isinstance(key, dict) else None
        if not (isinstance(account, str) and account and isinstance(key_id, str) and key_id
                and isinstance(value, str) and value):
            raise self.admin.error(step, "the answer holds no key")
        return MintedKey(key_id=key_id, key=value, account_id=account)

    def check_key(self, key: str) -> bool:
        return self.admin.check("checking a key", f"{self.base}/models", bearer_headers(key))

    def delete_key(self, admin_key: str, ref: KeyRef) -> None:
        project, headers = self._project(), bearer_headers(admin_key)
        if ref.account_id:
            self.admin.call("deleting a service account", "DELETE",
                            f"{project}/service_accounts/{path_part(ref.account_id)}", headers,
                            gone_ok=True)
            return
        if not ref.key_id:
            for found in self.find_keys(admin_key, ref.name):
                self.delete_key(admin_key, found)
            return
        url = f"{project}/api_keys/{path_part(ref.key_id)}"
        key = self.admin.call("reading an API key", "GET", url, headers, gone_ok=True)
        if key is None:
            return
        owner = key.get("owner")
        account = owner.get("service_account") if isinstance(owner, dict) else None
        account_id = account.get("id") if isinstance(account, dict) else None
        if isinstance(account_id, str) and account_id:
            self.delete_key(admin_key, KeyRef(ref.name, ref.key_id, account_id))
        else:
            self.admin.call("deleting an API key", "DELETE", url, headers, gone_ok=True)

    def find_keys(self, admin_key: str, name: str) -> list[KeyRef]:
        accounts = self.admin.cursor_pages("listing service accounts",
                                           f"{self._project()}/service_accounts",
                                           bearer_headers(admin_key), "after")
        return [KeyRef(name, account_id=a["id"]) for a in accounts
                if a.get("name") == name and isinstance(a.get("id"), str) and a["id"]]

    # --- SpendLimiter --------------------------------------------------------------------

    def spend_limit(self, admin_key: str, project_id: str) -> int | None:
        step = "reading the project's spend limit"
        answer = self.admin.call(step, "GET", f"{self._project(project_id)}/spend_limit",
                                 bearer_headers(admin_key), gone_ok=True)
        if answer is None:
            return None
        cents = answer.get("threshold_amount")
        if (isinstance(cents, bool) or not isinstance(cents, int) or cents < 0
                or answer.get("currency", "USD") != "USD"):
            raise self.admin.error(step, "the answer holds no limit in US cents")
        return cents * 10_000

    def set_spend_limit(self, admin_key: str, project_id: str, limit_micros: int) -> None:
        cents = -(-limit_micros // 10_000)  # up: the limit is a ceiling, never below the ledger's
        self.admin.read("setting the project's spend limit", "POST",
                        f"{self._project(project_id)}/spend_limit", bearer_headers(admin_key),
                        body={"currency": "USD", "interval": "month", "threshold_amount": cents})

    # --- Federated -----------------------------------------------------------------------

    def exchange_request(self, assertion: str, target: FederationTarget) -> ExchangeRequest:
        if not target.identity_provider_id or not target.service_account_id:
            raise ConfigError(f"invalid configuration: {self.config.key('identity_provider_id')} "
                              f"and {self.config.key('service_account_id')}: required")
        return ExchangeRequest(
            target.token_url,
            {"content-type": "application/json", "accept": "application/json"},
            {"grant_type": TOKEN_EXCHANGE, "subject_token_type": JWT_TOKEN_TYPE,
             "subject_token": assertion, "identity_provider_id": target.identity_provider_id,
             "service_account_id": target.service_account_id},
        )

    def read_exchange(self, status: int, body: bytes, now: float) -> ProviderToken:
        return read_token("openai", status, body, now, DEFAULT_TOKEN_LIFE_S)


class OpenAIPlugin:
    def create(self, config: ProviderConfig) -> OpenAIProvider:
        return OpenAIProvider(config)


plugin = OpenAIPlugin()
