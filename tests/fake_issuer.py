"""A fake OIDC issuer over real HTTP, for the token-exchange grant and federation tests.

It serves discovery documents and one JWKS (an RSA, an EC P-256 and an Ed25519 key), counts
every JWKS fetch, answers Kubernetes TokenReviews, and can misbehave on demand (redirect, an
oversized or slow JWKS, a 500). It mints tokens with the claim sets the real issuers document:
Kubernetes projected service-account tokens, GitHub Actions OIDC tokens, SPIFFE JWT-SVIDs and
plain OIDC ID tokens.

    with FakeIssuer() as fake:
        settings = {"auth": {"issuers": {"k8s": issuer_settings(fake, "kubernetes", "k8s")}}}
        token = fake.mint("kubernetes", iss=fake.issuer_url("k8s"))
        fake.state.mode = "down"

Each configured issuer name gets its own ``iss`` (``<url>/<name>``), so that several issuers
(which must differ by ``iss``) can share one fake; they all share its keys.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support import wait_for

HOST = "127.0.0.1"
AUDIENCE = "ai-broker"
SHAPES = ("kubernetes", "github-actions", "spiffe", "oidc")
Shape = Literal["kubernetes", "github-actions", "spiffe", "oidc"]
Mode = Literal["ok", "redirect", "oversized", "oversized-stream", "slow", "down", "not-json"]
OVERSIZED_BYTES = 300_000


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


# A claim override of DROP removes the claim from the minted token.
DROP: Any = _Drop()

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass
class SigningKey:
    kid: str
    family: Literal["RSA", "EC", "OKP"]
    private: PrivateKey

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            out = json.loads(RSAAlgorithm.to_jwk(public))
        elif isinstance(public, ec.EllipticCurvePublicKey):
            out = json.loads(ECAlgorithm.to_jwk(public))
        else:
            out = json.loads(OKPAlgorithm.to_jwk(public))
        assert isinstance(out, dict)
        out.update(kid=self.kid, use="sig")
        return out

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def new_key(family: Literal["RSA", "EC", "OKP"], kid: str) -> SigningKey:
    private: PrivateKey
    if family == "RSA":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif family == "EC":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        private = ed25519.Ed25519PrivateKey.generate()
    return SigningKey(kid, family, private)


@dataclass
class IssuerState:
    """What the test sets and reads while the server runs (in another thread)."""

    mode: Mode = "ok"
    slow_s: float = 3.0
    # Keys served besides the signing keys: junk a real JWKS may hold (symmetric, unknown).
    extra_keys: list[Any] = field(default_factory=list)
    fetches: int = 0  # GET /jwks
    redirect_target_hits: int = 0  # GET /jwks-moved, where the redirect mode points
    tokenreview_authenticated: bool = True
    # The audiences a TokenReview answers with; None: those the review asked for.
    tokenreview_audiences: list[str] | None = None
    tokenreview_status: int = 200
    # Each review received: (the Authorization header, the JSON body).
    tokenreviews: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class FakeIssuer:
    """A real HTTP issuer on 127.0.0.1 (uvicorn in a background thread)."""

    def __init__(self) -> None:
        self.state = IssuerState()
        self.keys: dict[str, SigningKey] = {
            "RSA": new_key("RSA", "rsa-1"),
            "EC": new_key("EC", "ec-1"),
            "OKP": new_key("OKP", "ed-1"),
        }
        self._original_keys = dict(self.keys)
        self._generation = 1
        # Stable ids, so that a binding may name them.
        self.service_account_uid = str(uuid.uuid4())
        self.pod_uid = str(uuid.uuid4())
        self.node_uid = str(uuid.uuid4())
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # --- addresses ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/jwks"

    def issuer_url(self, name: str) -> str:
        """The ``iss`` of the issuer configured as ``name`` (by default, a shape's tokens use
        the name of their shape)."""
        return f"{self.url}/{name}"

    # --- keys ---------------------------------------------------------------------------

    def key_for(self, alg: str) -> SigningKey:
        if alg.startswith(("RS", "PS")):
            return self.keys["RSA"]
        if alg.startswith("ES"):
            return self.keys["EC"]
        return self.keys["OKP"]

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.jwk() for key in self.keys.values()] + list(self.state.extra_keys)}

    def rotate(self, family: Literal["RSA", "EC", "OKP"] = "RSA") -> str:
        """Replace one signing key by a new one (new kid); the old one leaves the JWKS."""
        self._generation += 1
        prefix = {"RSA": "rsa", "EC": "ec", "OKP": "ed"}[family]
        self.keys[family] = new_key(family, f"{prefix}-{self._generation}")
        return self.keys[family].kid

    # --- tokens -------------------------------------------------------------------------

    def claims(self, shape: Shape, overrides: Mapping[str, Any] | None = None,
               **more: Any) -> dict[str, Any]:
        """The claim set a real issuer of ``shape`` puts in its tokens, with overrides (DROP
        removes a claim)."""
        now = int(time.time())
        base: dict[str, Any] = {"iss": self.issuer_url(shape), "iat": now, "exp": now + 600}
        if shape == "kubernetes":
            base |= {
                "aud": [AUDIENCE], "nbf": now, "jti": str(uuid.uuid4()),
                "sub": "system:serviceaccount:payments:worker",
                "kubernetes.io": {
                    "namespace": "payments",
                    "node": {"name": "node-1", "uid": self.node_uid},
                    "pod": {"name": "worker-5d8f7c9b4-x2x7q", "uid": self.pod_uid},
                    "serviceaccount": {"name": "worker", "uid": self.service_account_uid},
                },
            }
        elif shape == "github-actions":
            sha = hashlib.sha1(b"commit").hexdigest()
            base |= {
                "aud": AUDIENCE, "nbf": now - 5, "jti": str(uuid.uuid4()),
                "sub": "repo:octo-org/octo-repo:ref:refs/heads/main",
                "ref": "refs/heads/main", "ref_type": "branch", "sha": sha,
                "repository": "octo-org/octo-repo", "repository_id": "74",
                "repository_owner": "octo-org", "repository_owner_id": "65",
                "repository_visibility": "private",
                "actor": "octocat", "actor_id": "12",
                "run_id": "6547421", "run_number": "10", "run_attempt": "1",
                "workflow": "deploy", "event_name": "push",
                "workflow_ref": "octo-org/octo-repo/.github/workflows/deploy.yml@refs/heads/main",
                "workflow_sha": sha,
                "job_workflow_ref":
                    "octo-org/octo-automation/.github/workflows/oidc.yml@refs/heads/main",
                "job_workflow_sha": sha,
                "runner_environment": "github-hosted",
            }
        elif shape == "spiffe":
            base |= {"aud": [AUDIENCE], "sub": "spiffe://example.org/ns/payments/sa/worker"}
        else:
            base |= {
                "aud": AUDIENCE, "sub": "248289761001", "azp": "ci-client",
                "jti": str(uuid.uuid4()), "auth_time": now - 30,
                "email": "ci@example.org", "email_verified": True,
            }
        for key, value in {**(overrides or {}), **more}.items():
            if value is DROP:
                base.pop(key, None)
            else:
                base[key] = value
        return base

    def mint(self, shape: Shape, overrides: Mapping[str, Any] | None = None, *,
             alg: str = "RS256", kid: str | _Drop | None = None,
             headers: Mapping[str, Any] | None = None, key: SigningKey | None = None,
             **claims: Any) -> str:
        """A signed token of ``shape``. ``kid``: None for the signing key's own, DROP for no
        kid, or any other to lie; ``key`` signs with a key the JWKS does not hold."""
        return self.sign(json.dumps(self.claims(shape, overrides, **claims)), alg=alg, kid=kid,
                         headers=headers, key=key)

    def sign(self, payload_json: str, *, alg: str = "RS256", kid: str | _Drop | None = None,
             headers: Mapping[str, Any] | None = None, key: SigningKey | None = None) -> str:
        """Sign exactly these payload bytes (a duplicate claim stays duplicated)."""
        signer = key or self.key_for(alg)
        head: dict[str, Any] = {"typ": "JWT"}
        if kid is not DROP:
            head["kid"] = signer.kid if kid is None else kid
        head.update(headers or {})
        return jwt.api_jws.encode(payload_json.encode(), signer.private, algorithm=alg,
                                  headers=head)

    def raw(self, header_json: str, payload_json: str, signature: bytes = b"") -> str:
        """A token put together by hand, e.g. with ``alg`` none or a forged signature."""
        return ".".join((_b64(header_json.encode()), _b64(payload_json.encode()), _b64(signature)))

    def hmac_forgery(self, shape: Shape, secret: bytes, **claims: Any) -> str:
        """The classic algorithm confusion: HS256 "signed" with a public key as the secret."""
        header = json.dumps({"alg": "HS256", "typ": "JWT", "kid": self.keys["RSA"].kid})
        payload = json.dumps(self.claims(shape, **claims))
        signing_input = f"{_b64(header.encode())}.{_b64(payload.encode())}".encode()
        signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
        return self.raw(header, payload, signature)

    # --- the server ---------------------------------------------------------------------

    def reset(self) -> None:
        """Back to a well-behaved issuer with its first keys: a test that rotated them leaves
        no unknown kid behind for a broker that cached them before."""
        self.keys = dict(self._original_keys)
        self.state.mode, self.state.slow_s = "ok", 3.0
        self.state.extra_keys.clear()
        self.state.tokenreview_authenticated = True
        self.state.tokenreview_audiences = None
        self.state.tokenreview_status = 200
        with self.state.lock:
            self.state.fetches = self.state.redirect_target_hits = 0
            self.state.tokenreviews.clear()

    @property
    def fetches(self) -> int:
        return self.state.fetches

    def _app(self) -> Starlette:
        state = self.state

        async def jwks(request: Request) -> Response:
            with state.lock:
                state.fetches += 1
            mode = state.mode
            if mode == "redirect":
                return RedirectResponse(f"{self.url}/jwks-moved", status_code=302)
            if mode == "down":
                return JSONResponse({"error": "down"}, status_code=500)
            if mode == "not-json":
                return Response("<html>maintenance</html>", media_type="text/html")
            if mode == "slow":
                await asyncio.sleep(state.slow_s)
            if mode == "oversized":
                padded = {"keys": self.jwks()["keys"], "padding": "x" * OVERSIZED_BYTES}
                return JSONResponse(padded)
            if mode == "oversized-stream":
                async def chunks() -> Any:
                    yield b'{"keys": [], "padding": "'
                    for _ in range(OVERSIZED_BYTES // 1000):
                        yield b"x" * 1000
                    yield b'"}'
                return StreamingResponse(chunks(), media_type="application/json")
            return JSONResponse(self.jwks())

        async def moved(request: Request) -> Response:
            with state.lock:
                state.redirect_target_hits += 1
            return JSONResponse(self.jwks())

        async def discovery(request: Request) -> Response:
            name = request.path_params.get("name")
            issuer = self.issuer_url(name) if name else self.url
            return JSONResponse({
                "issuer": issuer, "jwks_uri": self.jwks_url,
                "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
            })

        async def tokenreview(request: Request) -> Response:
            body = await request.json()
            with state.lock:
                state.tokenreviews.append((request.headers.get("authorization", ""), body))
            if state.tokenreview_status in (301, 302, 307, 308):
                return RedirectResponse(f"{self.url}/jwks-moved",
                                        status_code=state.tokenreview_status)
            if state.tokenreview_status != 200:
                return JSONResponse({"kind": "Status"}, status_code=state.tokenreview_status)
            spec = body.get("spec", {})
            status: dict[str, Any] = {"authenticated": state.tokenreview_authenticated}
            if state.tokenreview_authenticated:
                payload = jwt.decode(spec.get("token", ""), options={"verify_signature": False})
                status["user"] = {"username": payload.get("sub"), "uid": self.service_account_uid,
                                  "groups": ["system:serviceaccounts"]}
                audiences = state.tokenreview_audiences
                status["audiences"] = spec.get("audiences", []) if audiences is None else audiences
            else:
                status["error"] = "token has been invalidated"
            return JSONResponse({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                 "status": status})

        return Starlette(routes=[
            Route("/jwks", jwks),
            Route("/jwks-moved", moved, methods=["GET", "POST"]),
            Route("/.well-known/openid-configuration", discovery),
            Route("/{name}/.well-known/openid-configuration", discovery),
            Route("/apis/authentication.k8s.io/v1/tokenreviews", tokenreview, methods=["POST"]),
        ])

    def start(self) -> FakeIssuer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(self._app(), lifespan="off", log_level="warning",
                                timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="fake-issuer", daemon=True)
        self._thread.start()
        server = self._server
        wait_for(lambda: server.started, what="the fake issuer to start")
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> FakeIssuer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def issuer_settings(fake: FakeIssuer, type: Shape, name: str | None = None,
                    **extra: Any) -> dict[str, Any]:
    """The table ``auth.issuers.<name>`` for tokens minted with ``iss=fake.issuer_url(name)``
    (the default name is the type, as :meth:`FakeIssuer.mint` assumes)."""
    return {"type": type, "issuer": fake.issuer_url(name or type), "jwks_url": fake.jwks_url,
            "audience": AUDIENCE, **extra}


@pytest.fixture(scope="session")
def fake_issuer_server() -> Iterator[FakeIssuer]:
    with FakeIssuer() as fake:
        yield fake


@pytest.fixture
def fake_issuer(fake_issuer_server: FakeIssuer) -> FakeIssuer:
    """The session's fake issuer, well-behaved and with its counters at zero."""
    fake_issuer_server.reset()
    return fake_issuer_server
