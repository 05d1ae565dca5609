"""What sound holds cost: how far above the provider's charge a call's hold sits, on a mix of
ordinary requests, with the bound of this checkout beside the estimate it replaced.

    python -m bench.bench_holds

In-process and deterministic (no servers). Each request of the mix is bounded by the provider
plugin exactly as the gateway does (:meth:`Provider.bound_request`, the output limit asked for or
the gateway's default of 4,096, :class:`broker.money.pricing.Price`). The "billed" side is a model, not
a provider's invoice: input tokens are counted by the fake provider's tokenizer (one token per 4
ASCII characters, one per other character, every string of the body: about what real tokenizers
give on English prose, and more than they give on code and JSON), plus the documented image rule;
output is a typical answer length for the request's kind. "Before" is the estimator the bound
replaced (4 characters per token for ASCII, 32 levels deep at most, 1,600 tokens per media part),
reimplemented here for the comparison.
"""

from __future__ import annotations

import base64
import math
import statistics
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import Any

from broker.money.bounds import BoundContext
from broker.money.media import ANTHROPIC_PIXELS, OPENAI_COSTLIEST, ImageRule, image_tokens
from broker.money.pricing import Price, Usage
from broker.plugin import ProviderConfig
from broker.settings import ModelSettings
from plugins.mock_billing import tokenizer_tokens
from plugins.provider_anthropic import AnthropicWire
from plugins.provider_openai import OpenAIWire

DEFAULT_OUTPUT_LIMIT = 4096
CONFIG = ProviderConfig("p", "x", None, 1.0, True)
WIRES = {"openai": OpenAIWire(CONFIG, "http://x"), "anthropic": AnthropicWire(CONFIG, "http://x")}
PRICES = {  # micro-dollars per million tokens, list prices of a small model of each provider
    "openai": ModelSettings(provider="p", input_micros_per_mtok=150_000,
                            output_micros_per_mtok=600_000),
    "anthropic": ModelSettings(provider="p", input_micros_per_mtok=800_000,
                               output_micros_per_mtok=4_000_000),
}
PROSE = ("The quarterly report shows revenue growth in every region, with the strongest gains "
         "in services. Operating costs rose more slowly than sales. ")
CODE = "def handler(event, context):\n    return {'status': 200, 'body': json.dumps(event)}\n"
CJK = "今天的会议讨论了新产品的发布计划和市场策略。"


