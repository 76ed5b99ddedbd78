"""The crash-safe session journal: one file per session, whole-file atomic writes."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from devmig_agent import atomicfile, journal
from devmig_agent.journal import Journal, JournalError, SessionRecord


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000_000_000_000  # Unix nanoseconds, 2027

    def __call__(self) -> int:
        self.now += 1_000_000  # every reading is 1 ms later
        return self.now


def source(session_id: str = "dm-4f2a-0", **kw: Any) -> SessionRecord:
    base: dict[str, Any] = {
        "session_id": session_id,
        "role": "SOURCE",
        "device_id": "0000:3b:00.1",
        "phase": "PREPARED",
        "device_state": "RUNNING",
        "token_sha256": journal.token_sha256("s3cret-token"),
    }
    base.update(kw)
    return SessionRecord(**base)


@pytest.fixture
def jdir(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "sessions"


@pytest.fixture
def j(jdir: pathlib.Path) -> Journal:
    jr = Journal(jdir, clock=FakeClock())
    jr.load()
    return jr


def test_a_written_session_is_loaded_back_by_a_restarted_agent(
    j: Journal, jdir: pathlib.Path
) -> None:
    j.put(source())
    j.update("dm-4f2a-0", phase="PRE_COPY", device_state="PRE_COPY", data_endpoint="10.0.0.7:7443")
    again = Journal(jdir).load()
    rec = again["dm-4f2a-0"]
    assert rec == j.get("dm-4f2a-0")
    assert (rec.phase, rec.device_state, rec.data_endpoint) == (
        "PRE_COPY",
        "PRE_COPY",
        "10.0.0.7:7443",
    )
    assert rec.version == 2


def test_every_write_bumps_the_version_and_keeps_the_creation_time(j: Journal) -> None:
    first = j.put(source())
    second = j.update("dm-4f2a-0", phase="PRE_COPY")
    third = j.put(source(phase="STOP_COPY", device_state="STOP_COPY"))
    assert [first.version, second.version, third.version] == [1, 2, 3]
    assert (
        first.created_at_unix_nanos == second.created_at_unix_nanos == third.created_at_unix_nanos
    )
    assert first.updated_at_unix_nanos < second.updated_at_unix_nanos < third.updated_at_unix_nanos


def test_a_write_against_a_version_it_has_not_seen_is_refused(j: Journal) -> None:
    j.put(source(), expected_version=0)
    with pytest.raises(JournalError) as e:
        j.update("dm-4f2a-0", phase="PRE_COPY", expected_version=0)
    assert e.value.reason == "VersionConflict"
    assert j.update("dm-4f2a-0", phase="PRE_COPY", expected_version=1).version == 2


def test_a_session_cannot_change_its_role_or_device(j: Journal) -> None:
    j.put(source())
    with pytest.raises(JournalError) as e:
        j.put(source(role="TARGET"))
    assert e.value.reason == "SessionMismatch"
    with pytest.raises(JournalError):
        j.put(source(device_id="0000:3b:00.2"))


@pytest.mark.parametrize(
    "bad",
    [{"role": "PEER"}, {"phase": "RUNNING"}, {"device_state": "PAUSED"}, {"device_id": ""}],
)
def test_a_record_with_unknown_names_is_refused_before_anything_is_written(
    j: Journal, jdir: pathlib.Path, bad: dict[str, str]
) -> None:
    with pytest.raises(JournalError) as e:
        j.put(source(**bad))
    assert e.value.reason == "BadSessionRecord"
    assert list(jdir.iterdir()) == []


def test_a_torn_write_leaves_a_temp_file_that_is_ignored_and_the_previous_record_wins(
    j: Journal, jdir: pathlib.Path
) -> None:
    j.put(source())
    good = (jdir / "dm-4f2a-0.json").read_bytes()
    # What a crash in the middle of writing version 2 leaves: half a temp file.
    torn = json.dumps({**json.loads(good), "version": 2, "phase": "PRE_COPY"}).encode()
    (jdir / f"{atomicfile.TEMP_PREFIX}dm-4f2a-0.json.k2j4x").write_bytes(torn[: len(torn) // 2])
    restarted = Journal(jdir)
    recs = restarted.load()
    assert recs["dm-4f2a-0"].version == 1
    assert recs["dm-4f2a-0"].phase == "PREPARED"
    assert sorted(p.name for p in jdir.iterdir()) == ["dm-4f2a-0.json"]
    assert restarted.corrupt == []


def test_a_write_that_fails_before_its_rename_changes_nothing(
    j: Journal, jdir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j.put(source())

    def no_rename(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", no_rename)
    with pytest.raises(OSError):
        j.update("dm-4f2a-0", phase="PRE_COPY")
    monkeypatch.undo()
    assert j.get("dm-4f2a-0").phase == "PREPARED"  # type: ignore[union-attr]
    assert Journal(jdir).load()["dm-4f2a-0"].version == 1
    assert sorted(p.name for p in jdir.iterdir()) == ["dm-4f2a-0.json"]


def test_a_write_is_fsynced_then_renamed_then_its_directory_fsynced(
    j: Journal, jdir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        events.append("fsync dir" if os.path.isdir(target) else "fsync file")
        real_fsync(fd)

    def rename(src: str, dst: str) -> None:
        events.append("rename")
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    j.put(source())
    assert events == ["fsync file", "rename", "fsync dir"]


def test_a_damaged_session_file_is_moved_aside_and_the_others_load(
    j: Journal, jdir: pathlib.Path
) -> None:
    j.put(source("a"))
    j.put(source("b", device_id="0000:3b:00.2"))
    (jdir / "b.json").write_bytes(b'{"format": 1, "sessionId": "b", "ro')
    restarted = Journal(jdir)
    assert list(restarted.load()) == ["a"]
    assert restarted.corrupt == [jdir / "b.json.corrupt"]
    assert (jdir / "b.json.corrupt").exists()


def test_the_token_is_kept_only_as_its_hash(j: Journal, jdir: pathlib.Path) -> None:
    j.put(source())
    text = (jdir / "dm-4f2a-0.json").read_text()
    assert "s3cret-token" not in text
    assert journal.token_sha256("s3cret-token") in text
    assert oct((jdir / "dm-4f2a-0.json").stat().st_mode & 0o777) == "0o600"


def test_session_ids_that_are_not_plain_file_names_are_hashed(
    j: Journal, jdir: pathlib.Path
) -> None:
    weird = "ns/dm-1/../../etc"
    j.put(source(weird))
    (name,) = [p.name for p in jdir.iterdir()]
    assert name.startswith("sha256-") and "/" not in name
    assert Journal(jdir).load()[weird].session_id == weird


def test_open_sessions_of_a_device_exclude_finished_ones(j: Journal) -> None:
    j.put(source("old"))
    j.update("old", phase="ABORTED")
    j.put(source("new"))
    assert [r.session_id for r in j.by_device("0000:3b:00.1")] == ["new"]
    assert len(j.by_device("0000:3b:00.1", include_final=True)) == 2


def test_removing_a_session_is_durable_and_idempotent(j: Journal, jdir: pathlib.Path) -> None:
    j.put(source())
    assert j.remove("dm-4f2a-0") is True
    assert j.remove("dm-4f2a-0") is False
    assert Journal(jdir).load() == {}


def test_a_writer_killed_at_any_moment_leaves_the_last_acknowledged_record_or_the_next(
    jdir: pathlib.Path,
) -> None:
    # The child writes versions as fast as it can and reports each one only
    # after put() returned; it is SIGKILLed at an arbitrary point.
    child = textwrap.dedent(
        f"""
        import sys
        from devmig_agent.journal import Journal, SessionRecord
        j = Journal({str(jdir)!r})
        j.load()
        r = SessionRecord("s", "TARGET", "0000:af:00.0", "PREPARED", "RESUMING")
        for i in range(100000):
            w = j.put(r, expected_version=i)
            print(w.version, flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    acknowledged = 0
    for _ in range(200):
        acknowledged = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    rest = proc.stdout.read().split()
    if rest:
        acknowledged = int(rest[-1])
    rec = Journal(jdir).load()["s"]
    assert acknowledged <= rec.version <= acknowledged + 1
    assert [p.name for p in jdir.iterdir()] == ["s.json"]
