"""The status contract: phases, transition records and conditions."""

from __future__ import annotations

from devmig_operator.conditions import (
    ConditionType,
    Phase,
    Reason,
    phase_status,
    set_condition,
)

T0, T1, T2 = "2026-01-01T00:00:00Z", "2026-01-01T00:00:05Z", "2026-01-01T00:00:09Z"


def _cond(status: dict, type_: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_the_transition_time_changes_only_when_the_status_changes() -> None:
    c = set_condition(None, ConditionType.READY, False, Reason.VALIDATING, "m", 1, T0)
    c = set_condition(c, ConditionType.READY, False, Reason.NO_COMPATIBLE_TARGET, "n", 2, T1)
    assert c[0]["lastTransitionTime"] == T0
    assert c[0]["reason"] == "NoCompatibleTarget"
    assert c[0]["observedGeneration"] == 2
    c = set_condition(c, ConditionType.READY, True, Reason.TARGET_CLAIMED, "ok", 2, T2)
    assert c[0]["lastTransitionTime"] == T2
    assert len(c) == 1


def test_entering_a_phase_records_when_and_marks_progressing() -> None:
    s = phase_status({}, Phase.VALIDATING, 1, T0)
    assert s["phase"] == "Validating"
    assert s["phaseTransitions"] == [{"phase": "Validating", "time": T0}]
    assert s["startTime"] == T0
    p = _cond(s, "Progressing")
    assert (p["status"], p["reason"]) == ("True", "Validating")


def test_re_entering_the_same_phase_adds_no_transition() -> None:
    s = phase_status({}, Phase.PRE_COPY, 1, T0)
    again = phase_status(s, Phase.PRE_COPY, 1, T1)
    assert "phaseTransitions" not in again
    assert _cond(again, "Progressing")["lastTransitionTime"] == T0


def test_success_sets_succeeded_and_clears_progressing_and_failed() -> None:
    s = phase_status({}, Phase.RESUMING, 1, T0)
    s = {**s, **phase_status(s, Phase.SUCCEEDED, 1, T1)}
    assert _cond(s, "Succeeded")["status"] == "True"
    assert _cond(s, "Failed")["status"] == "False"
    assert _cond(s, "Progressing")["status"] == "False"
    assert s["completionTime"] == T1
    assert [t["phase"] for t in s["phaseTransitions"]] == ["Resuming", "Succeeded"]


def test_failure_carries_its_reason_into_the_failed_condition() -> None:
    s = phase_status({}, Phase.FAILED, 3, T0, Reason.VMI_NOT_FOUND, "vmi vm-1 not found")
    f = _cond(s, "Failed")
    assert (f["status"], f["reason"], f["message"]) == ("True", "VMINotFound", "vmi vm-1 not found")
    assert _cond(s, "Succeeded")["status"] == "False"
    assert Phase.FAILED.final and not Phase.PRE_COPY.final


def test_every_reason_is_camel_case() -> None:
    import re

    for r in Reason:
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]*", r.value), r
