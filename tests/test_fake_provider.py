"""The fake provider speaks the real wire formats: the official SDKs must accept everything it says.

Expected token counts follow the rules in `plugins.mock_upstream`. By default ("words" billing):
prompt = sum of ceil(len/4) per text (at least 1); completion = min(limit, 16) words "w0 w1 ...".
With "tokenizer" billing every string of the body counts, keys included: ceil(ascii/4) + one per
non-ASCII character. `MockState.bills` records what the fake billed for each request.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest
from anthropic.types import CacheControlEphemeralParam, TextBlockParam

from plugins.mock_billing import CJK_WORDS, Bill, _prompt_tokens, text_tokens, tokenizer_tokens
from plugins.mock_upstream import MockState
from tests.fake_provider import FakeProviderServer
from tests.support import wait_for

SIXTEEN_WORDS = " ".join(f"w{i}" for i in range(16))


@pytest.fixture(scope="module")
def server() -> Iterator[FakeProviderServer]:
    """One fake for the module (these tests talk to it alone, and never leave a call running),
    unlike the shared ``fake`` fixture's server of its own per test."""
    with FakeProviderServer() as fake:
        yield fake


# The SDK clients a test made, closed after it (a client left to the garbage collector leaks
# its sockets).
_CLIENTS: list[openai.OpenAI | anthropic.Anthropic] = []


@pytest.fixture
def fake(server: FakeProviderServer) -> Iterator[FakeProviderServer]:
    server.reset()
    server.state.valid_keys = None
    yield server
    while _CLIENTS:
        _CLIENTS.pop().close()


def openai_client(fake: FakeProviderServer, key: str = "sk-openai-test") -> openai.OpenAI:
    client = openai.OpenAI(api_key=key, base_url=f"{fake.url}/v1", max_retries=0)
    _CLIENTS.append(client)
    return client


def anthropic_client(fake: FakeProviderServer, key: str = "sk-ant-test") -> anthropic.Anthropic:
    client = anthropic.Anthropic(api_key=key, base_url=fake.url, max_retries=0)
    _CLIENTS.append(client)
    return client


# --- OpenAI -------------------------------------------------------------------------------------


def test_chat_completion_counts_tokens_by_the_documented_rule(fake: FakeProviderServer) -> None:
    completion = openai_client(fake).chat.completions.create(
        model="gpt-test",
        messages=[
            {"role": "system", "content": "abcde"},  # 5 chars -> 2 tokens
            {"role": "user", "content": [{"type": "text", "text": "hello world!"}]},  # 12 -> 3
        ],
        max_completion_tokens=4,
    )
    assert completion.model == "gpt-test"
    assert completion.choices[0].message.content == "w0 w1 w2 w3"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (5, 4)
    assert completion.usage.total_tokens == 9
    assert fake.state.received_keys == ["sk-openai-test"]
    assert fake.state.requests[0]["max_completion_tokens"] == 4


def test_chat_completion_without_a_limit_answers_sixteen_words(fake: FakeProviderServer) -> None:
    completion = openai_client(fake).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": ""}]
    )
    assert completion.choices[0].message.content == SIXTEEN_WORDS
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (1, 16)


def test_chat_stream_with_include_usage_ends_with_a_usage_chunk(fake: FakeProviderServer) -> None:
    stream = openai_client(fake).chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "12345678"}],
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "w0 w1 w2"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (2, 3)
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_reports_no_usage_unless_asked(fake: FakeProviderServer) -> None:
    stream = openai_client(fake).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = list(stream)
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == SIXTEEN_WORDS


def test_embeddings_are_deterministic_in_both_encodings(fake: FakeProviderServer) -> None:
    client = openai_client(fake)
    # The SDK asks for base64 by default and decodes it; floats must decode to the same vector.
    default = client.embeddings.create(model="embed-test", input=["abcd", "abcdefghi"])
    floats = client.embeddings.create(
        model="embed-test", input=["abcd", "abcdefghi"], encoding_format="float"
    )
    assert [d.embedding for d in default.data] == [d.embedding for d in floats.data]
    assert all(len(d.embedding) == 8 for d in default.data)
    assert default.data[0].embedding != default.data[1].embedding
    assert (default.usage.prompt_tokens, default.usage.total_tokens) == (4, 4)  # 1 + 3


