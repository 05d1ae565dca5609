"""Nothing the test run answered or logged holds a secret it created.

Runs last (alphabetically). It first runs a short flow of its own that creates secrets and
provokes refusals, so the scan means something even when this module runs alone; then it reads
every response recorded by the test clients (conftest's ``recorded_responses``) and every log
record of every logger (``recorded_logs``, uvicorn's and the ``broker`` command's output
included), and looks for:

* every value in the secret ledger: client secrets, the bootstrap secret, the Vault root token,
  whole access tokens;
* every client secret and access token any response delivered, registered or not;
* everything secret held in Vault by any broker of the run: signing keys (the PEM body and the
  raw key in base64, base64url and hex, in every stored version) and secret peppers, and any
  other key or secret field.

The two deliveries the spec allows are not leaks: a client secret in the response that created
(or rotated) it, and an access token in the ``/v1/token`` response that issued it, each once.
"""

from __future__ import annotations

import base64
import contextlib
import re
import secrets
from collections import Counter
from collections.abc import Set as AbstractSet
from typing import Any

import hvac
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.devvault import DevVault
from tests.conftest import Broker, SecretLedger

DELIVERY = re.compile(r'"(client_secret|access_token)"\s*:\s*"([^"]+)"')
SECRET_FIELDS = re.compile(r"(^|_)(pem|value|key|secret|token|pepper|password)$")
MIN_LEN = 16  # shorter values would match by chance; every real secret here is far longer


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def basic(client_id: str, secret: str) -> dict[str, str]:
    raw = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"authorization": f"Basic {raw}"}


# --- the flow ------------------------------------------------------------------------------


def test_a_flow_that_creates_secrets_and_provokes_refusals(
    make_live_broker: Any, sqlite_url: str, secret_ledger: SecretLedger
) -> None:
    broker: Broker = make_live_broker(sqlite_url)
    c = broker.client
    admin = broker.admin_token()
    tenant = broker.create_tenant()
    agent = broker.create_workload(tenant["id"], policy={"models": ["gpt-4o-mini"],
                                                         "token_budget_micros": 10_000})
    cid, secret = agent["client_id"], agent["client_secret"]
    token = broker.token(cid, secret)
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    statuses: list[int] = []

    def send(method: str, url: str, **kw: Any) -> None:
        statuses.append(c.request(method, url, **kw).status_code)

    # Credentials at work.
    send("POST", "/v1/introspect", data={"token": token}, headers=basic(cid, secret))
    send("POST", "/v1/introspect", data={"token": token}, headers=bearer(admin))
    send("POST", "/v1/token", data={"grant_type": "client_credentials"}, headers=basic(cid, secret))
    send("GET", "/v1/models", headers=bearer(token))
    send("POST", "/v1/chat/completions", headers=bearer(token),
         json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    send("GET", "/v1/admin/workloads", headers=bearer(admin))
    # Refusals with the secrets at hand: near misses, misuse, tampering, malformed input.
    for i in range(11):
        send("POST", "/v1/token", data={"grant_type": "client_credentials", "client_id": cid,
                                        "client_secret": secret[:-2] + f"{i:02d}"})
    send("POST", "/v1/token", data={"grant_type": "client_credentials", "client_id": cid,
                                    "client_secret": secret})  # slowed down now
    send("POST", "/v1/introspect", data={"token": token}, headers=basic(cid, secret + "x"))
    send("POST", "/v1/introspect", data={"token": token})
    send("GET", "/v1/admin/tenants", headers=bearer(token))
    send("GET", "/v1/admin/tenants", headers=bearer(token[:-4] + "AAAA"))
    send("GET", "/v1/admin/tenants", headers=basic(cid, secret))
    send("GET", "/v1/admin/tenants", headers={"authorization": token})
    send("POST", "/v1/chat/completions", headers=bearer(token + "x"),
         json={"model": "gpt-4o-mini", "messages": []})
    send("POST", "/v1/admin/tenants", headers=bearer(admin), content=b'{"name": ')
    send("POST", "/v1/admin/workloads", headers=bearer(admin),
         json={"tenant_id": tenant["id"], "name": "x", "kind": "agent", "policy": {"modles": []}})
    send("POST", "/v1/token", content=b"x" * 70_000,
         headers={"content-type": "application/x-www-form-urlencoded"})
    send("DELETE", f"/v1/admin/tenants/{tenant['id']}", headers=bearer(admin))  # 409
    # Revocation and rotation, where present, hand out and retire credentials.
    send("POST", f"/v1/admin/tokens/{jti}/revoke", headers=bearer(admin), json={"reason": "scan"})
    send("GET", "/v1/admin/tenants", headers=bearer(token))
    rotated = c.post(f"/v1/admin/workloads/{agent['id']}/rotate-secret", headers=bearer(admin))
    if rotated.status_code == 200:
        secret_ledger.add(rotated.json()["client_secret"])
    for path in ("/metrics", "/openapi.json", "/.well-known/jwks.json", "/readyz"):
        send("GET", path)
    assert 400 in statuses and 401 in statuses and 403 in statuses and 429 in statuses
    assert all(s < 500 or s in (502, 503, 504) for s in statuses), statuses


# --- what counts as a secret ---------------------------------------------------------------


def _b64_forms(raw: bytes) -> set[str]:
    return {base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).rstrip(b"=").decode(),
            raw.hex()}


