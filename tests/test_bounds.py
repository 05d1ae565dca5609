"""The hold's input bound is a proven upper bound, whatever a hostile body holds.

The reference is deliberately blunt: one token per UTF-8 byte of every string anywhere in the
body (keys included), plus the documented media rules. Hypothesis drives each provider plugin
with generated hostile bodies (nesting to the parser's limit, every content part type, huge
schemas, non-ASCII) and the bound must never fall below the reference, nor below the fake
provider's tokenizer (which bills every string of the body at any depth).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pypdf import PdfWriter

from broker.errors import Unbounded
from broker.money import media
from broker.money.bounds import BoundContext, json_tokens
from broker.money.media import ANTHROPIC_PIXELS, OPENAI_COSTLIEST
from broker.plugin import ProviderConfig
from plugins.mock_billing import tokenizer_tokens
from plugins.provider_anthropic import AnthropicWire
from plugins.provider_openai import OpenAIWire

CONFIG = ProviderConfig("p", "x", None, 1.0, True)
OPENAI = OpenAIWire(CONFIG, "http://x")
ANTHROPIC = AnthropicWire(CONFIG, "http://x")
CTX = BoundContext(image_rule=None, unsized_part_tokens=None, pdf_page_tokens=6_000)
MAX_DEPTH = 64  # the gateway's JSON parser refuses deeper bodies


def strings(value: Any) -> Iterator[str]:
    """Every string of a JSON value, keys included, walked without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            for key, child in item.items():
                yield key
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)


def reference(value: Any, media_tokens: int = 0, skip: frozenset[str] = frozenset()) -> int:
    """One token per UTF-8 byte of every string (but the media payloads in ``skip``), plus
    what the media rules say the media cost."""
    return sum(len(s.encode()) for s in strings(value) if s not in skip) + media_tokens


# --- strategies ----------------------------------------------------------------------------


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(out, "PNG")
    return out.getvalue()


def _pdf(pages: int) -> bytes:
    writer = PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(612, 792)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def _data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"



# A few real media, drawn into hostile bodies: (base64 payload, what the rules say they cost).
_IMAGE_SIZES = [(16, 16), (800, 600), (1024, 1024), (3000, 200)]
_IMAGES = [(base64.b64encode(_png(w, h)).decode(), (w, h)) for w, h in _IMAGE_SIZES]
_PDFS = [(base64.b64encode(_pdf(n)).decode(), n) for n in (1, 3)]


@dataclass
class Hostile:
    """A generated body, the media payload strings in it, and what its media cost by rule."""

    body: dict[str, Any] = field(default_factory=dict)
    payloads: set[str] = field(default_factory=set)
    media_tokens: int = 0

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=80)
_cjk = st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), max_size=80)
_key = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12)
_leaf = st.one_of(_text, _cjk, st.integers(-10**12, 10**12), st.booleans(), st.none(),
                  st.floats(allow_nan=False, allow_infinity=False))
_json = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(_key, inner, max_size=4)), max_leaves=30)


@st.composite
def deep(draw: st.DrawFn, max_depth: int = MAX_DEPTH - 8) -> Any:
    """A JSON value wrapped in up to ``max_depth`` levels of objects and lists: text nested
    far below where a naive walk stops."""
    value = draw(_json)
    for _ in range(draw(st.integers(0, max_depth))):
        value = {draw(_key): value} if draw(st.booleans()) else [value]
    return value


_schema = st.builds(lambda d, text: {"type": "object", "description": text,
                                     "properties": {"x": d}}, deep(), _text)


