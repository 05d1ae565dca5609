"""The official SDKs' clients a test makes, each closed at the test's end: a client left to the
garbage collector leaks its sockets, and a ResourceWarning is an error in this suite."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from anthropic import Anthropic
from openai import OpenAI

if TYPE_CHECKING:  # gateway_support imports conftest, which imports this module
    from tests.gateway_support import Env


class Sdks:
    """Makes SDK clients (no retries: a test sees each answer as it came) and closes them all."""

    def __init__(self) -> None:
        self._opened: list[OpenAI | Anthropic] = []

    def openai(self, base_url: str, api_key: str) -> OpenAI:
        client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
        self._opened.append(client)
        return client

    def anthropic(self, base_url: str, api_key: str) -> Anthropic:
        client = Anthropic(base_url=base_url, api_key=api_key, max_retries=0)
        self._opened.append(client)
        return client

    def broker_openai(self, env: Env, token: str) -> OpenAI:
        """An ``openai`` client of ``env``'s live broker, with a token as its key."""
        return self.openai(f"{_live_url(env)}/v1", token)

    def broker_anthropic(self, env: Env, token: str) -> Anthropic:
        """An ``anthropic`` client of ``env``'s live broker, with a token as its key."""
        return self.anthropic(_live_url(env), token)

    def close(self) -> None:
        while self._opened:
            self._opened.pop().close()


def _live_url(env: Env) -> str:
    url = env.broker.url
    assert url is not None, "a broker on a real port (make_live_broker)"
    return url


@pytest.fixture
def sdk() -> Iterator[Sdks]:
    """SDK clients for this test, closed when it ends."""
    sdks = Sdks()
    yield sdks
    sdks.close()
