"""Batch jobs through the broker (the OpenAI Batch API, chat-completion lines only).

1. ``POST /v1/files`` (:meth:`Batches.upload`): the JSONL input file is checked line by line as
   live calls are (:mod:`broker.gateway.batch_files`), rewritten (explicit output limits, the
   upstream model) and uploaded to the provider; the broker records its worst case in token
   units (:class:`~broker.storage.models.BatchFile`), never its content.
2. ``POST /v1/batches`` (:meth:`Batches.create`): gated by ``policy.batch`` (``denied``: 403
   ``batch_not_allowed``; ``approval``: a live grant of ``batch`` on the token, else 403
   ``approval_required``); the file's worst case, priced at the batch price (``100 -
   batch_discount_percent`` percent of the list, rounded up once per model), is carved out of the
   token's slice into a *job slice* that outlives the token
   (:func:`broker.money.ledger.reserve_job_slice`), as one hold per model. A batch that does not
   fit is refused (429 ``insufficient_quota``) before the provider sees it; one the provider
   refuses is settled at nothing at once.
3. The poller (:mod:`broker.gateway.batch_poll`) settles each job once from the provider's
   output (:func:`settle_job`: the holds, one usage event per model, the slice released).

Provider requests reuse the plugin's own chat request for their base URL and credentials, so a
provider key only ever travels in the headers the plugin builds; it is never logged nor put in
an error.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote as escape

import anyio
import httpx
from sqlalchemy import Connection, insert, select, update

from broker.errors import (
    ApprovalRequired,
    BatchNotAllowed,
    InsufficientQuota,
    InvalidRequest,
    InvalidToken,
    NotFound,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
)
from broker.gateway.batch_files import ENDPOINT, OP, check_file, counts, multipart, usage_of
from broker.gateway.calls import Gateway, Reply
from broker.gateway.charges import read_capped
from broker.gateway.stream import body_chunks
from broker.gateway.upstream_http import Upstream
from broker.identity.policy import Policy
from broker.money import ledger
from broker.money.outcome import Outcome
from broker.money.pricing import Price, Usage
from broker.plugin import Provider
from broker.revocation import actions
from broker.settings import ModelSettings, Settings
from broker.storage import audit
from broker.storage.models import BatchFile, BatchJob, Hold, TokenSlice
from broker.tokens.tokens import VerifiedToken

log = logging.getLogger("broker.batches")

_file = BatchFile.__table__  # type: ignore[attr-defined]
_job = BatchJob.__table__  # type: ignore[attr-defined]
_hold = Hold.__table__  # type: ignore[attr-defined]
_slice = TokenSlice.__table__  # type: ignore[attr-defined]

COMPLETION_WINDOW = "24h"
MAX_METADATA = 16
# A job's slice expires this long after the job's own deadline (``batches.max_age_s``), so the
# sweeper does not try (in vain, while its holds are open) to release it before the poller
# settled it; once settled, the poller releases it at once.
JOB_SLICE_SLACK_S = 86_400
# What the job row says until the provider answered the creation.
CREATING = "creating"
# The longest line of a provider's output file the poller reads (one answer and its usage).
MAX_LINE_BYTES = 32 * 1024 * 1024


# --- prices ----------------------------------------------------------------------------------


def batch_price(spec: ModelSettings) -> Price:
    """The model's price in a batch: the provider's batch discount off the list."""
    return Price.of(spec, 100 - spec.batch_discount_percent)


# --- the provider's Files and Batches endpoints ----------------------------------------------


class ProviderApi:
    """One provider's ``/files`` and ``/batches``, next to its chat completions. The base URL and
    the credential headers are those of the plugin's own chat request."""

    def __init__(self, provider: Provider, key: str, up: Upstream) -> None:
        probe = provider.build_request(OP, {}, key=key, client_headers={})
        self.base = probe.url.removesuffix("/chat/completions")
        self._headers = {k: v for k, v in probe.headers.items()
                         if k.lower() not in ("content-type", "accept", "content-length")}
        self._up = up

    async def send(self, method: str, path: str, *, content: bytes | None = None,
                   content_type: str | None = None) -> httpx.Response:
        """The provider's answer, its body still to read (the caller closes it)."""
        headers = {**self._headers, "accept": "application/json"}
        if content_type is not None:
            headers["content-type"] = content_type
        request = httpx.Request(method, self.base + path, headers=headers, content=content,
                                extensions=self._up.extensions)
        return await self._up.send(request)

    async def call(self, method: str, path: str, *, content: bytes | None = None,
                   content_type: str | None = None) -> tuple[int, bytes]:
        response = await self.send(method, path, content=content, content_type=content_type)
        try:
            return response.status_code, await read_capped(response)
        finally:
            await response.aclose()

    async def lines(self, file_id: str) -> AsyncGenerator[bytes, None]:
        """The lines of a file's content, as they arrive (an output file may be large).
        :class:`UpstreamError` unless the provider answers 200."""
        response = await self.send("GET", f"/files/{escape(file_id, safe='')}/content")
        try:
            if response.status_code != 200:
                raise UpstreamError(f"the provider answered {response.status_code}")
            pending = b""
            async for chunk in body_chunks(response):
                *complete, pending = (pending + chunk).split(b"\n")
                if len(pending) > MAX_LINE_BYTES:
                    raise UpstreamError("a line of the provider's file is too long")
                for line in complete:
                    yield line
            if pending:
                yield pending
        finally:
            await response.aclose()