@st.composite
def openai_bodies(draw: st.DrawFn) -> Hostile:
    out = Hostile()

    @st.composite
    def image(draw: st.DrawFn) -> dict[str, Any]:
        payload, size = draw(st.sampled_from(_IMAGES))
        detail = draw(st.sampled_from(["low", "high", "auto", None]))
        url = f"data:image/png;base64,{payload}"
        out.payloads.add(url)
        out.media_tokens += media.image_tokens(OPENAI_COSTLIEST, size, detail=detail)
        return {"type": "image_url", "image_url": {"url": url, **(
            {"detail": detail} if detail else {})}}

    @st.composite
    def pdf(draw: st.DrawFn) -> dict[str, Any]:
        payload, pages = draw(st.sampled_from(_PDFS))
        url = f"data:application/pdf;base64,{payload}"
        out.payloads.add(url)
        out.media_tokens += pages * CTX.pdf_page_tokens
        return {"type": "file", "file": {"filename": draw(_text), "file_data": url}}

    parts = st.one_of(
        st.builds(lambda t: {"type": "text", "text": t}, st.one_of(_text, _cjk)),
        st.builds(lambda t: {"type": "refusal", "refusal": t}, _text),
        image(), pdf(),
    )
    content = st.one_of(_text, _cjk, st.lists(parts, max_size=4))
    message = st.builds(lambda role, c, extra: {"role": role, "content": c, **extra},
                        st.sampled_from(["system", "user", "assistant", "developer"]), content,
                        st.dictionaries(st.sampled_from(["name"]), _text, max_size=1))
    body: dict[str, Any] = {"model": "m", "messages": draw(st.lists(message, min_size=1,
                                                                    max_size=5))}
    if draw(st.booleans()):
        body["tools"] = draw(st.lists(st.builds(
            lambda name, desc, schema: {"type": "function", "function": {
                "name": name, "description": desc, "parameters": schema}},
            _text, _text, _schema), max_size=3))
    if draw(st.booleans()):
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "r", "schema": draw(_schema)}}
    if draw(st.booleans()):
        body["prediction"] = {"type": "content", "content": draw(st.one_of(_text, _cjk))}
    if draw(st.booleans()):
        body["metadata"] = draw(st.dictionaries(_key, _text, max_size=3))
    if draw(st.booleans()):
        body["logit_bias"] = draw(st.dictionaries(_key, st.integers(-100, 100), max_size=3))
    out.body = body
    return out


@st.composite
def anthropic_bodies(draw: st.DrawFn) -> Hostile:
    out = Hostile()

    @st.composite
    def image(draw: st.DrawFn) -> dict[str, Any]:
        payload, size = draw(st.sampled_from(_IMAGES))
        out.payloads.add(payload)
        out.media_tokens += media.image_tokens(ANTHROPIC_PIXELS, size)
        return {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                            "data": payload}}

    @st.composite
    def pdf(draw: st.DrawFn) -> dict[str, Any]:
        payload, pages = draw(st.sampled_from(_PDFS))
        out.payloads.add(payload)
        out.media_tokens += pages * CTX.pdf_page_tokens
        return {"type": "document", "title": draw(_text), "source": {
            "type": "base64", "media_type": "application/pdf", "data": payload}}

    text_block = st.builds(lambda t: {"type": "text", "text": t}, st.one_of(_text, _cjk))
    media_block = st.one_of(image(), pdf())
    blocks = st.one_of(
        text_block,
        media_block,
        st.builds(lambda t: {"type": "text", "text": t, "cache_control": {"type": "ephemeral"}},
                  _text),
        st.builds(lambda d: {"type": "document", "source": {
            "type": "text", "media_type": "text/plain", "data": d}}, st.one_of(_text, _cjk)),
        st.builds(lambda bs: {"type": "document", "source": {"type": "content", "content": bs}},
                  st.lists(text_block, max_size=3)),
        st.builds(lambda i, d: {"type": "tool_use", "id": i, "name": "f", "input": d},
                  _text, deep()),
        st.builds(lambda i, c: {"type": "tool_result", "tool_use_id": i, "content": c},
                  _text, st.one_of(_text, st.lists(st.one_of(text_block, media_block),
                                                   max_size=3))),
        st.builds(lambda t: {"type": "thinking", "thinking": t, "signature": "s"}, _text),
    )
    content = st.one_of(_text, _cjk, st.lists(blocks, max_size=4))
    message = st.builds(lambda role, c: {"role": role, "content": c},
                        st.sampled_from(["user", "assistant"]), content)
    body: dict[str, Any] = {"model": "m", "max_tokens": 10,
                            "messages": draw(st.lists(message, min_size=1, max_size=5))}
    if draw(st.booleans()):
        body["system"] = draw(st.one_of(_text, st.lists(text_block, max_size=3)))
    if draw(st.booleans()):
        body["tools"] = draw(st.lists(st.builds(
            lambda name, desc, schema: {"name": name, "description": desc,
                                        "input_schema": schema},
            _text, _text, _schema), max_size=3))
    if draw(st.booleans()):
        body["metadata"] = {"user_id": draw(_text)}
    if draw(st.booleans()):
        body["stop_sequences"] = draw(st.lists(_text, max_size=3))
    out.body = body
    return out