def test_models_are_listed_in_openai_format(fake: FakeProviderServer) -> None:
    ids = [m.id for m in openai_client(fake).models.list()]
    assert ids == list(fake.state.models)


# --- Anthropic ----------------------------------------------------------------------------------


def test_message_reports_usage_and_stop_reason(fake: FakeProviderServer) -> None:
    message = anthropic_client(fake).messages.create(
        model="claude-test",
        system="abcdefgh",  # 2 tokens
        messages=[{"role": "user", "content": "hello"}],  # 2 tokens
        max_tokens=100,
    )
    assert message.model == "claude-test"
    assert message.content[0].type == "text"
    assert message.content[0].text == SIXTEEN_WORDS
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (4, 16)
    assert fake.state.received_keys == ["sk-ant-test"]


def test_message_stream_accumulates_to_the_final_usage(fake: FakeProviderServer) -> None:
    with anthropic_client(fake).messages.stream(
        model="claude-test", messages=[{"role": "user", "content": "hello"}], max_tokens=5
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "w0 w1 w2 w3 w4"
    assert final.stop_reason == "max_tokens"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (2, 5)


def test_message_stream_follows_the_anthropic_event_sequence(fake: FakeProviderServer) -> None:
    events = list(
        anthropic_client(fake).messages.create(
            model="claude-test",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            stream=True,
        )
    )
    # The SDK drops `ping`; everything else arrives in the documented order.
    assert [e.type for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0].type == "message_start" and events[0].message.usage.output_tokens == 1
    assert events[5].type == "message_delta" and events[5].usage.output_tokens == 2


def test_message_without_max_tokens_is_refused(fake: FakeProviderServer) -> None:
    response = httpx.post(
        f"{fake.url}/v1/messages",
        headers={"x-api-key": "k"},
        json={"model": "claude-test", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "top_keys", "error_keys"),
    [
        pytest.param(
            "/v1/chat/completions", {"error"}, {"message", "type", "code", "param"}, id="openai"
        ),
        pytest.param("/v1/messages", {"type", "error"}, {"type", "message"}, id="anthropic"),
    ],
)
def test_malformed_json_is_a_400_in_the_wire_format(
    fake: FakeProviderServer, path: str, top_keys: set[str], error_keys: set[str]
) -> None:
    response = httpx.post(f"{fake.url}{path}", headers={"x-api-key": "k"}, content=b"{nope")
    assert response.status_code == 400
    body = response.json()
    assert (set(body), set(body["error"])) == (top_keys, error_keys)
    assert body["error"]["type"] == "invalid_request_error"


# --- faults -------------------------------------------------------------------------------------


def test_status_fault_raises_each_sdks_error(fake: FakeProviderServer) -> None:
    fake.state.faults.status = 500
    with pytest.raises(openai.InternalServerError):
        openai_client(fake).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(anthropic.InternalServerError) as caught:
        anthropic_client(fake).messages.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "Injected fault: HTTP 500."},
    }
    assert len(fake.state.requests) == 2  # the provider saw both requests before failing


def test_delay_fault_trips_the_client_timeout(fake: FakeProviderServer) -> None:
    fake.state.faults.delay_s = 0.5
    client = openai_client(fake).with_options(timeout=0.1)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    # The provider answers anyway once the delay is over, and bills the client that left.
    assert only_bill(fake).complete


def test_cut_stream_breaks_the_openai_stream(fake: FakeProviderServer) -> None:
    fake.state.faults.cut_after_chunks = 3
    stream = openai_client(fake).chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    received: list[object] = []
    with pytest.raises(openai.APIConnectionError) as caught:
        received.extend(stream)
    assert isinstance(caught.value.__cause__, httpx2.RemoteProtocolError)  # incomplete chunked read
    assert len(received) == 3  # the role chunk and two words, then nothing: no usage


