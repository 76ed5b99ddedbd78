"""The agent's Prometheus metrics: the names and labels the chart's alert
rules query, live session counts and bytes, phase durations and errors."""

from __future__ import annotations

import pathlib
import re
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devmig_agent import datapath, devices, journal, metrics, sessions
from devmig_agent.sessions import Phase, SessionManager

CHART = pathlib.Path(__file__).resolve().parents[2] / "charts" / "devmig"
SID, TOKEN = "dm-m-0", "metrics-token"


def samples(m: metrics.AgentMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for fam in text_string_to_metric_families(m.text().decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(m: metrics.AgentMetrics, name: str, **labels: str) -> float:
    return samples(m).get((name, frozenset({"node": "n", **labels}.items())), 0.0)


@pytest.fixture
def pair(
    tmp_path: pathlib.Path,
) -> Iterator[tuple[SessionManager, SessionManager, metrics.AgentMetrics]]:
    managers: list[SessionManager] = []
    m = metrics.AgentMetrics("n", lambda: managers[0] if managers else None)
    paths = []
    for name in ("a", "b"):
        j = journal.Journal(tmp_path / name)
        j.load()
        holder: list[SessionManager] = []
        dp = datapath.DataPath("127.0.0.1", 0, lambda s, e, h=holder: h[0].on_transfer_done(s, e))
        reg = devices.simulated(name, devices.SimSpec(count=1, size=1 << 20, dirty=16))
        holder.append(SessionManager(reg, j, dp, observer=m if name == "a" else None))
        managers.append(holder[0])
        paths.append(dp)
    yield managers[0], managers[1], m
    for dp in paths:
        dp.shutdown()


def test_the_metrics_the_alert_rules_query_are_exported_with_a_node_label() -> None:
    rules = (CHART / "templates" / "monitoring.yaml").read_text()
    queried = set(re.findall(r"\b(devmig_agent_[a-z_]+)\b", rules))
    assert queried, "the chart queries no agent metric"
    m = metrics.AgentMetrics("n", lambda: None)
    exported = {name for name, _ in samples(m)}
    assert queried <= exported
    for name in queried:
        assert f"max by (node) ({name})" in rules
        assert value(m, name, **({"role": "SOURCE"} if "sessions" in name else {})) is not None


def test_a_migration_shows_in_sessions_bytes_and_phase_durations(
    pair: tuple[SessionManager, SessionManager, metrics.AgentMetrics],
) -> None:
    a, b, m = pair
    assert value(m, "devmig_agent_up") == 1
    a.prepare_source(SID, TOKEN, "sim-a-0", 0)
    assert value(m, "devmig_agent_sessions_active", role="SOURCE") == 1
    endpoint = b.prepare_target(SID, TOKEN, "sim-b-0").data_endpoint
    a.start_pre_copy(SID, TOKEN, endpoint)
    a.stop_and_copy(SID, TOKEN, [])
    for snap in a.watch(SID, TOKEN, 10, lambda: True):
        if snap.phase is Phase.TRANSFERRED:
            break
    assert value(m, "devmig_agent_bytes_sent_total") >= 1 << 20
    a.abort(SID, TOKEN, "done with the test")
    assert value(m, "devmig_agent_sessions_active", role="SOURCE") == 0
    for phase in ("PREPARED", "PRE_COPY", "STOP_COPY", "TRANSFERRED"):
        count = value(m, "devmig_agent_session_phase_seconds_count", role="SOURCE", phase=phase)
        assert count == 1, phase


def test_a_failed_session_counts_as_an_error_by_its_reason(
    pair: tuple[SessionManager, SessionManager, metrics.AgentMetrics],
) -> None:
    a, _, m = pair
    a.prepare_source(SID, TOKEN, "sim-a-0", 0)
    with pytest.raises(sessions.SessionError):
        # Nothing listens there: the pump cannot start.
        a.start_pre_copy(SID, TOKEN, "127.0.0.1:1")
    assert value(m, "devmig_agent_errors_total", reason="TargetUnreachable") == 1


def test_the_metrics_are_served_over_http(
    pair: tuple[SessionManager, SessionManager, metrics.AgentMetrics],
) -> None:
    _, _, m = pair
    port = m.serve(0, "127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            body = r.read().decode()
        assert 'devmig_agent_up{node="n"} 1.0' in body
    finally:
        m.stop()
