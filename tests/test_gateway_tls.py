"""Providers are reached over HTTPS in production: the gateway's upstream client speaks TLS,
verifies the provider's certificate, and a provider it cannot verify gets no key and costs
nothing."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.fake_provider import FakeProviderServer
from tests.gateway_support import make_env


def _self_signed(directory: Path) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake provider")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


@pytest.fixture
def tls_fake(tmp_path: Path) -> Iterator[tuple[FakeProviderServer, str]]:
    cert, key = _self_signed(tmp_path)
    with FakeProviderServer(tls=(cert, key)) as fake:
        yield fake, cert


def _chat(env: Any, token: str, stream: bool = False) -> Any:
    body: dict[str, Any] = {"model": "gpt-test", "max_tokens": 8, "stream": stream,
                            "messages": [{"role": "user", "content": "hello over tls"}]}
    return env.broker.client.post("/v1/chat/completions", json=body,
                                  headers={"authorization": f"Bearer {token}"})


def test_calls_reach_an_https_provider_it_trusts(make_broker: Any, sqlite_url: str,
                                                 tls_fake: tuple[FakeProviderServer, str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    fake, cert = tls_fake
    monkeypatch.setenv("SSL_CERT_FILE", cert)  # trust the fake provider's certificate
    env = make_env(make_broker, sqlite_url, fake)
    token = env.token()
    resp = _chat(env, token)
    assert resp.status_code == 200, resp.text
    assert int(resp.headers["x-broker-cost-micros"]) > 0
    streamed = _chat(env, token, stream=True)
    assert streamed.status_code == 200 and "[DONE]" in streamed.text
    assert fake.state.received_keys == [env.key, env.key]


def test_an_unverifiable_provider_gets_no_key_and_costs_nothing(
    make_broker: Any, sqlite_url: str, tls_fake: tuple[FakeProviderServer, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, _cert = tls_fake
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    env = make_env(make_broker, sqlite_url, fake)
    token = env.token()
    resp = _chat(env, token)
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "upstream_error"
    assert fake.state.received_keys == []
    assert [e["cost_micros"] for e in env.wait_for_events(1)] == [0]
