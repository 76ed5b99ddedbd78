"""Prometheus metrics of the node agent (``devmig_agent_*``).

Every series carries ``node``: the chart's alert rules aggregate
``by (node)`` and the ServiceMonitor does not add it.

- ``devmig_agent_up`` (gauge): 1 while the agent serves.
- ``devmig_agent_sessions_active{role}`` (gauge): sessions not yet in a
  final phase, by ``SOURCE`` / ``TARGET``.
- ``devmig_agent_bytes_sent_total``, ``devmig_agent_bytes_received_total``
  (counters): device-state payload bytes of this process's sessions.
- ``devmig_agent_session_phase_seconds{role,phase}`` (histogram): how long
  sessions stayed in each phase.
- ``devmig_agent_errors_total{reason}`` (counter): failed sessions, VMM
  failures and callers refused by a Unix socket's credential check
  (``PeerNotAllowed``), by CamelCase reason.

``prometheus-client`` is a dependency of the operator and in the shared
image, but not of this package (adding it would change the workspace
lock): without it ``available()`` is False and the agent serves no metrics.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable, Iterator
from typing import Any

from devmig_agent.sessions import Phase, Role, SessionManager

PREFIX = "devmig_agent"
# Phase durations span milliseconds (a PREPARED target handed its stream at
# once) to the pre-copy of a large device over a slow link (tens of
# minutes), so the buckets are roughly logarithmic from 10 ms to 1 h.
PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


def available() -> bool:
    return importlib.util.find_spec("prometheus_client") is not None


class AgentMetrics:
    """The agent's metrics in their own registry; also the session
    manager's ``Observer``. ``manager`` is looked up at every scrape (it
    is created after the metrics, and replaced by tests)."""

    def __init__(self, node: str, manager: Callable[[], SessionManager | None]) -> None:
        import prometheus_client as prom

        self.node = node
        self._manager = manager
        self.registry = prom.CollectorRegistry(auto_describe=True)
        self._phase = prom.Histogram(
            f"{PREFIX}_session_phase_seconds",
            "Seconds sessions spent in each phase.",
            ["node", "role", "phase"],
            buckets=PHASE_BUCKETS,
            registry=self.registry,
        )
        self._errors = prom.Counter(
            f"{PREFIX}_errors",
            "Failed sessions and VMM failures, by reason.",
            ["node", "reason"],
            registry=self.registry,
        )
        self.registry.register(_Live(self))
        self._server: Any = None

    # Observer
    def phase_ended(self, role: Role, phase: Phase, seconds: float) -> None:
        self._phase.labels(self.node, role.value, phase.value).observe(seconds)

    def error(self, reason: str) -> None:
        self._errors.labels(self.node, reason).inc()

    def peer_refused(self, _pid: int, _uid: int) -> None:
        """A Unix socket refused a caller by its credentials."""
        self.error("PeerNotAllowed")

    def text(self) -> bytes:
        import prometheus_client as prom

        return bytes(prom.generate_latest(self.registry))

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics on a thread; returns the port (``port`` 0: any)."""
        import prometheus_client as prom

        server, _ = prom.start_http_server(port, addr=addr, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            threading.Thread(target=self._server.shutdown, daemon=True).start()
            self._server.server_close()
            self._server = None


class _Live:
    """Values read at scrape time from the session manager."""

    def __init__(self, m: AgentMetrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        node = self.m.node
        up = GaugeMetricFamily(f"{PREFIX}_up", "1 while the agent serves.", labels=["node"])
        up.add_metric([node], 1)
        yield up
        active = GaugeMetricFamily(
            f"{PREFIX}_sessions_active",
            "Sessions not yet in a final phase.",
            labels=["node", "role"],
        )
        sent = CounterMetricFamily(
            f"{PREFIX}_bytes_sent", "Device-state bytes sent.", labels=["node"]
        )
        received = CounterMetricFamily(
            f"{PREFIX}_bytes_received", "Device-state bytes received.", labels=["node"]
        )
        manager = self.m._manager()
        counts, s, r = (
            manager.counts() if manager is not None else ({Role.SOURCE: 0, Role.TARGET: 0}, 0, 0)
        )
        for role, n in counts.items():
            active.add_metric([node, role.value], n)
        sent.add_metric([node], s)
        received.add_metric([node], r)
        yield active
        yield sent
        yield received
