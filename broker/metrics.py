"""Prometheus metrics. Labels are route templates and error codes: never ids, keys or tokens."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "broker_http_requests_total", "HTTP requests", ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "broker_http_request_seconds", "HTTP request latency until the response starts",
            ["route"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.tokens_issued = Counter(
            "broker_tokens_issued_total", "Access tokens issued", ["kind"], registry=self.registry
        )
        self.reserved = Counter(
            "broker_budget_reserved_micros_total", "Micro-dollars reserved by issued tokens",
            registry=self.registry,
        )
        self.errors = Counter(
            "broker_errors_total", "Requests refused, by error code", ["code"],
            registry=self.registry,
        )
        self.overruns = Counter(
            "broker_overruns_total",
            "Calls the provider billed above the broker's hold (each one also audited)",
            ["provider"], registry=self.registry,
        )
        self.overrun_micros = Counter(
            "broker_overrun_micros_total", "Micro-dollars charged above the hold",
            ["provider"], registry=self.registry,
        )
        self.released = Counter(
            "broker_budget_released_micros_total", "Unspent micro-dollars returned by the sweeper",
            registry=self.registry,
        )
        self.webhook_deliveries = Counter(
            "broker_alert_webhook_deliveries_total",
            "Alert webhook deliveries, by result (delivered, failed, dropped)",
            ["result"], registry=self.registry,
        )

        # Labels are bounded: a detector and an action, never a workload.
        self.alerts = Counter(
            "broker_alerts_total", "Alerts raised by the monitor, by detector and action",
            ["detector", "action"], registry=self.registry,
        )
        self.monitor_dropped = Counter(
            "broker_monitor_dropped_total",
            "Observations the monitor could not queue (its thread far behind)",
            registry=self.registry,
        )

        # A refused checkpoint means the audit chain no longer verifies: alert on any increase.
        self.audit_checkpoints = Counter(
            "broker_audit_checkpoints_total",
            "Audit checkpoints, by result (signed; refused: the chain did not verify)",
            ["result"], registry=self.registry,
        )
        self.audit_copy_failures = Counter(
            "broker_audit_checkpoint_copy_failures_total",
            "Checkpoint copies out of the database that failed (retried), by sink (file, webhook)",
            ["sink"], registry=self.registry,
        )

        # A federated provider's calls fail once its token expires with every refresh failed:
        # alert on failures that go on for longer than a token lives.
        self.provider_token_exchanges = Counter(
            "broker_provider_token_exchanges_total",
            "Token exchanges of federated providers, by provider and result (ok, failed)",
            ["provider", "result"], registry=self.registry,
        )

        # Provider credentials: labelled by configured provider name (bounded by configuration).
        self.provider_rotations = Counter(
            "broker_provider_rotations_total",
            "Provider key rotations, by provider and result (ok, failed)",
            ["provider", "result"], registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
