"""Two QEMU guests as two Kubernetes nodes, for the fully real two-node test
(see docs/testing.md for the picture).

Each guest runs the kernel tests/kernel/build-kernel.sh builds (Debian's
6.12 source, VFIO, iommufd, the mtty sample, virtio, erofs; all built in)
on the shared read-only root filesystem tests/twonode/rootfs.sh builds,
plus a per-guest config disk (an erofs image written here: node.env, TLS
files, kubeconfig). Networking, every address inside this machine:

- the inter-node link: ``-netdev socket``, guest A listening on a host
  loopback port and B connecting to it; guest addresses 10.77.0.1/.2 exist
  only on that emulated wire; device state flows over it agent to agent;
- one user-mode NIC per guest with ``restrict=on`` (no way out), forwarding
  host loopback ports to the guest's agent (gRPC) and control service, and
  the guest's 10.0.2.100:6443 to the host's kube-apiserver on loopback
  (``guestfwd``), so the agent publishes its inventory to the real API
  server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
GUEST_API = "10.0.2.100"
GUEST_API_PORT = 6443
AGENT_PORT = 50051  # control.py's
CONTROL_PORT = 7000
# TCG boots a guest to a listening agent in 5-6 s on an idle machine; two
# guests share two cores with the host's control plane and operator.
BOOT_TIMEOUT_S = 120
# 256 MiB is what the guest's Python, the agent and the kernel need.
GUEST_MEMORY = "256M"


class GuestError(RuntimeError):
    pass


def build(script: str) -> pathlib.Path:
    """Run a build script (kernel or rootfs) and return the path it prints."""
    r = subprocess.run(
        [str(REPO / script)], capture_output=True, text=True, env={**os.environ}, check=False
    )
    if r.returncode != 0:
        raise GuestError(f"{script} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return pathlib.Path(r.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    """Whether some process listens on 127.0.0.1:port, asked of the kernel
    (/proc/net/tcp) rather than by connecting: a connection to QEMU's
    socket netdev would be taken as the peer guest."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[1] == want and parts[3] == "0A":  # TCP_LISTEN
                return True
    return False


