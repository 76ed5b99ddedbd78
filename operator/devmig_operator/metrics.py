"""Prometheus metrics of the operator, served on ``--metrics-port``.

Names are the ones the chart's alert rules use (charts/devmig PrometheusRule).
"""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram

from devmig_operator.conditions import Phase

MIGRATIONS = Counter(
    "devmig_migrations_total",
    "DeviceMigrations that reached a final phase, by result.",
    ["result"],
)
DOWNTIME = Histogram(
    "devmig_migration_downtime_seconds",
    "Measured device downtime of succeeded migrations (source leaves RUNNING to target RUNNING).",
    # From 10 ms (a small device's stop-copy) to 30 s (a forced stop-copy of
    # a large GPU state): the range the downtime limit is set in.
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
)
PHASE = Gauge(
    "devmig_migration_phase",
    "1 for the phase each unfinished DeviceMigration is in.",
    ["namespace", "name", "phase"],
)


def record_phase(namespace: str, name: str, phase: Phase, downtime_us: int | None = None) -> None:
    """Reflect a phase transition. Final phases count once and drop the
    migration's phase series, so finished migrations leave no series."""
    for p in Phase:
        if p is not phase:
            with contextlib.suppress(KeyError):
                PHASE.remove(namespace, name, p.value)
    if phase.final:
        MIGRATIONS.labels(result=phase.value).inc()
        if phase is Phase.SUCCEEDED and downtime_us is not None:
            DOWNTIME.observe(downtime_us / 1e6)
    else:
        PHASE.labels(namespace, name, phase.value).set(1)