def test_cut_stream_breaks_the_anthropic_stream(fake: FakeProviderServer) -> None:
    fake.state.faults.cut_after_chunks = 4
    # This SDK lets the transport's own error through from a stream.
    with (
        pytest.raises((anthropic.APIConnectionError, httpx2.RemoteProtocolError)),
        anthropic_client(fake).messages.stream(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=10
        ) as stream,
    ):
        stream.get_final_message()


def test_ignore_max_tokens_overruns_the_limit(fake: FakeProviderServer) -> None:
    fake.state.faults.ignore_max_tokens = True
    fake.state.faults.overrun_tokens = 40
    message = anthropic_client(fake).messages.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert message.usage.output_tokens == 40


def test_omit_usage_drops_usage_everywhere(fake: FakeProviderServer) -> None:
    fake.state.faults.omit_usage = True
    client = openai_client(fake)
    completion = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.usage is None
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.usage is None and c.choices for c in chunks)


# --- keys the provider made ---------------------------------------------------------------------


def test_once_a_key_exists_only_the_provider_s_keys_are_accepted(fake: FakeProviderServer) -> None:
    key = "sk-user-" + "k" * 24
    fake.state.add_openai_user_key(key)
    assert openai_client(fake, key).models.list().data
    # Only the keys the provider made are accepted, in each provider's error format.
    with pytest.raises(openai.AuthenticationError):
        openai_client(fake, "sk-not-issued").models.list()
    with pytest.raises(anthropic.AuthenticationError):
        anthropic_client(fake, "sk-not-issued").messages.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
    assert fake.state.received_keys == [key, "sk-not-issued", "sk-not-issued"]


# --- helpers for billing ------------------------------------------------------------------------


def post(fake: FakeProviderServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{fake.url}{path}", headers={"x-api-key": "k"}, json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def sse_data(fake: FakeProviderServer, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every JSON `data:` payload of a stream read to its end (OpenAI's `[DONE]` left out)."""
    with httpx.stream(
        "POST", f"{fake.url}{path}", headers={"x-api-key": "k"}, json=body
    ) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    return [json.loads(line) for line in lines if line != "[DONE]"]


def only_bill(fake: FakeProviderServer, timeout_s: float = 5.0) -> Bill:
    """The one bill, once the provider stopped adding to it."""
    wait_for(lambda: len(fake.state.bills) == 1 and fake.state.bills[0].ended, timeout_s,
             what=lambda: f"one ended bill (bills: {fake.state.bills})")
    return fake.state.bills[0]


def reference_count(value: object) -> int:
    """The tokenizer rule, written independently (recursive: fine at the depths used here)."""

    def strings(node: object) -> int:
        if isinstance(node, str):
            ascii_chars = sum(1 for char in node if ord(char) < 128)
            return -(-ascii_chars // 4) + len(node) - ascii_chars
        if isinstance(node, dict):
            return sum(strings(k) + strings(v) for k, v in node.items())
        if isinstance(node, list):
            return sum(strings(item) for item in node)
        return 0

    return max(1, strings(value))


def nested_schema(depth: int, leaf: str) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "description": leaf}
    for level in range(depth):
        schema = {"type": "object", "properties": {f"p{level}": schema}}
    return schema


HI = [{"role": "user", "content": "hi"}]


# --- tokenizer billing --------------------------------------------------------------------------


def test_text_tokens_count_ascii_by_four_and_other_characters_one_each() -> None:
    assert text_tokens("abcde") == 2
    assert text_tokens("é字") == 2
    assert text_tokens("abcdé") == 2  # 1 for the four ASCII, 1 for the é
    assert text_tokens("") == 0
    assert tokenizer_tokens({}) == 1  # at least one token
    assert tokenizer_tokens({"abcde": "é字"}) == 4  # keys count too
    assert tokenizer_tokens([1, 2.5, None, True, "abcd"]) == 1  # only strings count


def test_tokenizer_counts_every_string_of_the_body(fake: FakeProviderServer) -> None:
    fake.state.billing = "tokenizer"
    deep_text = "x" * 40 + "é" * 3  # 10 + 3 tokens, 40 objects down a tool's schema
    body: dict[str, Any] = {
        "model": "claude-test",
        "max_tokens": 5,
        "system": [{"type": "text", "text": "be brief"}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "字字字"}]}],
        "tools": [{"name": "t", "input_schema": nested_schema(40, deep_text)}],
        "unknown_field": {"nested": ["anything"]},
    }
    usage = post(fake, "/v1/messages", body)["usage"]
    assert usage["input_tokens"] == reference_count(body)

    shallow = {**body, "tools": [{"name": "t", "input_schema": nested_schema(40, "")}]}
    assert tokenizer_tokens(body) - tokenizer_tokens(shallow) == 13
    renamed = json.loads(json.dumps(body).replace('"p39"', '"p39_longer_key"'))
    assert tokenizer_tokens(renamed) - tokenizer_tokens(body) == 3  # "p39" 1 -> 4 tokens


