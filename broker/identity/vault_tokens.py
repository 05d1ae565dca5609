"""Check a workload's own Vault/OpenBao token (``urn:broker:token-type:vault``).

A workload that logged in to Vault itself (AppRole, Kubernetes auth, ...) may exchange that
token for a broker token. The broker asks its own configured Vault who the token is, with
``auth/token/lookup-self`` made WITH THAT TOKEN (never with the broker's own token, which could
look up anything), and hands the answer's ``data`` to the bindings.

The subject token is a live credential of someone else: it goes into one request header and
nowhere else. It is never logged, never part of an exception (message, cause or context), and
the ``data`` returned never holds it (``id``) or anything else that works as a credential.

hvac's exceptions become ours, as in :mod:`broker.storage.vault`: a Vault that refuses the token
is :class:`InvalidSubjectToken` (the caller sees 401 ``invalid_client``); a Vault that does not
answer, answers 5xx, is sealed or answers nonsense is :class:`VaultUnavailable` (503), never a
refusal, so an outage is never mistaken for a bad token (or the reverse).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

# The broker's own Vault client lives in broker/storage/vault.py; this one carries someone
# else's token, for one call, and shares nothing with it.
import hvac  # noqa: TID251
import hvac.exceptions  # noqa: TID251
import requests

from broker.errors import InvalidSubjectToken, VaultUnavailable
from broker.settings import VaultSettings

MAX_TOKEN_CHARS = 8192
TOKEN_TYPES = frozenset({"service", "batch"})
# Fields of a lookup's ``data`` that are (or may be) credentials: never handed on.
_CREDENTIAL_KEYS = frozenset({"id", "client_token", "token", "secret_id", "cubbyhole_id"})
_REFUSED = "vault refused the token"


def _check_shape(token: object) -> str:
    """Refuse, before any call, what cannot be a token: empty, huge, or anything but visible
    ASCII (a header would mangle it, or the request would fail in a way that looks like an
    outage)."""
    if not isinstance(token, str) or not token:
        raise InvalidSubjectToken("vault token is empty")
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidSubjectToken("vault token is too long")
    if not all("\x21" <= ch <= "\x7e" for ch in token):
        raise InvalidSubjectToken("vault token holds characters a token never has")
    return token


def _call(vault: VaultSettings, token: str) -> dict[str, Any]:
    """The raw JSON answer of lookup-self. Exceptions are raised OUTSIDE the ``except`` blocks,
    so that neither ``__cause__`` nor ``__context__`` keeps hvac's or requests' exception (a
    requests exception holds the prepared request, whose headers hold the token)."""
    failure: type[Exception] | None = None
    reason = ""
    answer: object = None
    with requests.Session() as session:
        session.max_redirects = 0
        client = hvac.Client(
            url=vault.addr,
            token=token,
            timeout=vault.timeout_s,  # type: ignore[arg-type]
            allow_redirects=False,
            session=session,
        )
        try:
            answer = client.auth.token.lookup_self()
        except (hvac.exceptions.Unauthorized, hvac.exceptions.Forbidden,
                hvac.exceptions.InvalidRequest):
            # 401/403 "permission denied", 400 "invalid token": Vault does not know the token.
            failure, reason = InvalidSubjectToken, _REFUSED
        except requests.Timeout:
            failure, reason = VaultUnavailable, "Vault timed out"
        except requests.RequestException as exc:
            failure, reason = VaultUnavailable, f"Vault did not answer ({type(exc).__name__})"
        except hvac.exceptions.VaultDown:
            failure, reason = VaultUnavailable, "Vault is sealed or down"
        except hvac.exceptions.VaultError as exc:
            # 404 (not a Vault there), 412, 429, 500, 502, ...: not an answer about the token.
            failure, reason = VaultUnavailable, f"Vault failed ({type(exc).__name__})"
        finally:
            client.adapter.token = None
    if failure is not None:
        raise failure(reason)
    if not isinstance(answer, dict):
        # A redirect (never followed), a 2xx that is not JSON: not Vault as we know it.
        raise VaultUnavailable("Vault gave an unexpected answer")
    return answer


def _without_credentials(value: object, token: str) -> object:
    """``value`` with every credential-like key dropped and every copy of ``token`` removed,
    at any depth."""
    if isinstance(value, dict):
        return {
            str(k): _without_credentials(v, token)
            for k, v in value.items()
            if k not in _CREDENTIAL_KEYS and v != token
        }
    if isinstance(value, list):
        return [_without_credentials(v, token) for v in value if v != token]
    return value


def _check_life(data: dict[str, Any]) -> None:
    """Refuse a token Vault still lists after its end (the expiration manager revokes it a
    little later) and a type we do not know."""
    if data.get("type") not in TOKEN_TYPES:
        raise InvalidSubjectToken("vault token is not a service or batch token")
    policies = data.get("policies")
    if isinstance(policies, list) and "root" in policies:
        # A root token is an operator's master key, never a workload's login.
        raise InvalidSubjectToken("vault root tokens are not accepted")
    ttl = data.get("ttl")
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 0:
        raise InvalidSubjectToken("vault token has no readable ttl")
    expire_time = data.get("expire_time")
    if expire_time is None:
        if ttl != 0:  # a ttl with no end is nothing Vault says
            raise InvalidSubjectToken("vault token has a ttl but no expire_time")
        return  # a token that never expires (root-issued, no max ttl)
    if not isinstance(expire_time, str):
        raise InvalidSubjectToken("vault token has no readable expire_time")
    try:
        end = datetime.fromisoformat(expire_time)
    except ValueError:
        raise InvalidSubjectToken("vault token has no readable expire_time") from None
    if end.tzinfo is None:
        end = end.replace(tzinfo=UTC)
    if ttl == 0 or end <= datetime.now(UTC):
        raise InvalidSubjectToken("vault token has expired")


def lookup_self(vault: VaultSettings, token: str) -> dict[str, object]:
    """The ``data`` of ``auth/token/lookup-self`` made with ``token`` at ``vault.addr``, without
    the token (``id``) or any other credential.

    :class:`InvalidSubjectToken` when the token is malformed, unknown to Vault, revoked,
    expired, or of a type other than service/batch; :class:`VaultUnavailable` when Vault does
    not answer (connection, timeout, 5xx, sealed, an answer that is not Vault's).
    Blocking: call it from a worker thread in async code.
    """
    token = _check_shape(token)
    answer = _call(vault, token)
    data = answer.get("data")
    if not isinstance(data, dict):
        raise VaultUnavailable("Vault gave an unexpected answer")
    _check_life(data)
    clean = _without_credentials(data, token)
    assert isinstance(clean, dict)  # a dict stays a dict
    return clean
