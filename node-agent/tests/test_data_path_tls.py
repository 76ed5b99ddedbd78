"""The device-state data path with mutual TLS, as nodes run it. Sealed:
the agents agree a key inside TLS, shut TLS down and the native pump seals
the stream on the plain socket. Relayed (an agent that cannot seal): the
source agent's pump writes through a relay into the TLS connection, the
target's relay feeds its loader. Either way the stream arrives whole every
time (with a relay, the source reports the stream complete only after it
forwarded the last bytes), the target's device equals the source's, and a
peer holding a certificate from another CA is refused before any data
flows."""

from __future__ import annotations

import logging
import pathlib
import ssl

import local_agent
import pytest

import devmig_native
from devmig_agent import datapath, devices, security, sessions
from devmig_agent.sessions import Phase, SessionManager
from devmig_testbed.pki import CA

SID, TOKEN = "dm-tls-0", "tls-token"


def start(
    name: str, state: pathlib.Path, tls: security.TlsFiles, size: int, seal: bool = True
) -> tuple[devices.DeviceRegistry, SessionManager, datapath.DataPath]:
    reg = devices.simulated(name, devices.SimSpec(count=1, size=size, dirty=16))
    manager, dp = local_agent.wire(reg, state / name, tls, seal=seal)
    return reg, manager, dp


def files(d: pathlib.Path, ca: CA) -> security.TlsFiles:
    ca.write_tls_dir(d, "devmig-agent", ["localhost"])
    return security.TlsFiles.load(str(d))


def _sim(reg: devices.DeviceRegistry) -> devmig_native.SimDevice:
    h = reg.all()[0].handle
    assert isinstance(h, devmig_native.SimDevice)
    return h


needs_aes = pytest.mark.skipif(
    not datapath.can_seal(), reason="sealed streams need AES-NI, which this CPU lacks"
)


@pytest.mark.parametrize(
    ("source_seals", "target_seals", "sealed"),
    [
        pytest.param(True, True, True, marks=needs_aes, id="sealed"),
        pytest.param(False, True, False, id="relay-source-cannot-seal"),
        pytest.param(True, False, False, id="relay-target-cannot-seal"),
    ],
)
@pytest.mark.parametrize("run", range(3))
def test_a_device_migrates_whole_over_mutual_tls(
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
    run: int,
    source_seals: bool,
    target_seals: bool,
    sealed: bool,
) -> None:
    caplog.set_level(logging.INFO, logger="devmig_agent.datapath")
    ca = CA.create()
    size = 24 << 20  # several relay buffers, so the last one is partial
    ra, a, dpa = start("a", tmp_path, files(tmp_path / "ta", ca), size, source_seals)
    rb, b, dpb = start("b", tmp_path, files(tmp_path / "tb", ca), size, target_seals)
    try:
        a.prepare_source(SID, TOKEN, ra.all()[0].id, 0)
        endpoint = b.prepare_target(SID, TOKEN, rb.all()[0].id).data_endpoint
        a.start_pre_copy(SID, TOKEN, endpoint)
        a.stop_and_copy(SID, TOKEN, [])
        for snap in b.watch(SID, TOKEN, 10, lambda: True):
            if snap.phase.final or snap.phase is Phase.TRANSFERRED:
                break
        assert snap.phase is Phase.TRANSFERRED, snap.message
        src = a.wait_until(
            lambda: s if (s := a.get(SID, TOKEN)).phase is Phase.TRANSFERRED else None, 30
        )
        assert src is not None
        assert snap.progress.bytes_received == src.progress.bytes_sent > size
        assert _sim(rb).stats().mem_digest == _sim(ra).stats().mem_digest
        how = "sealed" if sealed else "tls relay"
        assert f"session {SID}: sending to 127.0.0.1:{dpb.port} ({how})" in caplog.messages
        assert any(m.endswith(f"({how})") and "receiving from" in m for m in caplog.messages)
    finally:
        dpa.shutdown()
        dpb.shutdown()


def test_a_peer_with_another_cas_certificate_is_refused(tmp_path: pathlib.Path) -> None:
    ra, a, dpa = start("a", tmp_path, files(tmp_path / "ta", CA.create("other")), 1 << 20)
    rb, b, dpb = start("b", tmp_path, files(tmp_path / "tb", CA.create()), 1 << 20)
    try:
        a.prepare_source(SID, TOKEN, ra.all()[0].id, 0)
        endpoint = b.prepare_target(SID, TOKEN, rb.all()[0].id).data_endpoint
        with pytest.raises(sessions.SessionError) as e:
            a.start_pre_copy(SID, TOKEN, endpoint)
        assert e.value.reason == "TargetUnreachable"
        assert isinstance(e.value.__cause__, ssl.SSLError)
        # Nothing moved: the source runs, the target still waits.
        assert ra.all()[0].handle.state is devmig_native.MigState.RUNNING
        assert b.get(SID, TOKEN).phase is Phase.PREPARED
    finally:
        dpa.shutdown()
        dpb.shutdown()
