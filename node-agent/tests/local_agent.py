"""An agent's session side built in the test process: a session manager and
the data path it streams through, wired to each other (the data path reports
a transfer's end to the manager, which the manager's own constructor needs
the data path for)."""

from __future__ import annotations

import pathlib
from typing import Any

from devmig_agent import datapath, devices, journal, security, sessions


def wire(
    registry: devices.DeviceRegistry,
    state: pathlib.Path,
    tls: security.TlsFiles | None = None,
    seal: bool = True,
    **manager: Any,
) -> tuple[sessions.SessionManager, datapath.DataPath]:
    """A manager over ``registry`` journaling under ``state`` (created), and
    its data path on loopback (``seal``: offer sealed streams over TLS);
    ``manager`` goes to SessionManager (vmm, ...)."""
    j = journal.Journal(state)
    j.directory.mkdir(parents=True, exist_ok=True)
    j.load()
    holder: list[sessions.SessionManager] = []
    dp = datapath.DataPath(
        "127.0.0.1", 0, lambda s, e: holder[0].on_transfer_done(s, e), tls, seal=seal
    )
    holder.append(sessions.SessionManager(registry, j, dp, **manager))
    return holder[0], dp
