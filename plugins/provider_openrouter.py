"""The ``openrouter`` provider plugin: OpenRouter speaks the OpenAI chat-completions wire
format (``max_tokens`` for the output limit) at ``https://openrouter.ai/api/v1``.

Key rotation (:class:`KeyAdmin`) goes through OpenRouter's management API, with the management
key as ``Authorization: Bearer`` (its API reference and SDK models): ``POST /keys`` ``{"name"}``
answers the key once (``key``) and its ``data.hash``, the id every other call takes;
``DELETE /keys/{hash}`` deletes it; ``GET /keys`` lists keys in pages (``offset``; disabled
ones only with ``include_disabled=true``), read until an empty page since the page size is the
provider's to choose. The key check is ``GET /key`` with the key itself.
"""

from __future__ import annotations

from broker.plugin import KeyRef, MintedKey, ProviderConfig, base_url
from plugins.provider_admin_http import MAX_PAGES, AdminHttp, bearer_headers, path_part
from plugins.provider_openai import OpenAIWire

DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"


class OpenRouterProvider(OpenAIWire):
    limit_field = "max_tokens"

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config, base_url(config, DEFAULT_BASE_URL))
        self.admin = AdminHttp("openrouter", config.timeout_s)

    def create_key(self, admin_key: str, name: str) -> MintedKey:
        step = "creating a key"
        answer = self.admin.read(step, "POST", f"{self.base}/keys", bearer_headers(admin_key),
                                 body={"name": name})
        data, value = answer.get("data"), answer.get("key")
        key_hash = data.get("hash") if isinstance(data, dict) else None
        if not (isinstance(key_hash, str) and key_hash and isinstance(value, str) and value):
            raise self.admin.error(step, "the answer holds no key")
        return MintedKey(key_id=key_hash, key=value)

    def check_key(self, key: str) -> bool:
        return self.admin.check("checking a key", f"{self.base}/key", bearer_headers(key))

    def delete_key(self, admin_key: str, ref: KeyRef) -> None:
        hashes = [ref.key_id] if ref.key_id else [
            found.key_id for found in self.find_keys(admin_key, ref.name) if found.key_id]
        for key_hash in hashes:
            self.admin.call("deleting a key", "DELETE", f"{self.base}/keys/{path_part(key_hash)}",
                            bearer_headers(admin_key), gone_ok=True)

    def find_keys(self, admin_key: str, name: str) -> list[KeyRef]:
        step, offset = "listing keys", 0
        found: list[KeyRef] = []
        for _ in range(MAX_PAGES):
            answer = self.admin.read(step, "GET", f"{self.base}/keys", bearer_headers(admin_key),
                                     params={"include_disabled": "true", "offset": offset})
            data = answer.get("data")
            if not isinstance(data, list):
                raise self.admin.error(step, "the answer holds no list")
            if not data:
                return found
            found += [KeyRef(name, key_id=k["hash"]) for k in data
                      if isinstance(k, dict) and k.get("name") == name
                      and isinstance(k.get("hash"), str) and k["hash"]]
            offset += len(data)
        raise self.admin.error(step, f"more than {MAX_PAGES} pages")


class OpenRouterPlugin:
    def create(self, config: ProviderConfig) -> OpenRouterProvider:
        return OpenRouterProvider(config)


plugin = OpenRouterPlugin()