_settings = settings(max_examples=300, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@_settings
@given(hostile=openai_bodies())
def test_openai_bound_never_falls_below_one_token_per_byte(hostile: Hostile) -> None:
    body = hostile.body
    bound = OPENAI.bound_request("chat", body, CTX, {})
    assert bound.input_tokens >= reference(body, hostile.media_tokens, frozenset(hostile.payloads))
    if not hostile.payloads:
        assert bound.input_tokens >= tokenizer_tokens(body)
    if "prediction" in body:
        # Rejected prediction tokens are billed as output: the hold adds them there too.
        assert bound.extra_output_tokens >= reference(body["prediction"])


@_settings
@given(hostile=anthropic_bodies())
def test_anthropic_bound_never_falls_below_one_token_per_byte(hostile: Hostile) -> None:
    body = hostile.body
    bound = ANTHROPIC.bound_request("messages", body, CTX, {})
    assert bound.input_tokens >= reference(body, hostile.media_tokens, frozenset(hostile.payloads))
    if not hostile.payloads:
        assert bound.input_tokens >= tokenizer_tokens(body)
    if '"cache_control"' in repr(body).replace("'", '"'):
        assert bound.cache is not None  # a cache write is held at the cache-write price


@_settings
@given(value=deep(MAX_DEPTH))
def test_the_text_bound_counts_text_at_any_depth(value: Any) -> None:
    assert json_tokens(value) >= reference(value)


def test_text_nested_past_the_old_32_level_cutoff_is_counted() -> None:
    description = "x" * 50_000
    schema: dict[str, Any] = {"type": "string", "description": description}
    for _ in range(40):
        schema = {"type": "object", "properties": {"a": schema}}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]}
    assert OPENAI.bound_request("chat", body, CTX, {}).input_tokens >= 50_000
    anthropic_body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
                      "tools": [{"name": "f", "input_schema": schema}]}
    assert ANTHROPIC.bound_request("messages", anthropic_body, CTX, {}).input_tokens >= 50_000


def test_an_anthropic_text_document_costs_its_bytes_not_a_flat_allowance() -> None:
    data = "é" * 200_000  # 400 KB of UTF-8
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": data}}]}]}
    assert ANTHROPIC.bound_request("messages", body, CTX, {}).input_tokens >= 400_000


# --- media ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(64, 64), (1024, 1024), (2048, 4096), (300, 9000)])
def test_an_openai_image_is_held_by_its_tiles(width: int, height: int) -> None:
    url = _data_url(_png(width, height), "image/png")
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url, "detail": "high"}}]}]}
    bound = OPENAI.bound_request("chat", body, CTX, {}).input_tokens
    tiles = media.image_tokens(OPENAI_COSTLIEST, (width, height), detail="high")
    assert bound >= tiles
    # The image's base64 is not counted as text: an image is not a megabyte of prompt.
    assert bound < tiles + 500


def test_an_openai_image_by_url_is_held_at_the_rule_maximum() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}
    bound = OPENAI.bound_request("chat", body, CTX, {}).input_tokens
    assert bound >= media.image_tokens(OPENAI_COSTLIEST, None) == 2833 + 8 * 5667


def test_an_anthropic_image_is_held_by_its_pixels() -> None:
    data = base64.b64encode(_png(1000, 1000)).decode()
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}]}]}
    bound = ANTHROPIC.bound_request("messages", body, CTX, {}).input_tokens
    assert media.image_tokens(ANTHROPIC_PIXELS, (1000, 1000)) <= bound < 1334 + 500


def test_a_pdf_is_held_by_its_pages() -> None:
    data = base64.b64encode(_pdf(3)).decode()
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                        "data": data}}]}]}
    bound = ANTHROPIC.bound_request("messages", body, CTX, {}).input_tokens
    assert 3 * 6_000 <= bound < 3 * 6_000 + 500
    openai_body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "file", "file": {"filename": "a.pdf",
                                  "file_data": _data_url(_pdf(3), "application/pdf")}}]}]}
    assert OPENAI.bound_request("chat", openai_body, CTX, {}).input_tokens >= 3 * 6_000


# --- what cannot be bounded is refused, naming the field -----------------------------------

_OPENAI_REFUSED = [
    pytest.param({"foo": 1}, "foo", id="unknown-field"),
    pytest.param({"audio": {"voice": "alloy", "format": "wav"}}, "audio", id="audio-output"),
    pytest.param({"modalities": ["text", "audio"]}, "modalities", id="audio-modality"),
    pytest.param({"web_search_options": {}}, "web_search_options", id="web-search"),
    pytest.param({"service_tier": "priority"}, "service_tier", id="priority-tier"),
    pytest.param({"tools": [{"type": "web_search"}]}, "tools[0].type", id="server-tool"),
    pytest.param({"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]},
        "messages[0].content[0]", id="audio-part"),
    pytest.param({"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]},
                 "messages[0].content[0].type", id="unknown-part"),
    pytest.param({"messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_id": "file-abc"}}]}]},
        "messages[0].content[0].file.file_id", id="file-by-id-without-a-ceiling"),
    pytest.param({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]},
        "messages[0].content[0].image_url.url", id="image-not-base64"),
]