def test_tokenizer_counts_image_data_like_any_string(fake: FakeProviderServer) -> None:
    fake.state.billing = "tokenizer"
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 4000}}
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": [image]}]}
    usage = post(fake, "/v1/chat/completions", body)["usage"]
    assert usage["prompt_tokens"] == reference_count(body) > 1000
    assert _prompt_tokens(body) == 1  # words mode sees no text in it


def test_tokenizer_walk_is_iterative() -> None:
    deep: object = "abcd"
    for _ in range(5000):  # far past Python's recursion limit
        deep = {"k": [deep]}
    assert tokenizer_tokens(deep) == 5001


def test_a_500_deep_body_is_billed_without_recursion_error(fake: FakeProviderServer) -> None:
    fake.state.billing = "tokenizer"
    deep: object = "abcd"
    for _ in range(500):
        deep = {"k": deep}
    body = {"model": "gpt-test", "messages": HI, "metadata": deep}
    usage = post(fake, "/v1/chat/completions", body)["usage"]
    # "model" "gpt-test" "messages" "metadata": 2 each; HI: 5; 500 keys "k"; "abcd": 1.
    assert usage["prompt_tokens"] == tokenizer_tokens(body) == 8 + 5 + 500 + 1


def test_tokenizer_bills_embeddings_over_the_input(fake: FakeProviderServer) -> None:
    fake.state.billing = "tokenizer"
    body = post(fake, "/v1/embeddings", {"model": "e", "input": ["abcde", "é字"]})
    assert body["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    assert fake.state.bills == [
        Bill("embeddings", "e", False, prompt_tokens=4, complete=True, ended=True)
    ]


def test_tokenizer_counts_the_latin_answer_as_one_text(fake: FakeProviderServer) -> None:
    fake.state.billing = "tokenizer"
    body = {"model": "gpt-test", "messages": HI, "max_tokens": 4}
    completion = post(fake, "/v1/chat/completions", body)
    assert completion["choices"][0]["message"]["content"] == "w0 w1 w2 w3"
    assert completion["usage"]["completion_tokens"] == 3  # 11 characters


def test_tokenizer_answer_never_exceeds_the_limit(fake: FakeProviderServer) -> None:
    fake.state.billing = "tokenizer"
    fake.state.faults.answer_tokens = 500  # " w100" and later words are 5 characters
    body = {"model": "gpt-test", "messages": HI, "max_tokens": 500}
    completion = post(fake, "/v1/chat/completions", body)
    text = completion["choices"][0]["message"]["content"]
    assert completion["usage"]["completion_tokens"] == text_tokens(text) <= 500
    assert text_tokens(text + " w999") > 500
    assert completion["choices"][0]["finish_reason"] == "length"


