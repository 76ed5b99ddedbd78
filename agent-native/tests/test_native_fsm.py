"""The state machine through the Python binding: the simulated device's
paths, final states and refusals against a table written from the uAPI
documentation (vfio-migration.md §1.6), for every defined flag set."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devmig_native import DevmigError, MigFlags, MigState, SimDevice, fsm_path

E, S, R, SC, RS, RP, PC, PP = (
    MigState.ERROR,
    MigState.STOP,
    MigState.RUNNING,
    MigState.STOP_COPY,
    MigState.RESUMING,
    MigState.RUNNING_P2P,
    MigState.PRE_COPY,
    MigState.PRE_COPY_P2P,
)
ALL = MigFlags.STOP_COPY | MigFlags.P2P | MigFlags.PRE_COPY
FLAG_SETS = [
    MigFlags.STOP_COPY,
    MigFlags.STOP_COPY | MigFlags.P2P,
    MigFlags.STOP_COPY | MigFlags.PRE_COPY,
    ALL,
]

# Paths on a device with every feature, written from the uAPI rules: the
# shortest path, never through a saving state (PRE_COPY, PRE_COPY_P2P,
# STOP_COPY) as an intermediate, except PRE_COPY -> PRE_COPY_P2P ->
# STOP_COPY inside the saving group; the fd-opening arc is always the last.
# The states entered after the start, in order.
PATHS_ALL: dict[tuple[MigState, MigState], list[MigState]] = {
    (S, R): [RP, R],
    (S, SC): [SC],
    (S, RS): [RS],
    (S, RP): [RP],
    (S, PC): [RP, R, PC],
    (S, PP): [RP, PP],
    (R, S): [RP, S],
    (R, SC): [RP, S, SC],
    (R, RS): [RP, S, RS],
    (R, RP): [RP],
    (R, PC): [PC],
    (R, PP): [RP, PP],
    (SC, S): [S],
    (SC, R): [S, RP, R],
    (SC, RS): [S, RS],
    (SC, RP): [S, RP],
    (RS, S): [S],
    (RS, R): [S, RP, R],
    (RS, SC): [S, SC],
    (RS, RP): [S, RP],
    (RS, PC): [S, RP, R, PC],
    (RS, PP): [S, RP, PP],
    (RP, S): [S],
    (RP, R): [R],
    (RP, SC): [S, SC],
    (RP, RS): [S, RS],
    (RP, PC): [R, PC],
    (RP, PP): [PP],
    (PC, S): [R, RP, S],
    (PC, R): [R],
    (PC, SC): [PP, SC],
    (PC, RS): [R, RP, S, RS],
    (PC, RP): [R, RP],
    (PC, PP): [PP],
    (PP, S): [RP, S],
    (PP, R): [RP, R],
    (PP, SC): [SC],
    (PP, RS): [RP, S, RS],
    (PP, RP): [RP],
    (PP, PC): [PC],
}
NEEDS = {
    S: MigFlags.STOP_COPY,
    R: MigFlags.STOP_COPY,
    SC: MigFlags.STOP_COPY,
    RS: MigFlags.STOP_COPY,
    RP: MigFlags.STOP_COPY | MigFlags.P2P,
    PC: MigFlags.STOP_COPY | MigFlags.PRE_COPY,
    PP: ALL,
}


def supported(flags: MigFlags, s: int) -> bool:
    return s in NEEDS and (flags & NEEDS[MigState(s)]) == NEEDS[MigState(s)]


def expected_path(flags: MigFlags, a: int, b: int) -> list[MigState] | None:
    """The documented path, or None when the kernel refuses (-EINVAL).
    Without a feature, its states drop out of the full-featured path (the
    kernel skips states the device lacks)."""
    if not supported(flags, a) or not supported(flags, b):
        return None
    if a == b:
        return []
    if (a, b) in ((SC, PC), (SC, PP)):
        return None  # blocked arcs; they hang unfixed kernels
    return [s for s in PATHS_ALL[(MigState(a), MigState(b))] if supported(flags, s)]


def test_the_documented_table_covers_every_pair_of_distinct_states() -> None:
    pairs = {(a, b) for a in NEEDS for b in NEEDS if a != b} - {(SC, PC), (SC, PP)}
    assert set(PATHS_ALL) == pairs


@pytest.mark.parametrize("flags", FLAG_SETS, ids=lambda f: str(int(f)))
def test_the_arc_table_gives_the_documented_path_for_every_pair(flags: MigFlags) -> None:
    for a in range(9):
        for b in range(9):
            want = expected_path(flags, a, b)
            if want is None:
                with pytest.raises(DevmigError) as ei:
                    fsm_path(flags, a, b)
                assert ei.value.errno == errno.EINVAL
            else:
                assert fsm_path(flags, a, b) == want, (MigState(a).name, b)


_IMAGES: dict[int, bytes] = {}


def valid_image(mem_size: int) -> bytes:
    """A STOP_COPY image from a twin device, so RESUMING can be left."""
    if mem_size not in _IMAGES:
        with SimDevice(mem_size=mem_size, seed=99) as twin:
            twin.set_log(lambda line: None)
            twin.set_state(SC, R)
            chunks = []
            while chunk := twin.read(1 << 20):
                chunks.append(chunk)
            _IMAGES[mem_size] = b"".join(chunks)
    return _IMAGES[mem_size]


def enter(dev: SimDevice, state: MigState) -> None:
    dev.set_state(state, R)
    if state == RS:
        dev.write(valid_image(8192))
    assert dev.get_state() == state


@settings(max_examples=400, deadline=None)
@given(
    flags=st.sampled_from(FLAG_SETS),
    start=st.sampled_from([S, R, SC, RS, RP, PC, PP]),
    target=st.integers(min_value=0, max_value=8),
)
def test_the_simulated_device_walks_the_documented_path_and_ends_in_the_target(
    flags: MigFlags, start: MigState, target: int
) -> None:
    if not supported(flags, start):
        return
    with SimDevice(flags=flags, mem_size=8192) as dev:
        log: list[str] = []
        dev.set_log(log.append)
        enter(dev, start)
        before = dev.stats().set_state_calls
        want = expected_path(flags, start, target)
        if want is None:
            with pytest.raises(DevmigError) as ei:
                dev.set_state(target, R)  # type: ignore[arg-type]
            assert ei.value.errno == errno.EINVAL
            assert ei.value.from_state == start.name
            # Refused before any request reached the device; nothing moved.
            assert dev.stats().set_state_calls == before
            assert dev.get_state() == start
            assert "refused" in log[-1]
            return
        fd = dev.set_state(MigState(target), R)
        assert dev.get_state() == target == dev.state
        if want:
            assert dev.stats().last_path == want
            assert dev.stats().set_state_calls == before + 1
            assert log[-1].startswith(f"{start.name} -> {MigState(target).name}")
        else:
            assert dev.stats().set_state_calls == before
        # A data fd exactly in the states that have a session.
        assert (fd >= 0) == (target in (SC, PC, PP, RS))


@pytest.mark.parametrize("target", [PC, PP])
def test_stop_copy_to_pre_copy_is_refused_before_any_ioctl(target: MigState) -> None:
    with SimDevice() as dev:
        dev.set_log(lambda line: None)
        dev.set_state(SC, R)
        calls = dev.stats().set_state_calls
        with pytest.raises(DevmigError) as ei:
            dev.set_state(target, R)
        assert ei.value.errno == errno.EINVAL
        assert (ei.value.from_state, ei.value.to_state) == ("STOP_COPY", target.name)
        assert dev.stats().set_state_calls == calls
        assert dev.get_state() == SC


def test_a_failed_arc_is_recovered_to_the_requested_state_and_keeps_its_errno() -> None:
    with SimDevice() as dev:
        log: list[str] = []
        dev.set_log(log.append)
        dev.fail_arc(RP, S, errno.EIO)
        with pytest.raises(DevmigError) as ei:
            dev.set_state(SC, R)
        assert ei.value.errno == errno.EIO
        assert dev.get_state() == R
        assert "RUNNING_P2P -> RUNNING (recovery)" in log
        assert dev.stats().reset_calls == 0


def test_a_failure_into_error_ends_in_a_reset_and_running() -> None:
    with SimDevice() as dev:
        dev.set_log(lambda line: None)
        dev.fail_arc(S, SC, errno.ENODEV, end_in_error=True)
        with pytest.raises(DevmigError) as ei:
            dev.set_state(SC, S)
        assert ei.value.errno == errno.ENODEV
        assert dev.get_state() == R
        assert dev.stats().reset_calls == 1
        assert dev.data_fd == -1


def test_a_failed_recovery_resets_the_device() -> None:
    with SimDevice() as dev:
        dev.set_log(lambda line: None)
        dev.set_state(PC, R)
        dev.fail_arc(PP, SC, errno.EIO)
        with pytest.raises(DevmigError):
            dev.set_state(SC, SC)  # recovery takes the same broken arc
        assert dev.get_state() == R
        assert dev.stats().reset_calls == 1


_STATES = [S, R, SC, RS, RP, PC, PP]
_ARCS = [(a, b[0]) for (a, _), b in PATHS_ALL.items() if len(b) == 1]


@settings(max_examples=200, deadline=None)
@given(
    flags=st.sampled_from(FLAG_SETS),
    steps=st.lists(
        st.tuples(
            st.sampled_from([*_STATES, E]),
            st.sampled_from([*_STATES, E]),
            st.one_of(st.none(), st.tuples(st.sampled_from(_ARCS), st.booleans())),
        ),
        min_size=1,
        max_size=12,
    ),
)
def test_after_any_sequence_of_requests_and_faults_devmig_knows_where_the_device_is(
    flags: MigFlags,
    steps: list[tuple[MigState, MigState, tuple[tuple[MigState, MigState], bool] | None]],
) -> None:
    with SimDevice(flags=flags, mem_size=8192) as dev:
        dev.set_log(lambda line: None)
        for to, recover_to, fault in steps:
            dev.clear_faults()
            if fault is not None:
                (a, b), to_error = fault
                dev.fail_arc(a, b, errno.EIO, to_error)
            before = dev.state
            calls = dev.stats().set_state_calls
            try:
                dev.set_state(to, recover_to)
            except DevmigError as e:
                assert e.errno in (errno.EINVAL, errno.EIO)
                if expected_path(flags, before, to) is None:
                    assert dev.stats().set_state_calls == calls  # refused up front
                    assert dev.state == before
            else:
                assert dev.state == to
            # The recorded state is the device's, never ERROR (devmig
            # resets out of it), and a data fd is open exactly in the
            # states that have a session.
            assert dev.state == dev.get_state() != E
            assert (dev.data_fd >= 0) == (dev.state in (SC, PC, PP, RS))
