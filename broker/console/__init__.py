"""The admin console: server-rendered pages under ``/console/`` for the people who run the broker.

Signed in with admin client credentials or a pasted admin token, a user sees spend against every
budget, tenants and workloads (live tokens, bindings; suspend, resume, revoke, rotate a secret),
the approvals queue, alerts, the audit trail with the chain's status, and the configured
providers. Every button calls the domain functions the admin API calls, with the user's
:class:`broker.identity.identities.Actor`, so the roles hold as in the API: a tenant-admin sees
its own tenant, an auditor reads everything and can press nothing. See ``docs/console.md``.
"""

from __future__ import annotations

from broker.console.routes import ConsoleMiddleware

__all__ = ["ConsoleMiddleware"]