# --- answers of chosen length and script --------------------------------------------------------


def test_cjk_answers_are_one_token_per_character(fake: FakeProviderServer) -> None:
    fake.state.billing = "tokenizer"
    fake.state.faults.answer_script = "cjk"
    completion = openai_client(fake).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], max_tokens=12
    )
    assert completion.choices[0].message.content == (CJK_WORDS * 2)[:12]
    assert completion.usage is not None and completion.usage.completion_tokens == 12

    with anthropic_client(fake).messages.stream(
        model="claude-test", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    ) as stream:
        deltas = list(stream.text_stream)
        final = stream.get_final_message()
    assert deltas == list(CJK_WORDS[:5])
    assert final.usage.output_tokens == 5


def test_cjk_answers_in_words_mode_count_one_token_per_word(fake: FakeProviderServer) -> None:
    fake.state.faults.answer_script = "cjk"
    message = anthropic_client(fake).messages.create(
        model="claude-test", messages=[{"role": "user", "content": "hi"}], max_tokens=100
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == (CJK_WORDS * 2)[:16]
    assert message.usage.output_tokens == 16


@pytest.mark.parametrize(
    ("answer_tokens", "limit", "words", "finish"),
    [
        pytest.param(3, None, 3, "stop", id="no-limit"),
        pytest.param(40, None, 40, "stop", id="long-no-limit"),
        pytest.param(40, 100, 40, "stop", id="under-the-limit"),
        pytest.param(40, 40, 40, "stop", id="at-the-limit"),
        pytest.param(40, 7, 7, "length", id="cut-by-the-limit"),
    ],
)
def test_answer_tokens_sets_the_answer_length(
    fake: FakeProviderServer, answer_tokens: int, limit: int | None, words: int, finish: str
) -> None:
    fake.state.faults.answer_tokens = answer_tokens
    body: dict[str, Any] = {"model": "gpt-test", "messages": HI}
    if limit is not None:
        body["max_tokens"] = limit
    completion = post(fake, "/v1/chat/completions", body)
    assert completion["choices"][0]["message"]["content"] == " ".join(
        f"w{i}" for i in range(words)
    )
    assert completion["choices"][0]["finish_reason"] == finish
    assert completion["usage"]["completion_tokens"] == words


def test_ignore_max_tokens_still_uses_overrun_tokens(fake: FakeProviderServer) -> None:
    fake.state.faults.answer_tokens = 3
    fake.state.faults.ignore_max_tokens = True
    fake.state.faults.overrun_tokens = 25
    body = {"model": "claude-test", "messages": HI, "max_tokens": 2}
    assert post(fake, "/v1/messages", body)["usage"]["output_tokens"] == 25


# --- the bill -----------------------------------------------------------------------------------


def test_a_non_stream_call_is_billed_at_once(fake: FakeProviderServer) -> None:
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "abcde"}], "max_tokens": 4}
    post(fake, "/v1/chat/completions", body)
    assert fake.state.bills == [
        Bill("chat", "gpt-test", False, prompt_tokens=2, completion_tokens=4, complete=True,
             ended=True)
    ]
    fake.state.faults.omit_usage = True  # the response hides the usage; the provider bills it
    post(fake, "/v1/messages", {**body, "model": "claude-test"})
    assert fake.state.bills[1] == Bill(
        "messages", "claude-test", False, prompt_tokens=2, completion_tokens=4, complete=True,
        ended=True
    )


def test_refused_requests_bill_nothing(fake: FakeProviderServer) -> None:
    response = httpx.post(
        f"{fake.url}/v1/messages", headers={"x-api-key": "k"}, json={"model": "m", "messages": HI}
    )
    assert response.status_code == 400  # no max_tokens
    assert httpx.post(f"{fake.url}/v1/chat/completions", json={}).status_code == 401
    fake.state.faults.status = 529
    response = httpx.post(
        f"{fake.url}/v1/chat/completions", headers={"x-api-key": "k"},
        json={"model": "m", "messages": HI},
    )
    assert response.status_code == 529
    assert fake.state.bills == []


