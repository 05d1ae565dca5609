"""The background jobs of a broker: sweeping, ending grants, retiring signing keys, pruning the
revocation log, scheduled rotation, settling batch jobs, and pruning the shared rate limits.
:class:`broker.storage.scheduler.Scheduler` runs each once across every replica."""

from __future__ import annotations

import functools
import time

from broker.approvals import grants, requests
from broker.audit import checkpoints
from broker.credentials import assertions, rotating, watch
from broker.gateway import batch_poll, conversations
from broker.money import rollups
from broker.money.sweeper import sweep_once
from broker.monitoring import webhooks
from broker.revocation import log as revocation_log
from broker.revocation import rotation
from broker.services import Services
from broker.storage import console_models
from broker.storage.scheduler import Job

# How often retired signing keys and stale revocation-log rows are looked for.
RETIRE_INTERVAL_S = 60.0
PRUNE_INTERVAL_S = 3600.0
PROVIDER_REVOKE_INTERVAL_S = 30.0
LIMITS_PRUNE_INTERVAL_S = 60.0
# Delivered webhook rows are kept this long (for an operator looking into a delivery).
OUTBOX_RETENTION_S = 7 * 86_400
# OpenAI keeps a stored response 30 days; a continuation of an older one is refused as unbounded.
CONTEXT_RETENTION_S = 30 * 86_400


def scheduled_jobs(svc: Services) -> list[Job]:
    settings = svc.settings
    jobs = [
        Job("sweep", settings.sweeper.interval_s,
            functools.partial(sweep_once, svc.db, settings.sweeper, svc.metrics)),
        Job("signing_key.retire", RETIRE_INTERVAL_S,
            functools.partial(rotation.retire_signing_keys, svc)),
        Job("grants.end", settings.sweeper.interval_s, functools.partial(end_grants, svc)),
        Job("alerts.prune_outbox", PRUNE_INTERVAL_S, lambda: svc.db.transaction(
            lambda conn: webhooks.prune_delivered(conn, int(time.time()) - OUTBOX_RETENTION_S))),
        Job("revocation.prune_log", PRUNE_INTERVAL_S,
            lambda: svc.db.transaction(lambda conn: revocation_log.prune_log(conn, int(time.time())))),
        Job("responses.prune_contexts", PRUNE_INTERVAL_S, lambda: svc.db.transaction(
            lambda conn: conversations.prune(conn, int(time.time()) - CONTEXT_RETENTION_S))),
        # Settles finished batch jobs from their provider's output (exactly once).
        Job("batches.poll", settings.batches.poll_interval_s,
            functools.partial(batch_poll.poll_once, svc)),
        # Folds settled usage events into the hourly and daily rollups (exactly once), and
        # deletes raw events past their retention once rolled up.
        Job("usage.rollup", settings.usage.rollup_interval_s,
            functools.partial(rollups.rollup_pending, svc.db)),
        Job("usage.prune_raw", PRUNE_INTERVAL_S, lambda: rollups.prune_expired(
            svc.db, settings.usage.raw_retention_days)),
    ]
    if settings.limits.backend == "database":
        from broker.money import limits_db

        # Ended leases of replicas that died, and the rows of keys nobody uses any more.
        jobs.append(Job("limits.prune", LIMITS_PRUNE_INTERVAL_S,
                        functools.partial(limits_db.prune_once, svc.db)))
    providers = settings.providers.values()
    if any(p.credential == "rotating" for p in providers):
        # Deletes replaced keys after their grace, and finishes interrupted rotations.
        jobs.append(Job("provider_key.tidy", PROVIDER_REVOKE_INTERVAL_S,
                        functools.partial(rotating.tidy, svc)))
        if settings.rotation.provider_interval_s:
            jobs.append(Job("provider_key.rotate", float(settings.rotation.provider_interval_s),
                            functools.partial(rotating.rotate_all, svc)))
    if any(p.admin_vault_path or p.credential == "federated" for p in providers):
        # Watched keys' status and expiry, federated exchanges, and project spend limits.
        jobs.append(Job("provider_key.watch", float(settings.rotation.provider_watch_interval_s),
                        functools.partial(watch.watch_all, svc)))
    if svc.provider_tokens is not None:
        # The federation assertion key rotates on its own schedule; retired keys go after
        # their assertions' life.
        if settings.rotation.assertion_interval_s:
            jobs.append(Job("assertion_key.rotate", float(settings.rotation.assertion_interval_s),
                            functools.partial(assertions.rotate_assertion_key, svc)))
        jobs.append(Job("assertion_key.retire", RETIRE_INTERVAL_S,
                        functools.partial(assertions.retire_assertion_keys, svc)))
    if settings.rotation.signing_interval_s:
        jobs.append(Job(
            "signing_key.rotate", float(settings.rotation.signing_interval_s),
            functools.partial(rotation.rotate_signing_key, svc, "scheduler", "scheduled"),
        ))
    if settings.console.enabled:
        # Sessions that ended (expired or idle) are deleted, not only found dead at their use.
        jobs.append(Job("console.prune_sessions", PRUNE_INTERVAL_S, lambda: svc.db.transaction(
            lambda conn: console_models.prune_sessions(conn, int(time.time()),
                                                       settings.console.idle_timeout_s))))
    # Signs the head of the audit chain when it moved (and copies it out of the database).
    jobs.append(Job("audit.checkpoint", float(settings.audit.checkpoint_interval_s),
                    functools.partial(checkpoints.checkpoint_once, svc.db, svc.audit_keys,
                                      settings.audit, metrics=svc.metrics)))
    return jobs


def end_grants(svc: Services) -> None:
    """Record the end of expired and revoked grants (their unspent budget back), and expire
    the approval requests nobody answered."""
    now = int(time.time())
    svc.db.transaction(lambda conn: grants.end_finished(conn, now))
    svc.db.transaction(lambda conn: requests.expire_pending(conn, now))
