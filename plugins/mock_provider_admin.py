"""The fake providers' admin APIs: OpenAI's project service accounts, API keys and hard spend
limit, OpenRouter's key management and Anthropic's key status, each as strict as its provider
documents it, so that the plugins' admin clients are tested against what the providers answer.

Every admin call needs the admin key (`MockState.admin_key`): OpenAI and OpenRouter as
`Authorization: Bearer`, Anthropic as `x-api-key` with an `anthropic-version` header. A wrong or
missing key is 401, an unknown OpenAI project 404, a body that is not a JSON object 400, each in
its provider's error shape (OpenRouter: `{"error": {"code", "message"}}`).

Routes and the shapes they answer (sources: the `openai-node` SDK's
`resources/admin/organization/projects/*`, OpenRouter's API reference and SDK models for
`/api/v1/keys`, Anthropic's Admin API reference for `/v1/organizations/api_keys`):

- `POST /v1/organization/projects/{project}/service_accounts` `{"name"}`: a service account
  (`svc_acct_…`, role `member`) with its one key in `api_key` (`key_…`, value
  `sk-svcacct-…`, shown only here); `create_service_account_only: true` makes no key (role
  `none`, `api_key` null). `GET` lists them (`limit` 1-100, default 20, and `after`, an id:
  `{"object": "list", "data", "first_id", "last_id", "has_more"}`); `DELETE …/{id}` deletes the
  account and its key.
- `GET /v1/organization/projects/{project}/api_keys` (paged alike), `GET|DELETE …/api_keys/{id}`:
  project keys, each with its `owner`. As the SDK documents, deleting a key that belongs to a
  service account is refused (400; the fake's wording): only deleting the account removes it.
  User-owned keys (`add_openai_user_key`) can be deleted.
- `GET|POST|DELETE /v1/organization/projects/{project}/spend_limit`:
  `{"object": "project.spend_limit", "currency": "USD", "interval": "month",
  "threshold_amount": <cents>, "enforcement": {"status": "inactive"}}`; a POST must send
  `currency` USD, `interval` month and a whole number of cents. Without a limit, GET and
  DELETE answer 404: the reference does not say what a project without one answers.
- `POST /api/v1/keys` `{"name", "limit"?}`: 201 `{"data": {"hash", "name", "label", "disabled",
  "limit", "created_at", …}, "key": "sk-or-v1-…"}`; `GET /api/v1/keys` (`offset`, pages of
  `ROUTER_PAGE`, `include_disabled` "true"/"false", default false) `{"data": [...]}`;
  `PATCH /api/v1/keys/{hash}` `{"name"?, "disabled"?}` (other fields ignored) `{"data"}`;
  `DELETE /api/v1/keys/{hash}` `{"deleted": true}`; `GET /api/v1/key`, the calling key's own
  `{"data"}` (401 for a key the fake does not accept).
- `GET /v1/organizations/api_keys` (`limit` 1-1000, default 20, `after_id`, `status`,
  `workspace_id`: `{"data", "has_more", "first_id", "last_id"}`), `GET …/api_keys/{id}` and
  `POST …/api_keys/{id}` `{"name"?, "status"?: active|inactive|archived}`: key objects
  `{"id": "apikey_…", "type": "api_key", "name", "workspace_id", "created_at" (RFC 3339),
  "created_by", "partial_key_hint": "<first 16>...<last 4>", "status", "expires_at"}`. The
  status is `expired` once `expires_at` passed; an archived key cannot change again (the
  fake's assumption: the reference does not say).

Keys made through these APIs are accepted by the model routes (`MockState.valid_keys`, created
when None) until deleted, disabled, made inactive or archived; `token_expiry` refuses a key or
token once the fake's clock (`MockState.clock`, else real time) reaches its expiry.

Faults (`MockState.admin_faults[name] = AdminFault(status, times=1, after=False)`): the next
`times` calls of an operation answer `status` in the provider's error shape, once the call is
authenticated and its body parsed; with `after` the operation is carried out first (the answer
to a key's creation is lost, the key exists). Names: `openai.create_service_account`,
`openai.list_service_accounts`, `openai.delete_service_account`, `openai.list_api_keys`,
`openai.get_api_key`, `openai.delete_api_key`, `openai.spend_limit` (all three methods),
`openrouter.create_key`, `openrouter.list_keys`, `openrouter.update_key`,
`openrouter.delete_key`, `anthropic.list_keys`, `anthropic.get_key`, `anthropic.update_key`,
`openai.token`, `anthropic.token` (:mod:`plugins.mock_federation`), and `check`: the key checks
(`GET /v1/models`, `/api/v1/models`, `/api/v1/key`). `MockState.admin_log` names every call
that passed authentication, in order.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from plugins.mock_accounts import OPENAI_PROJECT as OPENAI_PROJECT
from plugins.mock_accounts import AdminFault as AdminFault
from plugins.mock_accounts import AnthropicKey, ProjectKey, RouterKey, ServiceAccount
from plugins.mock_accounts import ProviderAccounts as ProviderAccounts
from plugins.mock_accounts import accept as accept
from plugins.mock_accounts import now as now
from plugins.mock_accounts import refuse as refuse

if TYPE_CHECKING:
    from plugins.mock_upstream import MockState

Flavour = Literal["openai", "anthropic", "openrouter"]

OPENAI_PAGE = (20, 100)  # default and largest `limit`
ANTHROPIC_PAGE = (20, 1000)
ROUTER_PAGE = 100  # OpenRouter's fixed page ("the most recent 100 API keys")
ANTHROPIC_STATUSES = ("active", "inactive", "archived", "expired")
ANTHROPIC_SETTABLE = ("active", "inactive", "archived")
MAX_NAME = 500
# A fixed moment keeps the created_at of every object reproducible.
CREATED = 1_700_000_000


def take_fault(state: MockState, op: str) -> AdminFault | None:
    """Log the call, and use up one time of its fault, if any."""
    state.admin_log.append(op)
    fault = state.admin_faults.get(op)
    if fault is None:
        return None
    fault.times -= 1
    if fault.times <= 0:
        del state.admin_faults[op]
    return fault


def admin_error(flavour: Flavour, status: int, message: str, code: str | None = None) -> Response:
    if flavour == "openrouter":
        return JSONResponse({"error": {"code": status, "message": message}}, status)
    from plugins.mock_upstream import _error  # it builds on this module

    return _error(flavour, status, message, code)


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _bearer(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token if scheme.lower() == "bearer" else ""


def _page_size(raw: str | None, bounds: tuple[int, int]) -> int | None:
    if raw is None:
        return bounds[0]
    try:
        size = int(raw)
    except ValueError:
        return None
    return size if 1 <= size <= bounds[1] else None


def _name(body: dict[str, Any], required: bool) -> str | Literal[False] | None:
    """The body's name; False when it is not a valid one (or is missing but required)."""
    name = body.get("name")
    if name is None and not required:
        return None
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
        return False
    return name


