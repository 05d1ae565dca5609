"""The ``openrouter`` provider plugin (being written)."""

from __future__ import annotations

from broker.plugin import ProviderConfig, base_url
from plugins.provider_openai import OpenAIWire

DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"


class OpenRouterProvider(OpenAIWire):
    limit_field = "max_tokens"

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config, base_url(config, DEFAULT_BASE_URL))


class OpenRouterPlugin:
    def create(self, config: ProviderConfig) -> OpenRouterProvider:
        return OpenRouterProvider(config)


plugin = OpenRouterPlugin()
