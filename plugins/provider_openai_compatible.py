"""The ``openai-compatible`` provider plugin: any server that speaks the OpenAI wire format
(vLLM, Ollama, llama.cpp, LiteLLM, ...) at a configured ``base_url`` (including ``/v1``).

A Vault path is optional: local servers often take no key, and then none is sent. The output
limit it sets is ``max_tokens``, the one field every such server knows.
"""

from __future__ import annotations

from broker.plugin import ProviderConfig, base_url
from plugins.provider_openai import OpenAIWire


class OpenAICompatibleProvider(OpenAIWire):
    limit_field = "max_tokens"

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config, base_url(config, None))


class OpenAICompatiblePlugin:
    def create(self, config: ProviderConfig) -> OpenAICompatibleProvider:
        return OpenAICompatibleProvider(config)


plugin = OpenAICompatiblePlugin()
