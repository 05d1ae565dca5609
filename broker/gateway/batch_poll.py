"""The batch poller: asks the provider about every unsettled batch job and settles each once.

A job the provider reports ``completed``, ``cancelled``, ``failed`` or ``expired`` is charged
what its output and error files show the provider billed: every line answered 200 at the usage
of its body (:meth:`broker.plugin.Provider.read_usage`), or at the line's worst case when the
body reports none; lines answered with an error, or never answered, cost nothing. Each model's
usage is priced once at the batch price (rounded up once per model) and settles that model's
hold in one usage event (``request_id`` the batch id), then the job's slice goes back to the
token's (:func:`broker.gateway.batches.settle_job`, one transaction that matches once: two
pollers on two replicas never charge twice).

A running job whose launching token was revoked (an admin revoked it, suspended its workload or
tenant, or the monitor did) is cancelled at the provider once (``batch.cancel`` in the audit):
a revocation stops the spending it launched too. It then settles as any cancelled job does.

A job the provider no longer knows (404), still running, or whose output cannot be read, once
older than ``batches.max_age_s``, is settled at its whole hold (``orphaned``): the provider may
have billed all of it. So is a job whose creation never got an answer (a crash, a timeout). A
provider that does not answer leaves the job for the next poll.

Runs as the scheduled job ``batches.poll`` (on the leader, in the scheduler's thread) on an event
loop of its own: its HTTP clients and its reads of provider keys are its own too, since the
gateway's belong to the app's event loop.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar
from urllib.parse import quote

import anyio
import anyio.to_thread
import httpx
from sqlalchemy import Connection, select, update

from broker.errors import BrokerError, UpstreamError
from broker.gateway.batch_files import OP, plus, usage_of
from broker.gateway.batches import (
    CREATING,
    Charge,
    Job,
    ProviderApi,
    batch_price,
    job_of,
    json_of,
    settle_job,
)
from broker.gateway.provider_keys import ProviderKeys
from broker.gateway.upstream_http import CONNECT_TIMEOUT_S, Upstream
from broker.money.outcome import Outcome
from broker.money.pricing import Usage
from broker.plugin import Provider
from broker.services import Services
from broker.storage import audit
from broker.storage.models import BatchFile, BatchJob, TokenSlice

log = logging.getLogger("broker.batches")

_file = BatchFile.__table__  # type: ignore[attr-defined]
_job = BatchJob.__table__  # type: ignore[attr-defined]
_slice = TokenSlice.__table__  # type: ignore[attr-defined]

ACTOR = "batches.poll"
# Jobs looked at per run, oldest first; the rest wait for the next run.
JOBS_PER_RUN = 500
# Statuses in which a job is no longer running (or is being stopped already).
STOPPING = frozenset({"cancelling", "cancelled", "completed", "failed", "expired", "finalizing"})
# How the provider's terminal statuses settle.
TERMINAL = {
    "completed": Outcome.OK,
    "cancelled": Outcome.CANCELLED,
    "failed": Outcome.UPSTREAM_ERROR,
    "expired": Outcome.EXPIRED,
}
_NONE = Usage(0, 0)

T = TypeVar("T")


def poll_once(svc: Services, now: int | None = None) -> int:
    """One pass over the unsettled jobs; how many it settled. ``now`` (UNIX seconds) is the
    clock the jobs' ages are measured with."""
    return anyio.run(_poll, svc, int(time.time()) if now is None else now)


async def _in_db(svc: Services, fn: Callable[[Connection], T]) -> T:
    return await anyio.to_thread.run_sync(functools.partial(svc.db.transaction, fn))


@contextlib.asynccontextmanager
async def _upstream(provider: Provider) -> AsyncIterator[Upstream]:
    """A client of the provider's for this run (its own transport for in-process providers)."""
    timeout_s = provider.config.timeout_s
    timeout = httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s))
    async with httpx.AsyncClient(transport=provider.transport(), follow_redirects=False,
                                 timeout=timeout) as client:

        async def send(request: httpx.Request) -> httpx.Response:
            return await client.send(request, stream=True)

        yield Upstream(send, {"timeout": timeout.as_dict()}, {})