def _pem_forms(pem: str) -> set[str]:
    forms = {line for line in pem.splitlines() if line and not line.startswith("-----")}
    forms.add("".join(forms))
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if isinstance(key, Ed25519PrivateKey):
        forms |= _b64_forms(key.private_bytes(serialization.Encoding.Raw,
                                              serialization.PrivateFormat.Raw,
                                              serialization.NoEncryption()))
    return forms


def _secret_leaves(node: Any, key: str = "") -> set[str]:
    """Secret strings of a Vault document, in every form they could be written out in."""
    if isinstance(node, dict):
        return set().union(*(_secret_leaves(v, k) for k, v in node.items()))
    if isinstance(node, list):
        return set().union(*(_secret_leaves(v, key) for v in node))
    if not isinstance(node, str) or not SECRET_FIELDS.search(key.lower()):
        return set()
    if "PRIVATE KEY-----" in node:
        return _pem_forms(node)
    forms = {node}
    with contextlib.suppress(ValueError):  # not base64: the value itself is the only form
        forms |= _b64_forms(base64.b64decode(node, validate=True))
    return forms


def vault_secrets(vault: DevVault) -> set[str]:
    """Every secret any broker of this run keeps in Vault, in every stored version."""
    client = hvac.Client(url=vault.addr, token=vault.root_token)
    kv = client.secrets.kv.v2
    found: set[str] = set()
    folders = [""]
    while folders:
        folder = folders.pop()
        try:
            keys = kv.list_secrets(path=folder, mount_point="secret")["data"]["keys"]
        except hvac.exceptions.InvalidPath:
            continue
        for name in keys:
            path = folder + name
            if name.endswith("/"):
                folders.append(path)
                continue
            versions = kv.read_secret_metadata(path=path, mount_point="secret")["data"]["versions"]
            for version in versions:
                data = kv.read_secret_version(path=path, version=int(version), mount_point="secret",
                                              raise_on_deleted_version=False)["data"]["data"]
                found |= _secret_leaves(data or {})
    return found


# --- the scan ------------------------------------------------------------------------------


def _where(text: str, secret: str, others: AbstractSet[str] = frozenset()) -> str:
    """Where ``secret`` is, with it and every other known secret blanked out of the excerpt."""
    at = text.index(secret)
    excerpt = text[max(0, at - 120):at] + "<SECRET>" + text[at + len(secret):at + len(secret) + 60]
    for other in others:
        excerpt = excerpt.replace(other, "<other secret>")
    return excerpt.replace("\n", " ")


def test_nothing_answered_or_logged_holds_a_secret(
    recorded_responses: list[str], recorded_logs: list[str], secret_ledger: SecretLedger,
    vault: DevVault,
) -> None:
    assert recorded_responses and recorded_logs, "nothing was recorded: the scan would be empty"

    # The spec's deliveries: each secret once, in the response that made it.
    deliveries: Counter[str] = Counter()
    responses = []
    for text in recorded_responses:
        deliveries.update(m.group(2) for m in DELIVERY.finditer(text))
        responses.append(DELIVERY.sub(r'"\1":"<delivered>"', text))
    repeated = [v[:12] for v, n in deliveries.items() if n > 1]
    assert not repeated, f"secrets delivered more than once: {repeated}"

    ledger = {s for s in secret_ledger.values if len(s) >= MIN_LEN}
    in_vault = {s for s in vault_secrets(vault) if len(s) >= MIN_LEN}
    assert in_vault, "no signing key or pepper was read back from Vault"
    wanted = ledger | set(deliveries) | in_vault
    assert len(wanted) > 10

    sources = {"response": "\n".join(responses), "log": "\n".join(recorded_logs)}
    leaks = []
    for kind, corpus in sources.items():
        for secret in wanted:
            if secret in corpus:
                leaks.append(f"{kind}: {secret[:6]}... in ...{_where(corpus, secret, wanted)}...")
    assert not leaks, "secrets leaked:\n" + "\n".join(leaks[:20])


def test_the_scan_finds_a_planted_secret(recorded_logs: list[str]) -> None:
    """The scan above is not vacuous: the same search finds a secret planted in the record."""
    planted = "bks_" + secrets.token_urlsafe(32)
    recorded_logs.append(f"INFO broker something {planted} happened")
    try:
        assert planted in "\n".join(recorded_logs)
        assert _where("\n".join(recorded_logs), planted).count("<SECRET>") == 1
    finally:
        recorded_logs.pop()
