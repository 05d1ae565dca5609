"""The fake provider speaks the real wire formats: the official SDKs must accept everything it says.

Expected token counts follow the rule in `plugins.mock_upstream`: prompt = sum of ceil(len/4) per
text (at least 1); completion = min(limit, 16) words "w0 w1 ...".
"""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx
import httpx2
import openai
import pytest

from tests.fake_provider import FakeProviderServer

SIXTEEN_WORDS = " ".join(f"w{i}" for i in range(16))


@pytest.fixture(scope="module")
def server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeProviderServer) -> FakeProviderServer:
    server.reset()
    server.state.valid_keys = None
    server.state.admin_keys.clear()
    return server


def openai_client(fake: FakeProviderServer, key: str = "sk-openai-test") -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=f"{fake.url}/v1", max_retries=0)


def anthropic_client(fake: FakeProviderServer, key: str = "sk-ant-test") -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=key, base_url=fake.url, max_retries=0)


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


# --- provider-side key rotation -----------------------------------------------------------------


def test_admin_keys_rotate_the_accepted_keys(fake: FakeProviderServer) -> None:
    admin = httpx.Client(base_url=fake.url, headers={"x-admin-key": fake.state.admin_key})
    assert httpx.post(f"{fake.url}/admin/keys", headers={"x-admin-key": "wrong"}).status_code == 401

    created = admin.post("/admin/keys").json()
    assert admin.get("/admin/keys").json() == {"data": [{"id": created["id"]}]}
    assert openai_client(fake, created["key"]).models.list().data
    # Once a key exists, only the issued keys are accepted, in each provider's error format.
    with pytest.raises(openai.AuthenticationError):
        openai_client(fake, "sk-not-issued").models.list()
    with pytest.raises(anthropic.AuthenticationError):
        anthropic_client(fake, "sk-not-issued").messages.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )

    assert admin.delete(f"/admin/keys/{created['id']}").status_code == 200
    assert admin.delete(f"/admin/keys/{created['id']}").status_code == 404
    with pytest.raises(openai.AuthenticationError):
        openai_client(fake, created["key"]).models.list()
    assert fake.state.received_keys == [
        created["key"],
        "sk-not-issued",
        "sk-not-issued",
        created["key"],
    ]