def test_a_stream_read_to_the_end_is_billed_complete(fake: FakeProviderServer) -> None:
    chunks = list(
        openai_client(fake).chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "abcde"}], max_tokens=6,
            stream=True,
        )
    )
    assert len(chunks) == 8
    assert only_bill(fake) == Bill(
        "chat", "gpt-test", True, prompt_tokens=2, completion_tokens=6, complete=True, ended=True
    )

    fake.reset()
    fake.state.billing = "tokenizer"
    body = {"model": "claude-test", "messages": HI, "max_tokens": 6, "stream": True}
    data = sse_data(fake, "/v1/messages", body)
    assert data[-2]["usage"] == {"output_tokens": 5}  # "w0 w1 w2 w3 w4 w5": 17 characters
    assert only_bill(fake) == Bill(
        "messages", "claude-test", True, prompt_tokens=reference_count(body), completion_tokens=5,
        complete=True, ended=True,
    )


@pytest.mark.parametrize(
    ("billing", "path", "body", "content_of", "expected"),
    [
        pytest.param(
            "words", "/v1/chat/completions",
            {"model": "gpt-test", "messages": HI, "stream": True},
            lambda d: d["choices"][0]["delta"].get("content") if d.get("choices") else None,
            3,
            id="openai-words",
        ),
        pytest.param(
            "tokenizer", "/v1/messages",
            {"model": "claude-test", "messages": HI, "max_tokens": 100, "stream": True},
            lambda d: d["delta"]["text"] if d["type"] == "content_block_delta" else None,
            2,  # "w0 w1 w2": 8 characters
            id="anthropic-tokenizer",
        ),
    ],
)
def test_a_stream_the_client_abandons_bills_only_what_was_sent(
    fake: FakeProviderServer,
    billing: Any,
    path: str,
    body: dict[str, Any],
    content_of: Any,
    expected: int,
) -> None:
    fake.state.billing = billing
    fake.state.faults.chunk_delay_s = 0.25  # time enough to hang up between two chunks
    received: list[str] = []
    with httpx.stream("POST", f"{fake.url}{path}", headers={"x-api-key": "k"}, json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and (text := content_of(json.loads(line[6:]))):
                received.append(text)
                if len(received) == 3:
                    break  # leaving the block hangs up
    bill = only_bill(fake)
    assert received == ["w0", " w1", " w2"]
    assert (bill.completion_tokens, bill.complete) == (expected, False)
    assert bill.prompt_tokens == (reference_count(body) if billing == "tokenizer" else 1)


def test_a_cut_stream_bills_only_what_was_sent_before_the_cut(fake: FakeProviderServer) -> None:
    fake.state.faults.cut_after_chunks = 5  # message_start, block start, ping, two deltas
    body = {"model": "claude-test", "messages": HI, "max_tokens": 10, "stream": True}
    with pytest.raises(httpx.RemoteProtocolError):
        sse_data(fake, "/v1/messages", body)
    assert only_bill(fake) == Bill(
        "messages", "claude-test", True, prompt_tokens=1, completion_tokens=2, ended=True
    )


# --- cache usage --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cache_control", "field_5m", "field_1h"),
    [
        pytest.param({"type": "ephemeral"}, 10, 0, id="5m"),
        pytest.param({"type": "ephemeral", "ttl": "5m"}, 10, 0, id="5m-explicit"),
        pytest.param({"type": "ephemeral", "ttl": "1h"}, 0, 10, id="1h"),
    ],
)
def test_cache_control_reports_the_prompt_as_cache_writes(
    fake: FakeProviderServer, cache_control: CacheControlEphemeralParam, field_5m: int,
    field_1h: int,
) -> None:
    system: list[TextBlockParam] = [
        {"type": "text", "text": "x" * 20},  # 5 tokens
        {"type": "text", "text": "y" * 20, "cache_control": cache_control},  # 5 tokens
    ]
    message = anthropic_client(fake).messages.create(
        model="claude-test", system=system,
        messages=[{"role": "user", "content": ""}], max_tokens=3,
    )
    usage = message.usage
    assert (usage.input_tokens, usage.cache_creation_input_tokens) == (0, 10)
    assert usage.cache_read_input_tokens == 0
    assert usage.cache_creation is not None
    assert usage.cache_creation.ephemeral_5m_input_tokens == field_5m
    assert usage.cache_creation.ephemeral_1h_input_tokens == field_1h
    assert fake.state.bills == [
        Bill("messages", "claude-test", False, prompt_tokens=0, completion_tokens=3,
             cache_write_tokens=field_5m, cache_write_1h_tokens=field_1h, complete=True,
             ended=True)
    ]


