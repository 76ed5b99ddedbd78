"""The convergence decision: downtime estimate against the limit, bounds, policy."""

from __future__ import annotations

from devmig_operator.convergence import Decision, decide

POLICY = {"downtimeLimitMs": 300, "maxPreCopyIterations": 30, "preCopyTimeoutSeconds": 300}
MiB = 1024 * 1024


def test_state_that_fits_the_downtime_limit_stops_and_copies() -> None:
    # 100 MiB at 1 GiB/s is about 98 ms, under the 300 ms limit.
    v = decide(100 * MiB, 1024 * MiB, 0, 3, 10, POLICY)
    assert v.decision is Decision.STOP_AND_COPY
    assert v.estimated_downtime_ms is not None and 97 < v.estimated_downtime_ms < 99


def test_state_too_large_for_the_limit_keeps_pre_copying() -> None:
    v = decide(1024 * MiB, 1024 * MiB, 0, 3, 10, POLICY)
    assert v.decision is Decision.CONTINUE
    assert "1000 ms > limit 300 ms" in v.message


def test_nothing_left_to_send_has_converged_whatever_the_rate() -> None:
    assert decide(0, 0, 0, 1, 0, POLICY).decision is Decision.STOP_AND_COPY


def test_before_the_first_round_nothing_is_known_so_pre_copy_continues() -> None:
    # Zero remaining before any round means "not asked yet", not "done".
    v = decide(0, 0, 0, 0, 0, POLICY)
    assert v.decision is Decision.CONTINUE and "first round" in v.message


def test_without_a_measured_rate_pre_copy_continues() -> None:
    v = decide(10 * MiB, 0, 0, 1, 1, POLICY)
    assert v.decision is Decision.CONTINUE and "unknown" in v.message


def test_hitting_the_iteration_bound_aborts_by_default() -> None:
    v = decide(1024 * MiB, 100 * MiB, 0, 30, 10, POLICY)
    assert v.decision is Decision.NOT_CONVERGED
    assert "maxPreCopyIterations 30" in v.message


def test_hitting_the_time_bound_with_force_stops_anyway() -> None:
    v = decide(1024 * MiB, 100 * MiB, 0, 2, 301, {**POLICY, "onNonConvergence": "ForceStopCopy"})
    assert v.decision is Decision.STOP_AND_COPY
    assert "ForceStopCopy" in v.message


def test_a_dirty_rate_above_the_send_rate_is_named_as_the_cause() -> None:
    v = decide(1024 * MiB, 100 * MiB, 200 * MiB, 30, 10, POLICY)
    assert v.decision is Decision.NOT_CONVERGED
    assert "more rounds cannot help" in v.message
