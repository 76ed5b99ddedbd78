"""devmig native core: the VFIO migration uAPI v2, driven from C.

This module is the only door to the compiled library (``_native``); the rest
of devmig imports names from here, never from ``_native`` directly.
"""

from __future__ import annotations

import enum

from devmig_native import _native  # type: ignore[attr-defined]

__all__ = ["MigState", "version"]


class MigState(enum.IntEnum):
    """VFIO migration states, kernel values and kernel names."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


def version() -> str:
    """Version string of the compiled core."""
    return str(_native.version())


# The enum above must agree with the C table; checked at import so a drift
# can never ship.
for _s in MigState:
    if _native.state_name(int(_s)) != _s.name:  # pragma: no cover - drift guard
        raise ImportError(f"devmig_native: state {_s.value} is {_native.state_name(int(_s))} in C")
