"""What a model call can cost at most: the sound input bound a hold is made of.

A hold limits money, so it must be an upper bound on what the provider can bill, proven rather
than estimated, whatever a hostile client puts in the request:

* **Text.** Tokenizers of the providers are byte-level BPEs: every token stands for at least one
  byte of the text it encodes, so a text of ``n`` UTF-8 bytes is at most ``n`` tokens. The bound
  takes the compact UTF-8 JSON of the content (every string and key at any depth, numbers, the
  punctuation) and adds :data:`STRUCTURE_TOKENS` per structural character, so a provider that
  renders a JSON schema with more framing than JSON itself still stays inside it.
* **Media.** An image costs what the provider's documented rule says for its dimensions (read
  from the header, never decoded), or the rule's maximum when the broker cannot see it; a PDF
  costs a configured ceiling per page (pages read with a PDF reader); a part whose size cannot be
  seen (a file id, a document URL) costs ``providers.<name>.unsized_part_tokens``, or is refused.
* **Anything else the broker cannot bound is refused** (:class:`broker.errors.Unbounded`, a 400
  naming the field): an unknown request field, an unknown content part, a server-side tool, an
  audio part, an unlisted beta flag, an unpriced service tier. Never forwarded unpriced.

Plugins build a :class:`RequestBound` with these helpers (through :mod:`broker.providers`); the
gateway prices it with :mod:`broker.money.pricing` and holds it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from broker.errors import Unbounded
from broker.money import media
from broker.money.media import ANTHROPIC_PIXELS, OPENAI_COSTLIEST, ImageRule, MediaError
from broker.money.pdf import pdf_pages
from broker.money.pricing import CacheTtl
from broker.settings import ModelSettings, ProviderSettings

# Extra tokens per structural character (``{ [ , :``) of the JSON: framing a provider may add
# when it renders structured content (schemas, tool calls) in its own syntax.
STRUCTURE_TOKENS = 2
_STRUCTURE = (b"{", b"[", b",", b":")


@dataclass(frozen=True)
class BoundContext:
    """What a plugin needs to know of the model and its provider to bound a request."""

    image_rule: ImageRule | None  # None: the plugin's costliest rule
    service_tier_percent: Mapping[str, int] = field(default_factory=dict)
    allowed_fields: frozenset[str] = frozenset()
    allowed_beta: frozenset[str] = frozenset()
    unsized_part_tokens: int | None = None
    pdf_page_tokens: int = 6_000
    max_media_bytes: int = 64 * 1024 * 1024
    # Tokens of the stored context a request continues (see Provider.continues): the gateway
    # sets it per request from what it metered, and the provider bills them again as input.
    prior_context_tokens: int = 0
    # The most tokens one call's result of a server-side tool adds (``tools.<name>.
    # result_tokens_per_call``), by tool: a past result sent back in a conversation (an
    # Anthropic ``web_search_tool_result``, whose pages are encrypted) is billed as them.
    tool_result_tokens: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, model: ModelSettings, provider: ProviderSettings, *, max_media_bytes: int,
           tool_result_tokens: Mapping[str, int] | None = None) -> BoundContext:
        """The context of one configured model on its provider."""
        return cls(
            image_rule=configured_image_rule(model),
            service_tier_percent=dict(model.service_tier_percent),
            allowed_fields=frozenset(provider.allowed_fields),
            allowed_beta=frozenset(provider.allowed_beta),
            unsized_part_tokens=provider.unsized_part_tokens,
            pdf_page_tokens=provider.pdf_page_tokens,
            max_media_bytes=max_media_bytes,
            tool_result_tokens=dict(tool_result_tokens or {}),
        )


def configured_image_rule(model: ModelSettings) -> ImageRule | None:
    """The model's ``image_rule`` with its figures (unset figures: the rule's own maxima);
    None when unset, which leaves the plugin's costliest rule."""
    if model.image_rule is None:
        return None
    if model.image_rule == "openai-tiles":
        return ImageRule(
            "openai-tiles",
            OPENAI_COSTLIEST.base_tokens if model.image_base_tokens is None
            else model.image_base_tokens,
            OPENAI_COSTLIEST.tile_tokens if model.image_tile_tokens is None
            else model.image_tile_tokens,
        )
    if model.image_rule == "anthropic-pixels":
        return ImageRule(
            "anthropic-pixels",
            long_edge=ANTHROPIC_PIXELS.long_edge if model.image_long_edge is None
            else model.image_long_edge,
            token_cap=ANTHROPIC_PIXELS.token_cap if model.image_max_tokens is None
            else model.image_max_tokens,
        )
    return ImageRule("none")


@dataclass(frozen=True)
class RequestBound:
    """The most a request can be billed, before its output limit is set.

    ``input_tokens`` bounds every input token; ``cache`` says whether (and for how long) the
    request may write the provider's prompt cache, which is billed above the input price;
    ``extra_output_tokens`` are output tokens beyond the output limit the provider may bill (an
    OpenAI prediction's rejected tokens); ``price_percent`` is the service tier's price.
    """

    input_tokens: int
    cache: CacheTtl | None = None
    extra_output_tokens: int = 0
    price_percent: int = 100