async def _poll(svc: Services, now: int) -> int:
    rows = await _in_db(svc, lambda conn: conn.execute(
        select(_job).where(_job.c.settled_at.is_(None)).order_by(_job.c.created_at)
        .limit(JOBS_PER_RUN)).all())
    revoked = await _in_db(svc, functools.partial(_revoked, jtis=[str(r.jti) for r in rows]))
    by_provider: dict[str, list[Job]] = {}
    for row in rows:
        job = job_of(row)
        by_provider.setdefault(job.provider, []).append(job)
    # The shared ProviderTokens serves this loop too: one exchange per provider process-wide.
    keys = ProviderKeys(svc.vault, {n: p.vault_path for n, p in svc.settings.providers.items()},
                        max_stale_s=svc.settings.vault.max_stale_s, tokens=svc.provider_tokens)
    settled = 0
    for name, jobs in by_provider.items():
        poller = _Poller(svc, now, revoked)
        async with contextlib.AsyncExitStack() as stack:
            provider = svc.providers.get(name)
            try:
                key = await keys.get(name) if provider is not None else None
            except BrokerError:
                log.warning("batches: the key of provider %s cannot be read; polled later", name)
                key = None
            if provider is not None and key is not None:
                up = await stack.enter_async_context(_upstream(provider))
                poller.api = ProviderApi(provider, key, up)
            for job in jobs:
                try:
                    settled += await poller.job(job)
                except Exception as exc:  # one job's failure must not stop the others
                    log.warning("batch %s: polling failed: %s", job.id[:64], type(exc).__name__)
    return settled


