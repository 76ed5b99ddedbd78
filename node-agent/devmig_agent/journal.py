"""The agent's on-disk session journal: a restart never loses track of a device.

One JSON file per session in one directory (a hostPath, so it outlives the
agent's container; default ``/var/lib/devmig/sessions``). Every write
replaces the whole file through ``atomicfile.write_atomic`` (temporary file,
fsync, rename, fsync of the directory), so after a crash each session's file
holds either its previous record or its new one, never a mix. A write cut
off before its rename leaves a ``.tmp-*`` file behind: loading ignores and
removes it, and the previous record stands.

Each record carries a version that grows by one with every write of that
session, so a reader can tell which of two records is newer and a writer can
refuse to overwrite a record it has not seen (``expected_version``).

File format (``<session file name>.json``, UTF-8)::

    {"format": 1, "sessionId": "dm-4f2a-0", "role": "SOURCE",
     "deviceId": "0000:3b:00.1", "phase": "PRE_COPY", "deviceState": "PRE_COPY",
     "dataEndpoint": "10.0.0.7:7443", "tokenSha256": "9f86...",
     "message": "", "reason": "", "version": 4,
     "createdAtUnixNanos": 1795..., "updatedAtUnixNanos": 1795...,
     "extra": {}}

``role``, ``phase`` and ``deviceState`` use the names of the agent API's
enums without their prefixes (``SessionRole``, ``SessionPhase``,
``VfioDeviceState``). The session token itself is never written: only its
SHA-256, enough to check a repeated request after a restart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from devmig_agent import atomicfile

log = logging.getLogger(__name__)

DEFAULT_DIR = "/var/lib/devmig/sessions"
FORMAT = 1
SUFFIX = ".json"
CORRUPT_SUFFIX = ".corrupt"

ROLES = ("SOURCE", "TARGET")
PHASES = ("PREPARED", "PRE_COPY", "STOP_COPY", "TRANSFERRED", "SUCCEEDED", "ABORTED", "FAILED")
FINAL_PHASES = ("SUCCEEDED", "ABORTED", "FAILED")
DEVICE_STATES = (
    "UNSPECIFIED",
    "ERROR",
    "STOP",
    "RUNNING",
    "STOP_COPY",
    "RESUMING",
    "RUNNING_P2P",
    "PRE_COPY",
    "PRE_COPY_P2P",
)
# Session ids become file names when they are short and plain; others are
# hashed. 200 bytes stays well under the 255-byte name limit of Linux file
# systems with room for the suffix.
_PLAIN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")


class JournalError(Exception):
    """A refused journal operation; ``reason`` is CamelCase."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class SessionRecord:
    session_id: str
    role: str
    device_id: str
    phase: str
    device_state: str = "UNSPECIFIED"
    data_endpoint: str = ""
    token_sha256: str = ""
    message: str = ""
    reason: str = ""
    version: int = 0
    created_at_unix_nanos: int = 0
    updated_at_unix_nanos: int = 0
    # Role-specific facts the session machinery wants back after a restart.
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.phase in FINAL_PHASES

    def validate(self) -> None:
        if not self.session_id:
            raise JournalError("BadSessionRecord", "session id is empty")
        if self.role not in ROLES:
            raise JournalError("BadSessionRecord", f"role {self.role!r} is not one of {ROLES}")
        if self.phase not in PHASES:
            raise JournalError("BadSessionRecord", f"phase {self.phase!r} is not one of {PHASES}")
        if self.device_state not in DEVICE_STATES:
            raise JournalError("BadSessionRecord", f"device state {self.device_state!r} unknown")
        if not self.device_id:
            raise JournalError("BadSessionRecord", "device id is empty")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "sessionId": self.session_id,
            "role": self.role,
            "deviceId": self.device_id,
            "phase": self.phase,
            "deviceState": self.device_state,
            "dataEndpoint": self.data_endpoint,
            "tokenSha256": self.token_sha256,
            "message": self.message,
            "reason": self.reason,
            "version": self.version,
            "createdAtUnixNanos": self.created_at_unix_nanos,
            "updatedAtUnixNanos": self.updated_at_unix_nanos,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SessionRecord:
        if d.get("format") != FORMAT:
            raise JournalError("UnknownJournalFormat", f"format {d.get('format')!r}")
        try:
            rec = cls(
                session_id=str(d["sessionId"]),
                role=str(d["role"]),
                device_id=str(d["deviceId"]),
                phase=str(d["phase"]),
                device_state=str(d.get("deviceState", "UNSPECIFIED")),
                data_endpoint=str(d.get("dataEndpoint", "")),
                token_sha256=str(d.get("tokenSha256", "")),
                message=str(d.get("message", "")),
                reason=str(d.get("reason", "")),
                version=int(d["version"]),
                created_at_unix_nanos=int(d.get("createdAtUnixNanos", 0)),
                updated_at_unix_nanos=int(d.get("updatedAtUnixNanos", 0)),
                extra=dict(d.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise JournalError("BadSessionRecord", f"{type(e).__name__}: {e}") from None
        rec.validate()
        return rec


def file_name(session_id: str) -> str:
    if _PLAIN_ID.match(session_id):
        return session_id + SUFFIX
    return "sha256-" + hashlib.sha256(session_id.encode()).hexdigest() + SUFFIX


class Journal:
    """Every session this node's agent runs, on disk and in memory.

    ``load`` reads the directory (call it once at start); ``put`` and
    ``update`` write through to disk before they return, so what a caller
    saw written survives a crash. Thread-safe.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] = DEFAULT_DIR,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.directory = pathlib.Path(directory)
        self._clock = clock
        # Re-entrant: update reads and writes under one hold.
        self._lock = threading.RLock()
        self._records: dict[str, SessionRecord] = {}
        # Files that could not be read at load, moved aside as *.corrupt.
        self.corrupt: list[pathlib.Path] = []

    def load(self) -> dict[str, SessionRecord]:
        """Read every session file; remove leftovers of cut-off writes."""
        # Owner-only: the journal names devices and sessions.
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        records: dict[str, SessionRecord] = {}
        for p in sorted(self.directory.iterdir()):
            if p.name.startswith(atomicfile.TEMP_PREFIX):
                log.warning("removing %s, left by a write cut off before its rename", p)
                p.unlink(missing_ok=True)
                continue
            if not p.name.endswith(SUFFIX):
                continue
            try:
                rec = SessionRecord.from_json(json.loads(p.read_bytes()))
            except (ValueError, UnicodeDecodeError, JournalError) as e:
                # Whole-file renames never leave a torn record, so this is
                # damage from outside: keep the bytes for a human, out of the way.
                aside = p.with_name(p.name + CORRUPT_SUFFIX)
                log.error("session file %s is unreadable (%s); moved to %s", p, e, aside)
                os.replace(p, aside)
                self.corrupt.append(aside)
                continue
            records[rec.session_id] = rec
        atomicfile.fsync_dir(self.directory)
        with self._lock:
            self._records = records
            return dict(records)

    def get(self, session_id: str) -> SessionRecord | None:
        with self._lock:
            return self._records.get(session_id)

    def all(self) -> list[SessionRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.session_id)

    def by_device(self, device_id: str, *, include_final: bool = False) -> list[SessionRecord]:
        """Sessions on one device, oldest first; by default only those still open."""
        with self._lock:
            recs = [
                r
                for r in self._records.values()
                if r.device_id == device_id and (include_final or not r.final)
            ]
        return sorted(recs, key=lambda r: r.created_at_unix_nanos)

    def put(self, record: SessionRecord, *, expected_version: int | None = None) -> SessionRecord:
        """Write ``record`` as the session's next version and return what was written.

        ``expected_version``: refuse (``VersionConflict``) unless the stored
        record has that version (0 for "no record yet").
        """
        record.validate()
        with self._lock:
            old = self._records.get(record.session_id)
            current = old.version if old else 0
            if expected_version is not None and expected_version != current:
                raise JournalError(
                    "VersionConflict",
                    f"session {record.session_id} is at version {current}, not {expected_version}",
                )
            if old is not None and (old.role, old.device_id) != (record.role, record.device_id):
                raise JournalError(
                    "SessionMismatch",
                    f"session {record.session_id} is {old.role} of {old.device_id}",
                )
            now = self._clock()
            new = dataclasses.replace(
                record,
                version=current + 1,
                created_at_unix_nanos=old.created_at_unix_nanos if old else now,
                updated_at_unix_nanos=now,
            )
            data = json.dumps(new.to_json(), indent=1, sort_keys=True).encode() + b"\n"
            atomicfile.write_atomic(self.directory / file_name(new.session_id), data)
            self._records[new.session_id] = new
            return new

    def update(
        self, session_id: str, *, expected_version: int | None = None, **changes: Any
    ) -> SessionRecord:
        """Write a session's next version with some fields changed."""
        for k in ("session_id", "version", "created_at_unix_nanos", "updated_at_unix_nanos"):
            if k in changes:
                raise JournalError("BadSessionRecord", f"{k} is not the caller's to change")
        with self._lock:
            old = self._records.get(session_id)
            if old is None:
                raise JournalError("UnknownSession", f"no session {session_id}")
            return self.put(dataclasses.replace(old, **changes), expected_version=expected_version)

    def remove(self, session_id: str) -> bool:
        """Forget a session (after it ended and the operator saw it). Idempotent."""
        with self._lock:
            rec = self._records.pop(session_id, None)
            path = self.directory / file_name(session_id)
            existed = path.exists()
            path.unlink(missing_ok=True)
            atomicfile.fsync_dir(self.directory)
            return rec is not None or existed