def json_tokens(value: Any) -> int:
    """An upper bound on the tokens of ``value`` rendered as text in any way a provider does:
    its compact UTF-8 JSON bytes plus :data:`STRUCTURE_TOKENS` per structural character.

    Serialised by the C encoder: no Python recursion, and fast on large bodies."""
    raw = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=True)
    data = raw.encode("utf-8", "surrogatepass")
    structure = sum(data.count(ch) for ch in _STRUCTURE)
    return len(data) + STRUCTURE_TOKENS * structure


def text_tokens(text: str) -> int:
    """An upper bound on the tokens of ``text``: its UTF-8 bytes."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def delta_tokens(text: str) -> tuple[int, int]:
    """The output tokens of one streamed delta's generated text, counted (low, high).

    Low, for the hold's wall, which must never cut an honest answer: a delta that carries text
    carries at least one token, and a token is rarely longer than 16 characters. High, for a
    charge without the provider's count: a token is at least one byte."""
    if not text:
        return 0, 0
    return 1 + len(text) // 16, text_tokens(text)


def without(value: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """``value`` without the keys ``names`` (a shallow copy)."""
    drop = set(names)
    return {k: v for k, v in value.items() if k not in drop}


def messages_tokens(messages: Any, per_message: int, part: Callable[[Any, str], int]) -> int:
    """The bound of a chat's messages: each message's framing (``per_message``), its fields
    as text, and each part of a content list by ``part(value, where)``, which knows the media
    of its wire format (``where`` names the part for a refusal)."""
    if not isinstance(messages, list):
        return json_tokens(messages)
    total = 0
    for i, message in enumerate(messages):
        total += per_message
        if not isinstance(message, dict):
            total += json_tokens(message)
            continue
        content = message.get("content")
        total += json_tokens(without(message, ("content",)))
        if isinstance(content, list):
            total += sum(part(p, f"messages[{i}].content[{j}]") for j, p in enumerate(content))
        else:
            total += json_tokens(content)
    return total


def check_fields(body: Mapping[str, Any], known: frozenset[str], ctx: BoundContext,
                 refused: Mapping[str, str] | None = None) -> None:
    """Refuse a top-level field the broker cannot price: listed as refused (with why), or
    neither known to the plugin nor allowed by configuration."""
    for name in body:
        if refused and name in refused:
            raise Unbounded(f"{name}: {refused[name]}", param=name)
        if name not in known and name not in ctx.allowed_fields:
            raise Unbounded(
                f"{name[:100]}: the broker cannot bound the cost of this field, so it does "
                "not forward it", param=name[:100])


@contextlib.contextmanager
def _refused_at(where: str) -> Iterator[None]:
    """A media part the media readers cannot bound is a refusal naming the part."""
    try:
        yield
    except MediaError as exc:
        raise Unbounded(f"{where}: {exc}", param=where) from None


def image_rule(ctx: BoundContext, costliest: ImageRule) -> ImageRule:
    return ctx.image_rule if ctx.image_rule is not None else costliest


def image_tokens(rule: ImageRule, data: bytes | None, where: str, detail: str | None = None) -> int:
    """The tokens of an image part: from its dimensions when ``data`` is given, else the
    rule's maximum (an image by URL or file id, which the broker never fetches)."""
    with _refused_at(where):
        size = media.image_size(data) if data is not None else None
        return media.image_tokens(rule, size, detail=detail)


def base64_data(data: Any, ctx: BoundContext, where: str) -> bytes:
    if not isinstance(data, str):
        raise Unbounded(f"{where}: must be base64 text", param=where)
    with _refused_at(where):
        return media.decode_base64(data, max_bytes=ctx.max_media_bytes)


def data_url(url: Any, ctx: BoundContext, where: str) -> tuple[str, bytes] | None:
    """(media type, bytes) of a ``data:`` URL; None for any other URL (never fetched)."""
    if not isinstance(url, str):
        raise Unbounded(f"{where}: must be a URL", param=where)
    if url[:5].lower() != "data:":
        return None
    with _refused_at(where):
        return media.parse_data_url(url, max_bytes=ctx.max_media_bytes)


def pdf_tokens(data: bytes, ctx: BoundContext, where: str) -> int:
    """A PDF's pages times the configured ceiling per page (its text and its page image)."""
    with _refused_at(where):
        return pdf_pages(data) * ctx.pdf_page_tokens


def unsized_tokens(ctx: BoundContext, where: str) -> int:
    """The configured ceiling of a part the broker cannot size, or a refusal."""
    if ctx.unsized_part_tokens is None:
        raise Unbounded(
            f"{where}: the broker cannot see the size of this part (set "
            "providers.<name>.unsized_part_tokens to hold a ceiling for it)", param=where)
    return ctx.unsized_part_tokens