Handler = Callable[[Request, dict[str, Any]], Response]


class AdminApi:
    """The admin route handlers, bound to one `MockState`."""

    def __init__(self, state: MockState) -> None:
        self.state = state

    def routes(self) -> list[Route]:
        o = "/v1/organization/projects/{project_id}"
        return [
            self._route(f"{o}/service_accounts", "POST", "openai.create_service_account",
                        self.create_service_account),
            self._route(f"{o}/service_accounts", "GET", "openai.list_service_accounts",
                        self.list_service_accounts),
            self._route(f"{o}/service_accounts/{{account_id}}", "DELETE",
                        "openai.delete_service_account", self.delete_service_account),
            self._route(f"{o}/api_keys", "GET", "openai.list_api_keys", self.list_api_keys),
            self._route(f"{o}/api_keys/{{key_id}}", "GET", "openai.get_api_key",
                        self.get_api_key),
            self._route(f"{o}/api_keys/{{key_id}}", "DELETE", "openai.delete_api_key",
                        self.delete_api_key),
            *[self._route(f"{o}/spend_limit", method, "openai.spend_limit", self.spend_limit)
              for method in ("GET", "POST", "DELETE")],
            self._route("/api/v1/keys", "POST", "openrouter.create_key", self.create_router_key),
            self._route("/api/v1/keys", "GET", "openrouter.list_keys", self.list_router_keys),
            self._route("/api/v1/keys/{hash}", "PATCH", "openrouter.update_key",
                        self.update_router_key),
            self._route("/api/v1/keys/{hash}", "DELETE", "openrouter.delete_key",
                        self.delete_router_key),
            Route("/api/v1/key", self.current_router_key, methods=["GET"]),
            self._route("/v1/organizations/api_keys", "GET", "anthropic.list_keys",
                        self.list_anthropic_keys),
            self._route("/v1/organizations/api_keys/{key_id}", "GET", "anthropic.get_key",
                        self.get_anthropic_key),
            self._route("/v1/organizations/api_keys/{key_id}", "POST", "anthropic.update_key",
                        self.update_anthropic_key),
        ]

    def _route(self, path: str, method: str, op: str, handler: Handler) -> Route:
        flavour: Flavour = op.partition(".")[0]  # type: ignore[assignment]

        async def endpoint(request: Request) -> Response:
            refusal = self._refusal(request, flavour)
            if refusal is not None:
                return refusal
            project = request.path_params.get("project_id")
            if project is not None and project not in self.state.openai_projects:
                return admin_error("openai", 404, f"No such project: {project[:64]!r}.")
            body: dict[str, Any] = {}
            if method in ("POST", "PATCH"):
                try:
                    parsed = json.loads(await request.body())
                except ValueError:
                    return admin_error(flavour, 400, "The request body is not valid JSON.")
                if not isinstance(parsed, dict):
                    return admin_error(flavour, 400, "The request body must be a JSON object.")
                body = parsed
            fault = take_fault(self.state, op)
            if fault is not None and not fault.after:
                return admin_error(flavour, fault.status, f"Injected fault: HTTP {fault.status}.")
            answer = handler(request, body)
            if fault is not None:
                return admin_error(flavour, fault.status, f"Injected fault: HTTP {fault.status}.")
            return answer

        return Route(path, endpoint, methods=[method])

    def _refusal(self, request: Request, flavour: Flavour) -> Response | None:
        anthropic = flavour == "anthropic"
        presented = request.headers.get("x-api-key", "") if anthropic else _bearer(request)
        if not presented or not secrets.compare_digest(presented.encode(),
                                                       self.state.admin_key.encode()):
            return admin_error(flavour, 401, "Invalid admin key.", "invalid_api_key")
        if anthropic and not request.headers.get("anthropic-version"):
            return admin_error(flavour, 400, "anthropic-version: header is required")
        return None

    # --- OpenAI ---------------------------------------------------------------------------

    def _account_json(self, account: ServiceAccount) -> dict[str, Any]:
        return {"object": "organization.project.service_account", "id": account.id,
                "name": account.name, "role": "member" if account.key_id else "none",
                "created_at": CREATED}

    def _key_json(self, key: ProjectKey) -> dict[str, Any]:
        owner: dict[str, Any]
        if key.account_id is not None:
            account = self.state.service_accounts[key.account_id]
            owner = {"type": "service_account", "service_account": {
                "id": account.id, "name": account.name, "created_at": CREATED, "role": "member"}}
        else:
            owner = {"type": "user", "user": {"id": "user_mock", "name": "Mock User",
                                              "email": "user@example.com", "created_at": CREATED,
                                              "role": "owner"}}
        return {"object": "organization.project.api_key", "id": key.id, "name": key.name,
                "redacted_value": f"{key.key[:6]}...{key.key[-4:]}", "created_at": CREATED,
                "last_used_at": None, "owner": owner, "owner_project_access": "active"}

    def _openai_page(self, request: Request, items: list[tuple[str, dict[str, Any]]]) -> Response:
        size = _page_size(request.query_params.get("limit"), OPENAI_PAGE)
        if size is None:
            return admin_error("openai", 400, f"limit: an integer from 1 to {OPENAI_PAGE[1]}",
                               "invalid_value")
        ids = [item_id for item_id, _ in items]
        after = request.query_params.get("after")
        start = 0
        if after is not None:
            if after not in ids:
                return admin_error("openai", 400, "after: no such object", "invalid_value")
            start = ids.index(after) + 1
        data = [item for _, item in items[start:start + size]]
        return JSONResponse({"object": "list", "data": data,
                             "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None,
                             "has_more": start + size < len(items)})

    def create_service_account(self, request: Request, body: dict[str, Any]) -> Response:
        name = _name(body, required=True)
        if not name:
            return admin_error("openai", 400, "name: a non-empty string is required",
                               "invalid_value")
        project = request.path_params["project_id"]
        account = ServiceAccount(f"svc_acct_{secrets.token_hex(12)}", name, project, None)
        answer = self._account_json(account)
        answer["api_key"] = None
        if body.get("create_service_account_only") is not True:
            key = ProjectKey(f"key_{secrets.token_hex(8)}", f"sk-svcacct-{secrets.token_urlsafe(32)}",
                             "Secret Key", project, account.id)
            account.key_id = key.id
            self.state.openai_keys[key.id] = key
            accept(self.state, key.key)
            answer["role"] = "member"
            answer["api_key"] = {"object": "organization.project.service_account.api_key",
                                 "value": key.key, "name": key.name, "created_at": CREATED,
                                 "id": key.id}
        self.state.service_accounts[account.id] = account
        return JSONResponse(answer)

    def list_service_accounts(self, request: Request, body: dict[str, Any]) -> Response:
        project = request.path_params["project_id"]
        return self._openai_page(request, [
            (a.id, self._account_json(a)) for a in self.state.service_accounts.values()
            if a.project_id == project])

    def delete_service_account(self, request: Request, body: dict[str, Any]) -> Response:
        account_id = request.path_params["account_id"]
        account = self.state.service_accounts.get(account_id)
        if account is None or account.project_id != request.path_params["project_id"]:
            return admin_error("openai", 404, f"No such service account: {account_id[:64]!r}.")
        del self.state.service_accounts[account_id]
        if account.key_id is not None and (key := self.state.openai_keys.pop(account.key_id, None)):
            refuse(self.state, key.key)
        return JSONResponse({"object": "organization.project.service_account.deleted",
                             "id": account_id, "deleted": True})

    def _project_key(self, request: Request) -> ProjectKey | Response:
        key_id = request.path_params["key_id"]
        key = self.state.openai_keys.get(key_id)
        if key is None or key.project_id != request.path_params["project_id"]:
            return admin_error("openai", 404, f"No such API key: {key_id[:64]!r}.")
        return key

    def list_api_keys(self, request: Request, body: dict[str, Any]) -> Response:
        project = request.path_params["project_id"]
        return self._openai_page(request, [
            (k.id, self._key_json(k)) for k in self.state.openai_keys.values()
            if k.project_id == project])

    def get_api_key(self, request: Request, body: dict[str, Any]) -> Response:
        key = self._project_key(request)
        return key if isinstance(key, Response) else JSONResponse(self._key_json(key))

    def delete_api_key(self, request: Request, body: dict[str, Any]) -> Response:
        key = self._project_key(request)
        if isinstance(key, Response):
            return key
        if key.account_id is not None:
            return admin_error("openai", 400, "This API key belongs to a service account: "
                               "delete the service account instead.", "invalid_request")
        del self.state.openai_keys[key.id]
        refuse(self.state, key.key)
        return JSONResponse({"object": "organization.project.api_key.deleted", "id": key.id,
                             "deleted": True})

    def spend_limit(self, request: Request, body: dict[str, Any]) -> Response:
        project = request.path_params["project_id"]
        limits = self.state.spend_limits
        if request.method == "POST":
            cents = body.get("threshold_amount")
            if body.get("currency") != "USD" or body.get("interval") != "month":
                return admin_error("openai", 400, "currency must be USD and interval month",
                                   "invalid_value")
            if isinstance(cents, bool) or not isinstance(cents, int) or cents < 0:
                return admin_error("openai", 400, "threshold_amount: a whole number of cents",
                                   "invalid_value")
            limits[project] = cents
        elif project not in limits:
            return admin_error("openai", 404, "This project has no hard spend limit.")
        elif request.method == "DELETE":
            del limits[project]
            return JSONResponse({"object": "project.spend_limit.deleted", "deleted": True})
        return JSONResponse({"object": "project.spend_limit", "currency": "USD",
                             "interval": "month", "threshold_amount": limits[project],
                             "enforcement": {"status": "inactive"}})

    # --- OpenRouter -----------------------------------------------------------------------

    def _router_json(self, key: RouterKey) -> dict[str, Any]:
        return {"hash": key.hash, "name": key.name, "label": f"{key.key[:11]}...{key.key[-4:]}",
                "disabled": key.disabled, "limit": key.limit, "limit_remaining": key.limit,
                "limit_reset": None, "include_byok_in_limit": False, "usage": 0,
                "created_at": rfc3339(CREATED), "updated_at": None, "expires_at": None}

    def _router_key(self, request: Request) -> RouterKey | Response:
        key = self.state.router_keys.get(request.path_params["hash"])
        return key if key is not None else admin_error("openrouter", 404, "Key not found.")

    def create_router_key(self, request: Request, body: dict[str, Any]) -> Response:
        name, limit = _name(body, required=True), body.get("limit")
        if not name:
            return admin_error("openrouter", 400, "name: a non-empty string is required")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int | float)
                                  or limit < 0):
            return admin_error("openrouter", 400, "limit: a non-negative number or null")
        value = f"sk-or-v1-{secrets.token_hex(32)}"
        key = RouterKey(hashlib.sha256(value.encode()).hexdigest(), value, name, limit=limit)
        self.state.router_keys[key.hash] = key
        accept(self.state, value)
        return JSONResponse({"data": self._router_json(key), "key": value}, 201)

    def list_router_keys(self, request: Request, body: dict[str, Any]) -> Response:
        raw_offset = request.query_params.get("offset", "0")
        disabled = request.query_params.get("include_disabled", "false")
        if not raw_offset.isdigit() or disabled not in ("true", "false"):
            return admin_error("openrouter", 400, "offset: a whole number; include_disabled: "
                               "true or false")
        offset = int(raw_offset)
        keys = [k for k in self.state.router_keys.values() if disabled == "true" or not k.disabled]
        return JSONResponse({"data": [self._router_json(k)
                                      for k in keys[offset:offset + ROUTER_PAGE]]})

    def update_router_key(self, request: Request, body: dict[str, Any]) -> Response:
        key = self._router_key(request)
        if isinstance(key, Response):
            return key
        name, disabled = _name(body, required=False), body.get("disabled", key.disabled)
        if name is False or not isinstance(disabled, bool):
            return admin_error("openrouter", 400, "name: a non-empty string; disabled: a boolean")
        key.name, key.disabled = name or key.name, disabled
        (refuse if disabled else accept)(self.state, key.key)
        return JSONResponse({"data": self._router_json(key)})

    def delete_router_key(self, request: Request, body: dict[str, Any]) -> Response:
        key = self._router_key(request)
        if isinstance(key, Response):
            return key
        del self.state.router_keys[key.hash]
        refuse(self.state, key.key)
        return JSONResponse({"deleted": True})

    async def current_router_key(self, request: Request) -> Response:
        """The key check: the calling key's own record."""
        from plugins.mock_federation import key_refused

        key = _bearer(request) or None
        if (fault := check_fault(self.state, "openrouter")) is not None:
            return fault
        if key_refused(self.state, request, key, "openai"):
            return admin_error("openrouter", 401, "No auth credentials found")
        found = next((k for k in self.state.router_keys.values() if k.key == key), None)
        return JSONResponse({"data": {
            "label": f"{key[:11]}...{key[-4:]}" if key else "", "usage": 0, "is_free_tier": False,
            "limit": found.limit if found else None, "limit_remaining": None,
            "is_management_key": False}})

    # --- Anthropic ------------------------------------------------------------------------

    def _anthropic_status(self, key: AnthropicKey) -> str:
        if key.status == "active" and key.expires_at is not None and now(self.state) >= key.expires_at:
            return "expired"
        return key.status

    def _anthropic_json(self, key: AnthropicKey) -> dict[str, Any]:
        return {"id": key.id, "type": "api_key", "name": key.name,
                "workspace_id": key.workspace_id, "created_at": rfc3339(CREATED),
                "created_by": {"id": "user_mock", "type": "user"},
                "partial_key_hint": f"{key.key[:16]}...{key.key[-4:]}",
                "status": self._anthropic_status(key),
                "expires_at": rfc3339(key.expires_at) if key.expires_at is not None else None}

    def _anthropic_key(self, request: Request) -> AnthropicKey | Response:
        key = self.state.anthropic_keys.get(request.path_params["key_id"])
        return key if key is not None else admin_error("anthropic", 404, "API key not found.")

    def list_anthropic_keys(self, request: Request, body: dict[str, Any]) -> Response:
        query = request.query_params
        size = _page_size(query.get("limit"), ANTHROPIC_PAGE)
        status, workspace = query.get("status"), query.get("workspace_id")
        if size is None or (status is not None and status not in ANTHROPIC_STATUSES):
            return admin_error("anthropic", 400, f"limit: 1 to {ANTHROPIC_PAGE[1]}; status: one "
                               f"of {', '.join(ANTHROPIC_STATUSES)}")
        keys = [k for k in self.state.anthropic_keys.values()
                if (status is None or self._anthropic_status(k) == status)
                and (workspace is None or k.workspace_id == workspace)]
        ids = [k.id for k in keys]
        start = 0
        if (after := query.get("after_id")) is not None:
            if after not in ids:
                return admin_error("anthropic", 400, "after_id: no such API key")
            start = ids.index(after) + 1
        data = [self._anthropic_json(k) for k in keys[start:start + size]]
        return JSONResponse({"data": data, "has_more": start + size < len(keys),
                             "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None})

    def get_anthropic_key(self, request: Request, body: dict[str, Any]) -> Response:
        key = self._anthropic_key(request)
        return key if isinstance(key, Response) else JSONResponse(self._anthropic_json(key))

    def update_anthropic_key(self, request: Request, body: dict[str, Any]) -> Response:
        key = self._anthropic_key(request)
        if isinstance(key, Response):
            return key
        name, status = _name(body, required=False), body.get("status", key.status)
        if name is False or status not in ANTHROPIC_SETTABLE:
            return admin_error("anthropic", 400, "name: 1 to 500 characters; status: one of "
                               f"{', '.join(ANTHROPIC_SETTABLE)}")
        if key.status == "archived" and status != "archived":
            return admin_error("anthropic", 400, "An archived API key cannot be changed.")
        key.name, key.status = name or key.name, status
        (accept if status == "active" else refuse)(self.state, key.key)
        return JSONResponse(self._anthropic_json(key))


def admin_routes(state: MockState) -> list[Route]:
    """The admin APIs' routes, for `create_mock_upstream`."""
    return AdminApi(state).routes()


def check_fault(state: MockState, flavour: Flavour = "openai") -> Response | None:
    """The `check` fault of the key checks (`GET /v1/models`, `GET /api/v1/key`)."""
    fault = take_fault(state, "check")
    if fault is None:
        return None
    return admin_error(flavour, fault.status, f"Injected fault: HTTP {fault.status}.")
