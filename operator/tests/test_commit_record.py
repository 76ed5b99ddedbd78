"""The commit point's status: target states and the measured downtime, from
the agents' nanosecond stamps, first source stop to last target start."""

from __future__ import annotations

from devmig.agent.v1alpha1 import agent_pb2 as pb
from devmig_operator.phases.resuming import commit_patch, downtime_us

T0 = 1_700_000_000_000_000_000  # some unix time, ns


def status(stopped: int = 0, running: int = 0) -> pb.SessionStatus:
    return pb.SessionStatus(
        stopped_at_unix_nanos=stopped,
        running_at_unix_nanos=running,
        device_state=pb.VFIO_DEVICE_STATE_RUNNING,
    )


def test_downtime_runs_from_the_first_source_stop_to_the_last_target_start() -> None:
    src = [status(stopped=T0 + 500_000), status(stopped=T0)]
    dst = [status(running=T0 + 1_843_999), status(running=T0 + 1_200_000)]
    assert downtime_us(src, dst) == 1_843
    patch = commit_patch([{"name": "a"}, {"name": "b"}], src, dst)
    assert patch["committed"] is True
    assert patch["downtimeMicroseconds"] == 1_843
    assert patch["downtimeMs"] == 1  # whole milliseconds, rounded down
    assert patch["downtime"] == "1.84ms"
    assert [d["targetState"] for d in patch["devices"]] == ["RUNNING", "RUNNING"]


def test_a_long_downtime_displays_in_whole_milliseconds() -> None:
    patch = commit_patch([{"name": "a"}], [status(stopped=T0)], [status(running=T0 + 182_400_000)])
    assert (patch["downtime"], patch["downtimeMs"]) == ("182ms", 182)


def test_without_both_stamps_no_downtime_is_recorded() -> None:
    assert downtime_us([status()], [status(running=T0)]) is None
    patch = commit_patch([{"name": "a"}], [status()], [status(running=T0)])
    assert "downtimeMicroseconds" not in patch and "downtimeMs" not in patch