def reply(status: int, content: bytes) -> Reply:
    return Reply(status, content, {"content-type": "application/json"})


def json_of(content: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(content)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def refusal(status: int, content: bytes) -> Reply:
    """A provider's refusal as the client sees it: its own error for a 4xx (the request was at
    fault), 429 as a rate limit, anything else as the provider's failure."""
    if status == 429:
        raise RateLimited("the provider is rate limiting batches")
    if status in (401, 403, 407):
        log.error("provider refused the broker's credentials (HTTP %d)", status)
        raise UpstreamError("the provider refused the request")
    if 400 <= status < 500 and json_of(content) is not None:
        return reply(status, content)
    raise UpstreamError(f"the provider answered {status}")


# --- jobs in the ledger --------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    id: str
    tenant_id: str
    workload_id: str
    jti: str
    hold_ids: dict[str, str]  # model -> hold
    provider: str
    input_file_id: str
    status: str
    created_at: int


def job_of(row: Any) -> Job:
    return Job(str(row.id), str(row.tenant_id), str(row.workload_id), str(row.jti),
               {str(k): str(v) for k, v in dict(row.hold_ids).items()}, str(row.provider),
               str(row.input_file_id), str(row.status), int(row.created_at))


@dataclass(frozen=True)
class Charge:
    """What settlement charges one model of a job: ``cost`` None charges its whole hold."""

    usage: Usage
    cost: int | None
    estimated: bool = False


def settle_job(conn: Connection, job: Job, charges: dict[str, Charge], status: Outcome,
               now: int, actor: str, job_status: str | None = None) -> bool:
    """Settle every hold of the job (one usage event per model, ``request_id`` the batch id,
    ``status`` the outcome), release its slice and mark it settled (``job_status``: the
    provider's last word, else the outcome): all at once, and once. False when it already was
    (another poller, another replica): nothing is charged a second time."""
    j = _job.c
    marked = conn.execute(update(_job).where(j.id == job.id, j.settled_at.is_(None)).values(
        settled_at=now, status=(job_status or status.value)[:32])).rowcount
    if not marked:
        return False
    held = {str(r[0]): int(r[1]) for r in conn.execute(
        select(_hold.c.id, _hold.c.amount_micros).where(_hold.c.jti == job.jti))}
    total = 0
    for model, hold_id in sorted(job.hold_ids.items()):
        charge = charges.get(model, Charge(Usage(0, 0), 0))
        cost = held.get(hold_id, 0) if charge.cost is None else charge.cost
        ended = Outcome.OVERRUN if cost > held.get(hold_id, cost) else status
        event = {"request_id": job.id[:64], "ts": now, "model": model,
                 "provider": job.provider, "prompt_tokens": charge.usage.prompt_tokens,
                 "completion_tokens": charge.usage.completion_tokens, "status": ended.value,
                 "latency_ms": max(0, now - job.created_at) * 1000,
                 "estimated": charge.estimated or charge.cost is None}
        done = ledger.settle_hold(conn, hold_id=hold_id, cost=cost, event=event)
        if done is None:
            continue
        total += cost
        if done.excess:
            _overrun(conn, job, model, cost, done.excess, now)
    ledger.release_slice(conn, job.jti, now)
    audit.record(conn, actor, "batch.settle", job.id,
                 {"tenant_id": job.tenant_id, "status": status.value, "cost_micros": total}, now)
    return True


def _overrun(conn: Connection, job: Job, model: str, cost: int, excess: int, now: int) -> None:
    """The provider billed the job more than its bound: the token that launched it is refused
    from now on, as for a live call (the charge itself is in the ledger already)."""
    log.warning("overrun: provider %s billed batch %s %d micro-dollars above its hold",
                job.provider, job.id[:64], excess)
    parent = conn.execute(select(_slice.c.parent_jti).where(_slice.c.jti == job.jti)).scalar()
    if parent is not None:
        actions.revoke_for_overrun(
            conn, jti=str(parent), workload_id=job.workload_id, tenant_id=job.tenant_id,
            excess=excess, detail={"request_id": job.id[:64], "model": model,
                                   "provider": job.provider, "cost_micros": cost}, now=now)


# --- the service ---------------------------------------------------------------------------


class Batches:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.settings: Settings = gateway.settings
        self.db = gateway.svc.db

    async def _api(self, provider: Provider) -> ProviderApi:
        key = await self.gateway.keys.get(provider.config.name)
        return ProviderApi(provider, key, self.gateway.pool(provider))

    async def upload(self, token: VerifiedToken, filename: str, raw: bytes) -> Reply:
        """Check the file, upload it to the provider, record it; the provider's FileObject.
        Each request on these routes counts against the workload's rates, as a call does."""
        async with self.gateway.counted(token, await self.gateway.policy(token.sub)):
            return await self._upload(token, filename, raw)

    async def _upload(self, token: VerifiedToken, filename: str, raw: bytes) -> Reply:
        checked = await check_file(self.gateway, token, raw)
        api = await self._api(checked.provider)
        content, ctype = multipart(filename, checked.content)
        try:
            status, answer = await api.call("POST", "/files", content=content,
                                            content_type=ctype)
        except httpx.TimeoutException:
            raise UpstreamTimeout() from None
        except httpx.HTTPError:
            raise UpstreamError("the provider could not be reached") from None
        if status != 200:
            return refusal(status, answer)
        found = json_of(answer)
        file_id = found.get("id") if found is not None else None
        if not isinstance(file_id, str) or not 0 < len(file_id) <= 128:
            raise UpstreamError("the provider's answer names no file")
        row = {"id": file_id, "tenant_id": token.tenant, "workload_id": token.sub,
               "provider": checked.provider.config.name, "filename": filename,
               "bytes": len(checked.content), "lines": checked.lines,
               "models": sorted(checked.worst),
               "worst": {m: counts(u) for m, u in checked.worst.items()},
               "line_worst": {c: [m, *counts(u)] for c, (m, u) in checked.line_worst.items()},
               "created_at": int(time.time())}
        await self.db.run(lambda conn: conn.execute(insert(_file).values(**row)))
        return reply(200, answer)

    async def create(self, token: VerifiedToken, body: dict[str, Any]) -> Reply:
        """Gate, hold the worst case in a job slice, create the batch at the provider."""
        file_id, metadata = _batch_request(body)
        found = await self.db.read(lambda conn: conn.execute(
            select(_file).where(_file.c.id == file_id, _file.c.tenant_id == token.tenant)
        ).first())
        if found is None:
            raise NotFound(f"no file {file_id[:128]!r}")
        policy = await self.gateway.policy(token.sub)
        async with self.gateway.counted(token, policy):
            return await self._create(token, policy, found, file_id, metadata)

    async def _create(self, token: VerifiedToken, policy: Policy, found: Any, file_id: str,
                      metadata: dict[str, str] | None) -> Reply:
        if policy.batch == "denied":
            raise BatchNotAllowed("this workload's policy does not allow batch jobs")
        if policy.batch != "allowed" and "batch" not in token.grant_tools:
            raise ApprovalRequired("batch jobs need an approval")
        amounts: dict[str, int] = {}
        for model, stored in sorted(dict(found.worst).items()):
            # The token launching the batch may not be the one that uploaded the file.
            _, spec, _, _ = await self.gateway.admit_model(token, model, OP)
            amounts[model] = batch_price(spec).cost(usage_of(stored))
        provider = self.gateway.providers[str(found.provider)]
        api = await self._api(provider)  # a Vault outage refuses the batch before money moves
        now = int(time.time())
        # Until the provider names the batch, the job is known by its slice's id.
        jti = "job_" + secrets.token_hex(12)
        job = Job(jti, token.tenant, token.sub, jti,
                  {m: "h_" + secrets.token_hex(12) for m in amounts}, provider.config.name,
                  file_id, CREATING, now)
        await self.db.run(lambda conn: self._hold(conn, token, job, amounts))
        ask: dict[str, Any] = {"input_file_id": file_id, "endpoint": ENDPOINT,
                               "completion_window": COMPLETION_WINDOW}
        if metadata is not None:
            ask["metadata"] = metadata
        request = json.dumps(ask)
        # Money is held: whatever happens to the client's connection, the job is recorded or
        # settled before this returns.
        with anyio.CancelScope(shield=True):
            answer = await self._launch(api, token, job, amounts, request.encode())
        return answer

    def _hold(self, conn: Connection, token: VerifiedToken, job: Job,
              amounts: dict[str, int]) -> None:
        total = sum(amounts.values())
        expires = job.created_at + self.settings.batches.max_age_s + JOB_SLICE_SLACK_S
        if not ledger.reserve_job_slice(conn, jti=job.jti, parent=token.jti,
                                        workload_id=token.sub, tenant_id=token.tenant,
                                        amount=total, now=job.created_at, expires_at=expires):
            if ledger.slice_remaining(conn, token.jti) is None:
                raise InvalidToken()
            raise InsufficientQuota(f"the token's remaining slice cannot hold this batch's worst "
                                    f"case ({total} micro-dollars)")
        for model, amount in amounts.items():
            ledger.place_hold(conn, hold_id=job.hold_ids[model], jti=job.jti, amount=amount,
                              now=job.created_at)
        conn.execute(insert(_job).values(
            id=job.id, tenant_id=job.tenant_id, workload_id=job.workload_id, jti=job.jti,
            hold_ids=job.hold_ids, provider=job.provider, input_file_id=job.input_file_id,
            status=CREATING, created_at=job.created_at))

    async def _launch(self, api: ProviderApi, token: VerifiedToken, job: Job,
                      amounts: dict[str, int], request: bytes) -> Reply:
        try:
            status, answer = await api.call("POST", "/batches", content=request,
                                            content_type="application/json")
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout):
            await self._unhold(job, Outcome.NOT_SENT)
            raise UpstreamError("the provider could not be reached") from None
        except httpx.TimeoutException:
            # The provider may have made the batch: the job stays held, under its creation
            # id, until the poller settles it at its whole hold after batches.max_age_s.
            raise UpstreamTimeout() from None
        except httpx.HTTPError:
            await self._unhold(job, Outcome.UPSTREAM_ERROR)
            raise UpstreamError("the provider failed") from None
        if status != 200:
            await self._unhold(job, Outcome.UPSTREAM_REJECTED if 400 <= status < 500
                               else Outcome.UPSTREAM_ERROR)
            return refusal(status, answer)
        found = json_of(answer)
        batch_id = found.get("id") if found is not None else None
        if found is None or not isinstance(batch_id, str) or not 0 < len(batch_id) <= 128:
            # Made, but unnamed: held like a timeout, since the provider may run it.
            raise UpstreamError("the provider's answer names no batch")
        provider_status = str(found.get("status", "validating"))[:32]

        def record(conn: Connection) -> None:
            conn.execute(update(_job).where(_job.c.id == job.id)
                         .values(id=batch_id, status=provider_status))
            audit.record(conn, token.sub, "batch.create", batch_id,
                         {"tenant_id": token.tenant, "input_file_id": job.input_file_id,
                          "provider": job.provider, "jti": job.jti,
                          "held_micros": sum(amounts.values())}, int(time.time()))

        await self.db.run(record)
        return reply(200, answer)

    async def _unhold(self, job: Job, outcome: Outcome) -> None:
        """The provider did not take the batch: its holds settle at nothing, its slice goes
        back to the token."""
        await self.db.run(lambda conn: settle_job(conn, job, {}, outcome, int(time.time()),
                                                  job.workload_id))

    async def _job(self, token: VerifiedToken, batch_id: str) -> tuple[Job, ProviderApi]:
        row = await self.db.read(lambda conn: conn.execute(
            select(_job).where(_job.c.id == batch_id, _job.c.tenant_id == token.tenant,
                               _job.c.status != CREATING)).first())
        if row is None:
            raise NotFound(f"no batch {batch_id[:128]!r}")
        job = job_of(row)
        return job, await self._api(self.gateway.providers[job.provider])

    async def retrieve(self, token: VerifiedToken, batch_id: str) -> Reply:
        """The provider's Batch object, passed through (the poller settles it)."""
        job, api = await self._job(token, batch_id)
        async with self.gateway.counted(token, await self.gateway.policy(token.sub)):
            status, answer = await _forward(api, "GET", f"/batches/{escape(job.id, safe='')}")
        return reply(200, answer) if status == 200 else refusal(status, answer)

    async def cancel(self, token: VerifiedToken, batch_id: str) -> Reply:
        """Forward the cancellation; the poller settles what the provider billed."""
        job, api = await self._job(token, batch_id)
        async with self.gateway.counted(token, await self.gateway.policy(token.sub)):
            status, answer = await _forward(api, "POST",
                                            f"/batches/{escape(job.id, safe='')}/cancel")
        if status != 200:
            return refusal(status, answer)
        await self.db.run(lambda conn: audit.record(
            conn, token.sub, "batch.cancel", job.id, {"tenant_id": token.tenant},
            int(time.time())))
        return reply(200, answer)


