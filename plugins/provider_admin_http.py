"""What the provider plugins' admin clients share: blocking calls of an admin API whose errors
never quote a key or a body, paging bounds, and reading a token-exchange answer."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import quote

import httpx

from broker.plugin import ProviderAdminError, ProviderToken

# An admin call is a few small JSON documents: a provider slower than this is down.
MAX_ADMIN_TIMEOUT_S = 30.0
# Pages followed in one listing at most: a provider whose cursor never ends is refused.
MAX_PAGES = 1_000
PAGE_LIMIT = 100  # objects asked for per page (OpenAI's largest)
# A token is trusted to live no longer than this, whatever the provider says.
MAX_TOKEN_LIFE_S = 24 * 3600
DEFAULT_TOKEN_LIFE_S = 3600  # OpenAI's, when its answer names none (as the SDK assumes)
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
# What an error may quote of a refusal: an OAuth error code, never free text (which may echo
# the assertion or a token).
_ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_TOKEN = re.compile(r"[\x21-\x7e]{1,16384}")


def path_part(value: str) -> str:
    """An id in a URL path, escaped: ids come from answers and configuration."""
    return quote(value, safe="")


class AdminHttp:
    """Blocking calls of one provider's admin API. An error names the provider, the step and
    the HTTP status or the network error's type, never a header, a URL's query or a body,
    which may hold or echo a key. Redirects are not followed: a redirect would carry the
    admin key elsewhere."""

    def __init__(self, provider: str, timeout_s: float) -> None:
        self.provider = provider
        self.timeout_s = min(timeout_s, MAX_ADMIN_TIMEOUT_S)

    def error(self, step: str, why: str) -> ProviderAdminError:
        return ProviderAdminError(f"{self.provider}: {step} failed: {why}")

    def send(self, step: str, method: str, url: str, headers: Mapping[str, str], *,
             body: Any = None, params: Mapping[str, str | int] | None = None) -> httpx.Response:
        """The answer, whatever its status."""
        try:
            with httpx.Client(timeout=self.timeout_s, follow_redirects=False) as client:
                return client.request(method, url, headers=dict(headers), json=body,
                                      params=dict(params) if params else None)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise self.error(step, type(exc).__name__) from None

    def call(self, step: str, method: str, url: str, headers: Mapping[str, str], *,
             body: Any = None, params: Mapping[str, str | int] | None = None,
             gone_ok: bool = False) -> dict[str, Any] | None:
        """The answer's JSON object; None for a 404 when ``gone_ok`` (a deletion of something
        already gone is done); :class:`ProviderAdminError` for any other failure."""
        resp = self.send(step, method, url, headers, body=body, params=params)
        if gone_ok and resp.status_code == 404:
            return None
        if not 200 <= resp.status_code < 300:
            raise self.error(step, f"HTTP {resp.status_code}")
        try:
            answer = resp.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise self.error(step, "the answer is not a JSON object")
        return answer

    def read(self, step: str, method: str, url: str, headers: Mapping[str, str], *,
             body: Any = None, params: Mapping[str, str | int] | None = None) -> dict[str, Any]:
        answer = self.call(step, method, url, headers, body=body, params=params)
        if answer is None:  # only with gone_ok, which this call does not set
            raise self.error(step, "HTTP 404")
        return answer

    def check(self, step: str, url: str, headers: Mapping[str, str]) -> bool:
        """A key check: accepted (2xx), refused (401, 403), or the call failed."""
        status = self.send(step, "GET", url, headers).status_code
        if status in (401, 403):
            return False
        if not 200 <= status < 300:
            raise self.error(step, f"HTTP {status}")
        return True

    def cursor_pages(self, step: str, url: str, headers: Mapping[str, str],
                     cursor: str) -> Iterator[dict[str, Any]]:
        """Every object of a list that pages by the last id (``has_more``, ``last_id``, and
        the query parameter ``cursor``), as OpenAI and Anthropic do."""
        after: str | None = None
        for _ in range(MAX_PAGES):
            params: dict[str, str | int] = {"limit": PAGE_LIMIT}
            if after is not None:
                params[cursor] = after
            answer = self.read(step, "GET", url, headers, params=params)
            data = answer.get("data")
            if not isinstance(data, list):
                raise self.error(step, "the answer holds no list")
            yield from (item for item in data if isinstance(item, dict))
            last = answer.get("last_id")
            if answer.get("has_more") is not True or not isinstance(last, str) or last in ("", after):
                return
            after = last
        raise self.error(step, f"more than {MAX_PAGES} pages")


def read_token(provider: str, status: int, body: bytes, now: float,
               default_life_s: int | None = None) -> ProviderToken:
    """The access token of an OAuth token endpoint's answer (RFC 6749 5.1), or
    :class:`ProviderAdminError` naming the status and the OAuth error code."""
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not 200 <= status < 300:
        code = answer.get("error") if isinstance(answer, dict) else None
        named = f" ({code})" if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else ""
        raise ProviderAdminError(f"{provider}: the token exchange failed: HTTP {status}{named}")
    if not isinstance(answer, dict):
        raise ProviderAdminError(f"{provider}: the token exchange failed: the answer is not a "
                                 "JSON object")
    token, kind = answer.get("access_token"), answer.get("token_type")
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise ProviderAdminError(f"{provider}: the token exchange failed: the answer holds no "
                                 "usable access_token")
    if kind is not None and (not isinstance(kind, str) or kind.lower() != "bearer"):
        raise ProviderAdminError(f"{provider}: the token exchange failed: the token is not a "
                                 "bearer token")
    life = answer.get("expires_in", default_life_s)
    if isinstance(life, bool) or not isinstance(life, int) or life <= 0:
        raise ProviderAdminError(f"{provider}: the token exchange failed: expires_in is not a "
                                 "positive whole number")
    return ProviderToken(token, now + min(life, MAX_TOKEN_LIFE_S))


def bearer_headers(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", "accept": "application/json"}
