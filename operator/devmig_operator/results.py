"""What a reconcile step returns: done, wait, or failed.

Steps are plain functions ``step(ctx) -> Result``. They never sleep and
never raise for expected outcomes; the driver turns Wait into kopf's
``TemporaryError(delay=...)`` and Failed into a rollback.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from devmig_operator.conditions import Phase, Reason


@dataclasses.dataclass(frozen=True)
class Done:
    """The step produced its state; move to ``next_phase`` with ``status``
    merged into the DeviceMigration status."""

    next_phase: Phase
    status: dict[str, Any] = dataclasses.field(default_factory=dict)
    message: str = ""


@dataclasses.dataclass(frozen=True)
class Wait:
    """Not yet: run the same step again after ``delay`` seconds."""

    delay: float
    reason: Reason
    message: str
    status: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Failed:
    """The migration cannot go on: roll back and end in Failed."""

    reason: Reason
    message: str


Result = Done | Wait | Failed