async def _forward(api: ProviderApi, method: str, path: str) -> tuple[int, bytes]:
    try:
        return await api.call(method, path, content=b"" if method == "POST" else None)
    except httpx.TimeoutException:
        raise UpstreamTimeout() from None
    except httpx.HTTPError:
        raise UpstreamError("the provider could not be reached") from None


def _batch_request(body: dict[str, Any]) -> tuple[str, dict[str, str] | None]:
    """(input_file_id, metadata) of a batch creation, checked as OpenAI does."""
    unknown = sorted(set(body) - {"input_file_id", "endpoint", "completion_window", "metadata"})
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0][:64]!r}", param=unknown[0][:64])
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str) or not file_id:
        raise InvalidRequest("input_file_id is required", param="input_file_id")
    if body.get("endpoint") != ENDPOINT:
        raise InvalidRequest(f"only {ENDPOINT} is supported", param="endpoint")
    if body.get("completion_window") != COMPLETION_WINDOW:
        raise InvalidRequest(f"completion_window must be {COMPLETION_WINDOW!r}",
                             param="completion_window")
    metadata = body.get("metadata")
    if metadata is not None and not (
            isinstance(metadata, dict) and len(metadata) <= MAX_METADATA
            and all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                    for k, v in metadata.items())):
        raise InvalidRequest(f"metadata holds at most {MAX_METADATA} string pairs",
                             param="metadata")
    return file_id, metadata