@dataclasses.dataclass
class Guest:
    name: str
    index: int  # 1 for A, 2 for B
    workdir: pathlib.Path
    mdev_uuid: str
    agent_port: int = 0
    control_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def link_addr(self) -> str:
        return f"10.77.0.{self.index}"

    @property
    def console(self) -> pathlib.Path:
        return self.workdir / f"console-{self.name}.log"

    @property
    def agent_endpoint(self) -> str:
        return f"127.0.0.1:{self.agent_port}"

    def call(self, op: str, timeout_s: float = 30.0, **kw: Any) -> dict[str, Any]:
        """One request to the guest's control service; raises GuestError
        with the guest's own message when it refuses."""
        with socket.create_connection(("127.0.0.1", self.control_port), timeout=timeout_s) as s:
            s.sendall(json.dumps({"op": op, **kw}).encode() + b"\n")
            f = s.makefile("rb")
            line = f.readline()
        if not line:
            raise GuestError(f"{self.name}: control service closed the connection on {op}")
        reply: dict[str, Any] = json.loads(line)
        if not reply.pop("ok", False):
            raise GuestError(f"{self.name}: {op}: {reply.get('error')}")
        return reply

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except OSError:
            return ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def config_disk(
    g: Guest, env: dict[str, str], tls_dir: pathlib.Path, kubeconfig: dict[str, Any]
) -> pathlib.Path:
    d = g.workdir / f"config-{g.name}"
    (d / "tls").mkdir(parents=True, exist_ok=True)
    (d / "node.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    for f in ("ca.crt", "tls.crt", "tls.key"):
        (d / "tls" / f).write_bytes((tls_dir / f).read_bytes())
    (d / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    img = g.workdir / f"config-{g.name}.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(img), str(d)], check=True)
    return img


def guest_kubeconfig(host_kubeconfig: pathlib.Path) -> dict[str, Any]:
    """The host's kubeconfig as a guest uses it: the API server at the
    guest-forwarded address, its certificate checked against the name it
    carries (localhost)."""
    kc: dict[str, Any] = yaml.safe_load(host_kubeconfig.read_text())
    for c in kc["clusters"]:
        c["cluster"]["server"] = f"https://{GUEST_API}:{GUEST_API_PORT}"
        c["cluster"]["tls-server-name"] = "localhost"
    return kc


def api_port(host_kubeconfig: pathlib.Path) -> int:
    kc = yaml.safe_load(host_kubeconfig.read_text())
    return int(str(kc["clusters"][0]["cluster"]["server"]).rsplit(":", 1)[1])


def start_guest(
    g: Guest,
    kernel: pathlib.Path,
    rootfs: pathlib.Path,
    config: pathlib.Path,
    link: str,
    api: int,
) -> None:
    relay = g.workdir / "api_relay.py"
    relay.write_text(_RELAY)
    user = (
        "user,id=host,restrict=on,net=10.0.2.0/24,"
        f"hostfwd=tcp:127.0.0.1:{g.agent_port}-:{AGENT_PORT},"
        f"hostfwd=tcp:127.0.0.1:{g.control_port}-:{CONTROL_PORT},"
        f"guestfwd=tcp:{GUEST_API}:{GUEST_API_PORT}-cmd:{sys.executable} {relay} {api}"
    )
    args = [
        "qemu-system-x86_64",
        "-nographic", "-no-reboot", "-accel", "tcg", "-cpu", "max",
        "-m", GUEST_MEMORY, "-smp", "1",
        "-kernel", str(kernel),
        "-append",
        "console=ttyS0 root=/dev/vda rootfstype=erofs ro init=/devmig-init panic=-1 loglevel=5",
        "-drive", f"file={rootfs},if=virtio,format=raw,readonly=on",
        "-drive", f"file={config},if=virtio,format=raw,readonly=on",
        "-netdev", f"socket,id=link,{link}",
        "-device", f"virtio-net-pci,netdev=link,mac={mac(g.index, 0)}",
        "-netdev", user,
        "-device", f"virtio-net-pci,netdev=host,mac={mac(g.index, 1)}",
    ]  # fmt: skip
    with open(g.console, "wb") as out:
        g.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )


# The guestfwd relay: QEMU runs one per guest connection, the connection
# on its stdin and stdout; it joins it to the API server on host loopback.
_RELAY = """\
import os, socket, sys, threading

# stdin is the guest's connection (a socket); stderr too, so nothing may
# ever be printed.
sys.stderr = open(os.devnull, "w")
g = socket.socket(fileno=os.dup(0))
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))


def pipe(a, b):
    try:
        for data in iter(lambda: a.recv(65536), b""):
            b.sendall(data)
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass


t = threading.Thread(target=pipe, args=(s, g), daemon=True)
t.start()
pipe(g, s)
t.join()
"""


def mac(index: int, nic: int) -> str:
    return f"52:54:00:77:{nic:02x}:{index:02x}"


def set_clock(g: Guest) -> int:
    """Set the guest's clock to the host's, as NTP keeps a node's: half a
    measured round trip ahead of the moment the request leaves. Returns
    the round trip in ns, a bound on the error."""
    t0 = time.time_ns()
    g.call("ping")
    rtt = time.time_ns() - t0
    g.call("set_clock", unix_ns=time.time_ns() + rtt // 2)
    return rtt


def wait_control(g: Guest, until: float) -> None:
    while time.monotonic() < until:
        if not g.running():
            raise GuestError(f"{g.name}'s QEMU exited:\n{g.console_text()[-4000:]}")
        with contextlib.suppress(OSError, GuestError, ValueError):
            g.call("ping", timeout_s=2)
            return
        time.sleep(0.3)
    raise GuestError(f"{g.name} did not come up in {BOOT_TIMEOUT_S} s:\n{g.console_text()[-4000:]}")


@contextlib.contextmanager
def two_guests(
    workdir: pathlib.Path,
    kernel: pathlib.Path,
    rootfs: pathlib.Path,
    tls_dir: pathlib.Path,
    host_kubeconfig: pathlib.Path,
    holder: str,
) -> Iterator[tuple[Guest, Guest]]:
    """Boot node-a (its mtty held by VMI ``holder``, namespace/name) and
    node-b; yields once both control services answer. Kills both at the
    end."""
    workdir.mkdir(parents=True, exist_ok=True)
    a = Guest("node-a", 1, workdir, str(uuid.uuid4()))
    b = Guest("node-b", 2, workdir, str(uuid.uuid4()))
    link_port = free_port()
    kc = guest_kubeconfig(host_kubeconfig)
    api = api_port(host_kubeconfig)
    try:
        for g, link in (
            (a, f"listen=127.0.0.1:{link_port}"),
            (b, f"connect=127.0.0.1:{link_port}"),
        ):
            # Ports first: node.env names the agent's forwarded endpoint.
            g.agent_port, g.control_port = free_port(), free_port()
            env = {
                "NODE": g.name,
                "LINK_ADDR": f"{g.link_addr}/24",
                "LINK_MAC": mac(g.index, 0),
                "HOST_MAC": mac(g.index, 1),
                "MDEV_UUID": g.mdev_uuid,
                "AGENT_ENDPOINT": "",  # filled below
                "HOLDER": holder if g is a else "",
            }
            env["AGENT_ENDPOINT"] = g.agent_endpoint
            cfg = config_disk(g, env, tls_dir, kc)
            start_guest(g, kernel, rootfs, cfg, link, api)
            if g is a:
                # B connects to A's listening socket: wait until QEMU
                # listens, without connecting (that would be the link).
                until = time.monotonic() + 30
                while not listening(link_port):
                    if time.monotonic() > until or not a.running():
                        raise GuestError(f"node-a's QEMU never listened:\n{a.console_text()}")
                    time.sleep(0.05)
        until = time.monotonic() + BOOT_TIMEOUT_S
        for g in (a, b):
            wait_control(g, until)
            set_clock(g)
        yield a, b
    finally:
        for g in (a, b):
            g.stop()