@pytest.mark.parametrize(("extra", "field"), _OPENAI_REFUSED)
def test_openai_refuses_what_it_cannot_bound(extra: dict[str, Any], field: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(Unbounded) as info:
        OPENAI.bound_request("chat", body, CTX, {})
    assert info.value.param == field and field.split("[")[0] in info.value.detail


_ANTHROPIC_REFUSED = [
    pytest.param({"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]},
                 "mcp_servers", {}, id="mcp-servers"),
    pytest.param({"container": "c"}, "container", {}, id="container"),
    pytest.param({"tools": [{"type": "code_execution_20250825", "name": "code_execution"}]},
                 "tools[0].type", {}, id="container-billed-tool"),
    pytest.param({}, "anthropic-beta", {"anthropic-beta": "extended-cache-ttl-2025-04-11"},
                 id="beta-not-allowed"),
    pytest.param({"service_tier": "priority"}, "service_tier", {}, id="unknown-tier"),
    pytest.param({"messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "url", "url": "https://x/a.pdf"}}]}]},
        "messages[0].content[0].source", {}, id="document-by-url-without-a-ceiling"),
    pytest.param({"messages": [{"role": "user", "content": [{"type": "container_upload",
                                                             "file_id": "f"}]}]},
                 "messages[0].content[0].type", {}, id="container-upload"),
]


@pytest.mark.parametrize(("extra", "field", "headers"), _ANTHROPIC_REFUSED)
def test_anthropic_refuses_what_it_cannot_bound(extra: dict[str, Any], field: str,
                                               headers: dict[str, str]) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
            **extra}
    with pytest.raises(Unbounded) as info:
        ANTHROPIC.bound_request("messages", body, CTX, headers)
    assert info.value.param == field


def test_configuration_can_admit_and_price_what_is_otherwise_refused() -> None:
    ctx = BoundContext(image_rule=None, service_tier_percent={"priority": 200},
                       allowed_beta=frozenset({"extended-cache-ttl-2025-04-11"}),
                       allowed_fields=frozenset({"top_k"}), unsized_part_tokens=20_000)
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_id": "file-abc"}}]}], "service_tier": "priority",
        "top_k": 5}
    bound = OPENAI.bound_request("chat", body, ctx, {})
    assert bound.price_percent == 200 and bound.input_tokens >= 20_000
    anthropic_body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]}
    held = ANTHROPIC.bound_request("messages", anthropic_body, ctx,
                                   {"anthropic-beta": "extended-cache-ttl-2025-04-11"})
    assert held.cache == "1h"


def test_a_model_that_reads_larger_images_is_held_by_its_configured_rule() -> None:
    from broker.money.bounds import configured_image_rule
    from broker.settings import ModelSettings

    spec = ModelSettings(provider="p", input_micros_per_mtok=1, output_micros_per_mtok=1,
                         image_rule="anthropic-pixels", image_long_edge=2576,
                         image_max_tokens=4_800)
    rule = configured_image_rule(spec)
    assert rule is not None
    data = base64.b64encode(_png(2400, 1400)).decode()
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}]}]}
    held = ANTHROPIC.bound_request("messages", body, BoundContext(image_rule=rule), {})
    assert held.input_tokens >= 2400 * 1400 // 750  # 4,480: what such a model bills
    default = ANTHROPIC.bound_request("messages", body, CTX, {})
    assert default.input_tokens < 2_000  # the documented rule would cap it near 1,750


def test_a_past_web_search_result_is_held_at_the_tools_ceiling_or_refused() -> None:
    result = {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1",
              "content": [{"type": "web_search_result", "url": "https://example.com", "title": "t",
                           "encrypted_content": "Zm9v", "page_age": None}]}
    body = {"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": "news?"}, {"role": "assistant", "content": [result]},
        {"role": "user", "content": "more"}]}
    with pytest.raises(Unbounded) as info:
        ANTHROPIC.bound_request("messages", body, CTX, {})
    assert info.value.param == "messages[1].content[0].type"
    ceiling = dataclasses.replace(CTX, tool_result_tokens={"web_search": 20_000})
    held = ANTHROPIC.bound_request("messages", body, ceiling, {}).input_tokens
    assert held >= 20_000 + len(json.dumps(result))


def test_the_long_context_beta_is_refused_even_when_allowed() -> None:
    allowed = dataclasses.replace(CTX, allowed_beta=frozenset({"context-1m-2025-08-07"}))
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(Unbounded) as info:
        ANTHROPIC.bound_request("messages", body, allowed, {"anthropic-beta": "context-1m-2025-08-07"})
    assert info.value.param == "anthropic-beta"
