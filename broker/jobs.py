"""The background jobs of a broker: sweeping, retiring signing keys, pruning the revocation log,
and scheduled rotation. :class:`broker.storage.scheduler.Scheduler` runs each once across every
replica."""

from __future__ import annotations

import functools
import time

from broker.money.sweeper import sweep_once
from broker.revocation import log as revocation_log
from broker.revocation import rotation
from broker.services import Services
from broker.storage.scheduler import Job

# How often retired signing keys and stale revocation-log rows are looked for.
RETIRE_INTERVAL_S = 60.0
PRUNE_INTERVAL_S = 3600.0
PROVIDER_REVOKE_INTERVAL_S = 30.0


def scheduled_jobs(svc: Services) -> list[Job]:
    settings = svc.settings
    jobs = [
        Job("sweep", settings.sweeper.interval_s,
            functools.partial(sweep_once, svc.db, settings.sweeper, svc.metrics)),
        Job("signing_key.retire", RETIRE_INTERVAL_S,
            functools.partial(rotation.retire_signing_keys, svc)),
        Job("revocation.prune_log", PRUNE_INTERVAL_S,
            lambda: svc.db.transaction(lambda conn: revocation_log.prune_log(conn, int(time.time())))),
    ]
    if any(p.vault_path for p in settings.providers.values()):
        jobs.append(Job("provider_key.revoke_retired", PROVIDER_REVOKE_INTERVAL_S,
                        functools.partial(rotation.revoke_retired_provider_keys, svc)))
    if settings.rotation.provider_interval_s:
        jobs.append(Job("provider_key.rotate", float(settings.rotation.provider_interval_s),
                        functools.partial(rotation.rotate_all_provider_keys, svc)))
    if settings.rotation.signing_interval_s:
        jobs.append(Job(
            "signing_key.rotate", float(settings.rotation.signing_interval_s),
            functools.partial(rotation.rotate_signing_key, svc, "scheduler", "scheduled"),
        ))
    return jobs