def _png(width: int, height: int) -> bytes:
    """A valid PNG header and one empty IDAT: enough for a header-reading size check."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


IMAGE = base64.b64encode(_png(1024, 768)).decode()


def _tools(n: int) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {
        "name": f"tool_{i}", "description": "Look up an order and return its status. " * 2,
        "parameters": {"type": "object", "required": ["order_id"], "properties": {
            "order_id": {"type": "string", "description": "The order's id."},
            "include_items": {"type": "boolean"},
            "filters": {"type": "object", "properties": {
                "status": {"type": "string", "enum": ["open", "shipped", "closed"]}}}}}}}
        for i in range(n)]


@dataclass(frozen=True)
class Case:
    name: str
    dialect: str
    body: dict[str, Any]
    answer_tokens: int  # what a typical answer uses
    image: tuple[int, int] | None = None  # billed by the image rule, not as text
    rule: ImageRule | None = None  # models.<name>.image_rule (None: the plugin's costliest)


def _mix() -> list[Case]:
    chat = [{"role": "system", "content": PROSE * 2}, {"role": "user", "content": PROSE}]
    turns = [{"role": ("user" if i % 2 == 0 else "assistant"), "content": PROSE * 2}
             for i in range(6)]
    rag = [{"role": "user", "content": PROSE * 60 + "\nQuestion: what grew fastest?"}]
    code = [{"role": "user", "content": CODE * 20 + "Review this code."}]
    cjk = [{"role": "user", "content": CJK * 20}]
    image_openai = [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{IMAGE}",
                                            "detail": "high"}}]}]
    image_anthropic = [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": IMAGE}},
        {"type": "text", "text": "What is in this picture?"}]}]
    anthropic_tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
                        "input_schema": t["function"]["parameters"]} for t in _tools(5)]
    cases = [
        Case("openai short chat, max_tokens 512", "openai",
             {"model": "m", "messages": chat, "max_tokens": 512}, 150),
        Case("openai 6-turn chat, no limit", "openai", {"model": "m", "messages": turns}, 300),
        Case("openai agent with 5 tools, max_tokens 1024", "openai",
             {"model": "m", "messages": chat, "tools": _tools(5), "max_tokens": 1024}, 80),
        Case("openai RAG 7 KB context, max_tokens 800", "openai",
             {"model": "m", "messages": rag, "max_tokens": 800}, 250),
        Case("openai code review, max_tokens 2048", "openai",
             {"model": "m", "messages": code, "max_tokens": 2048}, 600),
        Case("openai CJK chat, max_tokens 400", "openai",
             {"model": "m", "messages": cjk, "max_tokens": 400}, 200),
        Case("openai image 1024x768 high, max_tokens 300, image_rule unset", "openai",
             {"model": "m", "messages": image_openai, "max_tokens": 300}, 120, (1024, 768)),
        Case("openai image 1024x768 high, max_tokens 300, gpt-4o's tiles set", "openai",
             {"model": "m", "messages": image_openai, "max_tokens": 300}, 120, (1024, 768),
             ImageRule("openai-tiles", 85, 170)),
        Case("anthropic short chat, max_tokens 512", "anthropic",
             {"model": "m", "max_tokens": 512, "system": PROSE * 2,
              "messages": [{"role": "user", "content": PROSE}]}, 150),
        Case("anthropic agent with 5 tools, max_tokens 1024", "anthropic",
             {"model": "m", "max_tokens": 1024, "tools": anthropic_tools,
              "messages": [{"role": "user", "content": PROSE}]}, 80),
        Case("anthropic RAG 7 KB context, max_tokens 800", "anthropic",
             {"model": "m", "max_tokens": 800, "messages": rag}, 250),
        Case("anthropic image 1024x768, max_tokens 300", "anthropic",
             {"model": "m", "max_tokens": 300, "messages": image_anthropic}, 120, (1024, 768)),
    ]
    return cases


# --- the estimator the bound replaced, for the comparison ----------------------------------

_OLD_MEDIA = frozenset({"image_url", "image", "input_image", "input_audio", "audio", "file",
                        "document", "input_file"})


def _old_text(text: str) -> int:
    wide = sum(1 for ch in text if ord(ch) > 127)
    return -(-(len(text) - wide) // 4) + wide


def _old_content(value: Any, depth: int = 0) -> int:
    if isinstance(value, str):
        return _old_text(value)
    if depth > 32:
        return 0
    if isinstance(value, list):
        return sum(_old_content(v, depth + 1) for v in value)
    if isinstance(value, dict):
        if value.get("type") in _OLD_MEDIA:
            return 1_600
        return sum(_old_content(v, depth + 1) for v in value.values())
    return 0


def _old_input(case: Case) -> int:
    fields = ("messages", "tools", "functions", "response_format") if case.dialect == "openai" \
        else ("system", "messages", "tools")
    messages = case.body.get("messages") or []
    return 3 + 4 * len(messages) + sum(_old_content(case.body.get(f)) for f in fields)


# --- the measurement -----------------------------------------------------------------------


def _billed_input(case: Case) -> int:
    if case.image is None:
        return tokenizer_tokens(case.body)
    rule = OPENAI_COSTLIEST if case.dialect == "openai" else ANTHROPIC_PIXELS
    text = {**case.body, "messages": [{**m, "content": [
        p for p in m["content"] if p.get("type") not in ("image", "image_url")]}
        for m in case.body["messages"]]}
    # gpt-4o's published figures (85 / 170), the model this mix stands for.
    tiles = image_tokens(type(rule)("openai-tiles", 85, 170), case.image, detail="high") \
        if case.dialect == "openai" else image_tokens(rule, case.image)
    return tokenizer_tokens(text) + tiles


def run() -> str:
    rows = []
    ratios_new, ratios_old, input_new, input_old = [], [], [], []
    for case in _mix():
        wire = WIRES[case.dialect]
        op = "chat" if case.dialect == "openai" else "messages"
        ctx = BoundContext(image_rule=case.rule)
        bound = wire.bound_request(op, dict(case.body), ctx, {})  # type: ignore[attr-defined]
        price = Price.of(PRICES[case.dialect], bound.price_percent)
        limit = case.body.get("max_tokens") or DEFAULT_OUTPUT_LIMIT
        hold = price.cost(price.worst_case(bound.input_tokens, limit + bound.extra_output_tokens,
                                           bound.cache))
        old_hold = price.cost(Usage(_old_input(case), limit))
        billed_in = _billed_input(case)
        charge = price.cost(Usage(billed_in, case.answer_tokens))
        ratios_new.append(hold / charge)
        ratios_old.append(old_hold / charge)
        input_new.append(bound.input_tokens / billed_in)
        input_old.append(_old_input(case) / billed_in)
        rows.append(f"| {case.name} | {billed_in:,} | {bound.input_tokens:,} | "
                    f"{_old_input(case):,} | {charge:,} | {hold:,} | {old_hold:,} | "
                    f"{hold / charge:.1f} | {old_hold / charge:.1f} |")
    median = statistics.median
    return "\n".join([
        "| request | input billed (model) | input held | input held before | charge µ$ | "
        "hold µ$ | hold before µ$ | hold ÷ charge | before |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Median hold ÷ charge: {median(ratios_new):.1f} (before: {median(ratios_old):.1f}); "
        f"median input held ÷ input billed: {median(input_new):.1f} "
        f"(before: {median(input_old):.2f}, where below 1 the estimate under-held).",
        f"Geometric mean of hold ÷ charge: "
        f"{math.exp(statistics.fmean(math.log(r) for r in ratios_new)):.1f} "
        f"(before: {math.exp(statistics.fmean(math.log(r) for r in ratios_old)):.1f}).",
    ])


SECTION = "bench_holds"


def main(argv: list[str] | None = None) -> int:
    import argparse

    from bench import harness

    parser = argparse.ArgumentParser(prog="python -m bench.bench_holds", description=__doc__)
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args, _ = parser.parse_known_args(argv)
    text = f"""## What sound holds cost: hold over charge on a mix of ordinary requests

{__doc__.split(chr(10), 4)[-1].strip()}

{run()}
"""
    print(text)
    if not args.no_write:
        harness.write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