def test_any_one_hour_cache_control_makes_every_write_one_hour(fake: FakeProviderServer) -> None:
    fake.state.billing = "tokenizer"
    body = {
        "model": "claude-test", "max_tokens": 2, "stream": True,
        "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "u", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}],
    }
    start = sse_data(fake, "/v1/messages", body)[0]["message"]["usage"]
    prompt = reference_count(body)
    assert start == {
        "input_tokens": 0,
        "cache_creation_input_tokens": prompt,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": prompt},
        "output_tokens": 1,
    }
    bill = only_bill(fake)
    assert (bill.prompt_tokens, bill.cache_write_tokens, bill.cache_write_1h_tokens) == (
        0, 0, prompt)


def test_cache_reads_take_their_share_of_the_prompt(fake: FakeProviderServer) -> None:
    fake.state.faults.cache_read_tokens = 3
    cached = [{"type": "text", "text": "x" * 40, "cache_control": {"type": "ephemeral"}}]
    body = {"model": "claude-test", "max_tokens": 1, "system": cached, "messages": HI}
    usage = post(fake, "/v1/messages", body)["usage"]  # 10 + 1 prompt tokens
    assert usage["input_tokens"] == 0
    assert (usage["cache_creation_input_tokens"], usage["cache_read_input_tokens"]) == (8, 3)
    # Without cache_control the rest is plain input; a read larger than the prompt takes it all.
    usage = post(fake, "/v1/messages", {**body, "system": "x" * 40})["usage"]
    assert (usage["input_tokens"], usage["cache_read_input_tokens"]) == (8, 3)
    assert usage["cache_creation_input_tokens"] == 0
    fake.state.faults.cache_read_tokens = 1000
    usage = post(fake, "/v1/messages", body)["usage"]
    assert (usage["input_tokens"], usage["cache_creation_input_tokens"]) == (0, 0)
    assert usage["cache_read_input_tokens"] == 11
    splits = [(b.prompt_tokens, b.cache_write_tokens, b.cache_read_tokens) for b in fake.state.bills]
    assert splits == [(0, 8, 3), (8, 0, 3), (0, 0, 11)]


def test_openai_reports_cached_tokens_inside_the_prompt(fake: FakeProviderServer) -> None:
    fake.state.faults.cache_read_tokens = 2
    completion = openai_client(fake).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "x" * 20}], max_tokens=1
    )
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 5  # the total, as OpenAI reports it
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 2
    bill = fake.state.bills[0]
    assert (bill.prompt_tokens, bill.cache_read_tokens, bill.completion_tokens) == (3, 2, 1)


def test_without_caching_usage_keeps_its_old_fields(fake: FakeProviderServer) -> None:
    body = {"model": "m", "messages": HI, "max_tokens": 1}
    assert set(post(fake, "/v1/messages", body)["usage"]) == {"input_tokens", "output_tokens"}
    assert set(post(fake, "/v1/chat/completions", body)["usage"]) == {
        "prompt_tokens", "completion_tokens", "total_tokens"}


