"""The broker's error tree.

Each domain error carries a stable ``code`` and an HTTP ``status``; the edge
(:func:`broker.api.http.error_response`) renders it in the caller's dialect (OAuth, problem+json, OpenAI,
Anthropic). Messages never contain secrets: they are written for the caller, not for debugging.
"""

from __future__ import annotations


class ConfigError(Exception):
    """The configuration is invalid; the message names the key. Stops the start."""


class BrokerError(Exception):
    status: int = 500
    code: str = "internal_error"
    title: str = "Internal error"

    def __init__(self, detail: str | None = None, *, headers: dict[str, str] | None = None,
                 param: str | None = None):
        self.detail = detail or self.title
        self.headers = headers or {}
        # The request field at fault, for the dialects that name one (OpenAI's ``param``).
        self.param = param
        super().__init__(self.detail)


# --- request shape -------------------------------------------------------------------------


class InvalidRequest(BrokerError):
    status = 400
    code = "invalid_request"
    title = "Invalid request"


class Unbounded(InvalidRequest):
    """A request part or field whose cost the broker cannot bound: it is refused, never
    forwarded unpriced. The message names the field."""


class ValidationFailed(BrokerError):
    """A well-formed body whose content breaks the schema (unknown field, wrong type, range)."""

    status = 422
    code = "validation_error"
    title = "Validation failed"


class PayloadTooLarge(BrokerError):
    status = 413
    code = "payload_too_large"
    title = "Payload too large"


class UnsupportedMediaType(BrokerError):
    status = 415
    code = "unsupported_media_type"
    title = "Unsupported media type"


class NotFound(BrokerError):
    status = 404
    code = "not_found"
    title = "Not found"


class Conflict(BrokerError):
    status = 409
    code = "conflict"
    title = "Conflict"


class MethodNotAllowed(BrokerError):
    status = 405
    code = "method_not_allowed"
    title = "Method not allowed"


# --- OAuth ---------------------------------------------------------------------------------


class UnsupportedGrantType(BrokerError):
    status = 400
    code = "unsupported_grant_type"
    title = "Unsupported grant type"


class InvalidScope(BrokerError):
    status = 400
    code = "invalid_scope"
    title = "Invalid scope"


class InvalidTarget(BrokerError):
    """RFC 8707: the ``resource`` or ``audience`` asked for is not one this broker serves."""

    status = 400
    code = "invalid_target"
    title = "Invalid target"


class InvalidClient(BrokerError):
    """Wrong secret, unknown client and suspended identity all look exactly like this."""

    status = 401
    code = "invalid_client"
    title = "Client authentication failed"


class InvalidSubjectToken(InvalidClient):
    """An external subject token was refused. The caller sees exactly :class:`InvalidClient`;
    ``reason`` is for the broker's log only (never a token, never a claim value)."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason


class SlowDown(BrokerError):
    status = 429
    code = "slow_down"
    title = "Too many failed attempts; slow down"


class BudgetExhausted(BrokerError):
    status = 403
    code = "budget_exhausted"
    title = "No budget slice can be reserved"


# --- bearer tokens -------------------------------------------------------------------------


class InvalidToken(BrokerError):
    """Every token refusal is this one error with one body, so nothing is learned from it."""

    status = 401
    code = "invalid_token"
    title = "Invalid or expired token"


class Forbidden(BrokerError):
    status = 403
    code = "forbidden"
    title = "Forbidden"


# --- gateway -------------------------------------------------------------------------------


class ModelNotAllowed(BrokerError):
    status = 403
    code = "model_not_allowed"
    title = "Model not allowed for this token"


class ApprovalRequired(BrokerError):
    status = 403
    code = "approval_required"
    title = "Model requires an approval that was not granted"


class ToolNotAllowed(BrokerError):
    status = 403
    code = "tool_not_allowed"
    title = "Tool type not allowed by the policy"


class BatchNotAllowed(BrokerError):
    """The workload's policy forbids batch jobs (``policy.batch`` ``denied``)."""

    status = 403
    code = "batch_not_allowed"
    title = "Batch jobs are not allowed for this workload"


class InsufficientQuota(BrokerError):
    status = 429
    code = "insufficient_quota"
    title = "The token's budget slice cannot pay for this request"


class RateLimited(BrokerError):
    status = 429
    code = "rate_limit_exceeded"
    title = "Rate limit exceeded"


class ModelNotFound(BrokerError):
    status = 404
    code = "model_not_found"
    title = "Unknown model"


class UpstreamError(BrokerError):
    status = 502
    code = "upstream_error"
    title = "The provider failed"


class UpstreamTimeout(BrokerError):
    status = 504
    code = "upstream_timeout"
    title = "The provider timed out"


# --- dependencies --------------------------------------------------------------------------


class Unavailable(BrokerError):
    """A dependency (database, Vault) does not answer; the data plane fails closed."""

    status = 503
    code = "service_unavailable"
    title = "Service unavailable"


class VaultUnavailable(Unavailable):
    title = "Vault is unavailable"


class LedgerUnavailable(Unavailable):
    title = "The ledger is unavailable"


class LimitsUnavailable(Unavailable):
    """The shared store of rate limits (Redis, or the database) does not answer: nothing is
    admitted uncounted, so the request is refused."""

    code = "limits_unavailable"
    title = "Rate limits are unavailable"