class _Poller:
    """Polls the jobs of one provider; ``api`` None while the provider cannot be asked."""

    def __init__(self, svc: Services, now: int, revoked: frozenset[str] = frozenset()) -> None:
        self.svc = svc
        self.now = now
        self.revoked = revoked  # job slices whose launching token was revoked
        self.max_age_s = svc.settings.batches.max_age_s
        self.api: ProviderApi | None = None

    async def job(self, job: Job) -> bool:
        old = self.now - job.created_at > self.max_age_s
        if job.status == CREATING or self.api is None:
            # Never named by the provider (or its provider is gone): only age settles it.
            return old and await self._orphan(job)
        try:
            status, answer = await self.api.call("GET", f"/batches/{_escape(job.id)}")
        except (httpx.HTTPError, UpstreamError):
            return False  # the provider does not answer: asked again at the next poll
        if status == 404:
            return old and await self._orphan(job)
        found = json_of(answer) if status == 200 else None
        if found is None:
            return False
        state = found.get("status")
        outcome = TERMINAL.get(state) if isinstance(state, str) else None
        if outcome is None:
            if old:
                return await self._orphan(job)
            if job.jti in self.revoked and state not in STOPPING:
                await self._cancel(job)
                return False
            if isinstance(state, str) and state != job.status:
                await _in_db(self.svc, functools.partial(_set_status, job=job, status=state))
            return False
        assert isinstance(state, str)
        charges = await self._charges(job, found)
        if charges is None:
            return old and await self._orphan(job)
        return await self._settle(job, charges, outcome, state)

    async def _charges(self, job: Job, batch: dict[str, Any]) -> dict[str, Charge] | None:
        """Each model's charge from the job's output and error files; None while they cannot
        be read."""
        assert self.api is not None
        file = await self._file(job)
        if file is None:
            return None
        provider = self.api
        line_model: dict[str, tuple[str, Usage]] = {
            str(cid): (str(v[0]), usage_of(v[1:])) for cid, v in dict(file.line_worst).items()}
        models = [str(m) for m in file.models]
        used: dict[str, Usage] = {}
        estimated: set[str] = set()
        plugin = self.svc.providers[job.provider]
        try:
            for key in ("output_file_id", "error_file_id"):
                file_id = batch.get(key)
                if not isinstance(file_id, str) or not file_id:
                    continue
                async with contextlib.aclosing(provider.lines(file_id)) as lines:
                    async for raw in lines:
                        line = json_of(raw) if raw.strip() else None
                        response = line.get("response") if line is not None else None
                        if not isinstance(response, dict) or response.get("status_code") != 200:
                            continue  # an error answer, billed nothing
                        assert line is not None
                        model, worst = line_model.get(str(line.get("custom_id")),
                                                      (models[0], _NONE))
                        body = response.get("body")
                        usage = plugin.read_usage(OP, body) if isinstance(body, dict) else None
                        if usage is None:
                            usage = worst  # answered, but no usage: the most it could bill
                            estimated.add(model)
                        used[model] = plus(used.get(model, _NONE), usage)
        except (httpx.HTTPError, UpstreamError):
            return None
        charges: dict[str, Charge] = {}
        for model in models:
            usage = used.get(model, _NONE)
            spec = self.svc.settings.models.get(model)
            # A model no longer configured has no price: its whole hold is charged.
            cost = batch_price(spec).cost(usage) if spec is not None else None
            charges[model] = Charge(usage, cost, model in estimated)
        return charges

    async def _cancel(self, job: Job) -> None:
        """Stop a job whose token was revoked; the next polls settle what the provider billed."""
        assert self.api is not None
        try:
            status, _answer = await self.api.call("POST", f"/batches/{_escape(job.id)}/cancel",
                                                  content=b"")
        except (httpx.HTTPError, UpstreamError):
            return  # tried again at the next poll
        if status != 200:
            log.warning("batch %s: the provider refused to cancel it (HTTP %d)", job.id[:64],
                        status)
            return

        def record(conn: Connection) -> None:
            _set_status(conn, job=job, status="cancelling")
            audit.record(conn, ACTOR, "batch.cancel", job.id,
                         {"tenant_id": job.tenant_id, "workload_id": job.workload_id,
                          "reason": "the token that launched it was revoked"}, self.now)

        await _in_db(self.svc, record)
        log.warning("batch %s: cancelled, since the token that launched it was revoked",
                    job.id[:64])

    async def _file(self, job: Job) -> Any:
        return await _in_db(self.svc, lambda conn: conn.execute(
            select(_file).where(_file.c.id == job.input_file_id,
                                _file.c.tenant_id == job.tenant_id)).first())

    async def _orphan(self, job: Job) -> bool:
        """Settle at the whole hold: the provider may have billed all of it."""
        file = await self._file(job)
        worst = dict(file.worst) if file is not None else {}
        charges = {m: Charge(usage_of(worst[m]) if m in worst else _NONE, None, True)
                   for m in job.hold_ids}
        log.warning("batch %s: settled at its whole hold (orphaned)", job.id[:64])
        return await self._settle(job, charges, Outcome.ORPHANED, Outcome.ORPHANED.value)

    async def _settle(self, job: Job, charges: dict[str, Charge], outcome: Outcome,
                      state: str) -> bool:
        return await _in_db(self.svc, lambda conn: settle_job(
            conn, job, charges, outcome, self.now, ACTOR, job_status=state))


def _revoked(conn: Connection, jtis: list[str]) -> frozenset[str]:
    """The job slices among ``jtis`` whose parent (the launching token) is revoked."""
    if not jtis:
        return frozenset()
    parent = _slice.alias("parent")
    rows = conn.execute(
        select(_slice.c.jti).join(parent, parent.c.jti == _slice.c.parent_jti)
        .where(_slice.c.jti.in_(jtis), parent.c.revoked_at.isnot(None))).all()
    return frozenset(str(r[0]) for r in rows)


def _set_status(conn: Connection, job: Job, status: str) -> None:
    conn.execute(update(_job).where(_job.c.id == job.id, _job.c.settled_at.is_(None))
                 .values(status=status[:32]))


def _escape(value: str) -> str:
    return quote(value, safe="")