# --- pricing the bills --------------------------------------------------------------------------


def test_total_billed_rounds_each_bill_up_on_its_own() -> None:
    state = MockState()
    state.bills = [Bill("chat", "m", False, prompt_tokens=1, completion_tokens=1)] * 3
    # Each bill costs 0.3 + 0.2 micro-dollars: 1 each once rounded up, 3 in all (not 2).
    assert state.total_billed(300_000, 200_000) == 3
    state.bills = [Bill("chat", "m", False, prompt_tokens=1_000_000, completion_tokens=500_000)]
    assert state.total_billed(3, 15) == 3 + 8  # exactly 10.5 -> 11
    state.reset()
    assert state.total_billed(3, 15) == 0


def test_total_billed_prices_the_cache_like_anthropic() -> None:
    state = MockState()
    state.bills = [Bill("messages", "m", False, cache_write_tokens=200_000)]
    assert state.total_billed(4, 0) == 1  # 200_000 * 4 * 1.25 = exactly 1_000_000
    state.bills[0].cache_write_tokens = 200_001
    assert state.total_billed(4, 0) == 2  # 1_000_005 / 1e6, rounded up
    state.bills = [Bill("messages", "m", False, cache_write_1h_tokens=1_000_000,
                        cache_read_tokens=1_000_000)]
    assert state.total_billed(7, 0) == 14 + 7  # 1-hour writes 2x, reads at the input price
    assert state.total_billed(7, 0, cache_write_1h=10, cache_read=1) == 11
    state.bills = [Bill("messages", "m", False, cache_write_tokens=1_000_000)]
    assert state.total_billed(7, 0, cache_write=3) == 3
    assert state.total_billed(7, 0) == 9  # 8.75 rounded up


def test_reset_forgets_the_bills_and_the_billing_mode(fake: FakeProviderServer) -> None:
    fake.state.billing = "tokenizer"
    post(fake, "/v1/embeddings", {"model": "e", "input": "abc"})
    assert len(fake.state.bills) == 1
    fake.reset()
    assert (fake.state.bills, fake.state.billing) == ([], "words")


# --- streams without final usage, service tiers -------------------------------------------------


def test_omit_final_usage_drops_the_openai_usage_chunk(fake: FakeProviderServer) -> None:
    fake.state.faults.omit_final_usage = True
    body = {"model": "gpt-test", "messages": HI, "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    data = sse_data(fake, "/v1/chat/completions", body)
    assert all(d["choices"] and d["usage"] is None for d in data)
    assert only_bill(fake).completion_tokens == 2  # billed all the same


def test_omit_final_usage_keeps_only_the_anthropic_start_usage(fake: FakeProviderServer) -> None:
    fake.state.faults.omit_final_usage = True
    body = {"model": "claude-test", "messages": HI, "max_tokens": 2, "stream": True}
    data = sse_data(fake, "/v1/messages", body)
    assert data[0]["message"]["usage"] == {"input_tokens": 1, "output_tokens": 1}
    [final] = [d for d in data if d["type"] == "message_delta"]
    assert final == {"type": "message_delta",
                     "delta": {"stop_reason": "max_tokens", "stop_sequence": None}}
    assert only_bill(fake).completion_tokens == 2


@pytest.mark.parametrize(("requested", "echoed"), [(None, "default"), ("priority", "priority"),
                                                   ("flex", "flex")])
def test_chat_completions_echo_the_service_tier(
    fake: FakeProviderServer, requested: str | None, echoed: str
) -> None:
    body: dict[str, Any] = {"model": "gpt-test", "messages": HI, "max_tokens": 1}
    if requested is not None:
        body["service_tier"] = requested
    assert post(fake, "/v1/chat/completions", body)["service_tier"] == echoed
    chunks = sse_data(fake, "/v1/chat/completions", {
        **body, "stream": True, "stream_options": {"include_usage": True}})
    assert {c["service_tier"] for c in chunks} == {echoed}
