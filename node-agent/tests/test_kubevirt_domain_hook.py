"""The devmig-domain-hook sidecar: libvirt domain XML mutation over real gRPC."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import grpc
import pytest
from kubevirt.hooks.plugins.v1alpha1 import api_pb2, api_pb2_grpc
from peer_uid import connect_as, relayed

from devmig_agent import domain_hook
from devmig_agent.domain_hook import DomainDevice, DomainHook, DomainHookError

# A domain as virt-launcher hands it to domain hooks (libvirtxml Marshal: two
# space indentation, single-element lines), with KubeVirt's metadata in its
# own default namespace, a qemu: namespaced element, and a KubeVirt hostdev.
DOMAIN = b"""<domain type="kvm" xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0">
  <name>vms_db</name>
  <uuid>5b4f1c3e-2a0d-4c6e-9b1f-0d2e3c4b5a69</uuid>
  <metadata>
    <kubevirt xmlns="http://kubevirt.io">
      <uid>vmi-uid-1</uid>
      <graceperiod>
        <deletionGracePeriodSeconds>30</deletionGracePeriodSeconds>
      </graceperiod>
    </kubevirt>
  </metadata>
  <memory unit="b">2147483648</memory>
  <os>
    <type arch="x86_64" machine="pc-q35-rhel9.4.0">hvm</type>
  </os>
  <devices>
    <emulator>/usr/libexec/qemu-kvm</emulator>
    <interface type="ethernet">
      <mac address="02:c4:e5:00:00:01"></mac>
      <alias name="ua-default"></alias>
    </interface>
    <disk device="disk" type="file">
      <source file="/var/run/kubevirt-private/vmi-disks/rootdisk/disk.img"></source>
      <target bus="virtio" dev="vda"></target>
      <alias name="ua-rootdisk"></alias>
    </disk>
    <!-- KubeVirt's own passthrough of a NIC VF -->
    <hostdev type="pci" managed="no" mode="subsystem">
      <source>
        <address type="pci" domain="0x0000" bus="0x5e" slot="0x02" function="0x3"></address>
      </source>
      <alias name="ua-hostdevice-nic"></alias>
    </hostdev>
    <controller type="usb" index="0" model="none"></controller>
  </devices>
  <qemu:commandline>
    <qemu:arg value="-fw_cfg"></qemu:arg>
  </qemu:commandline>
</domain>"""

# No hostdev at all: new devices go at the end of <devices>.
PLAIN = b"""<domain type="kvm">
  <name>vms_web</name>
  <devices>
    <emulator>/usr/libexec/qemu-kvm</emulator>
    <controller type="usb" index="0" model="none"></controller>
  </devices>
</domain>"""

GPU = DomainDevice("ua-devmig-0", "pci", "0000:3b:00.1")
VGPU = DomainDevice("ua-devmig-1", "mdev", "b7c4a2f0-1e0a-4b4e-9d2f-6a9f7c3e5d11")


def elements(xml: bytes) -> list[str]:
    """Every element's tag and attributes in document order."""
    return [f"{e.tag}{sorted(e.attrib.items())}" for e in ET.fromstring(xml).iter()]


def strip_devmig(xml: bytes) -> bytes:
    """The XML with devmig's hostdev elements (and their lines) cut out."""
    return re.sub(
        rb"\n *<hostdev mode='subsystem'[^>]*>\n *<source>[^\n]*</source>\n"
        rb" *<alias name='ua-devmig-\d+'/>\n *</hostdev>",
        b"",
        xml,
    )


def hostdevs(xml: bytes) -> list[ET.Element]:
    return ET.fromstring(xml).findall("./devices/hostdev")


def test_boot_appends_pci_and_mdev_hostdevs_after_the_last_hostdev() -> None:
    out = domain_hook.mutate_domain(DOMAIN, [GPU, VGPU])
    hd = hostdevs(out)
    assert [h.find("alias").get("name") for h in hd] == [  # type: ignore[union-attr]
        "ua-hostdevice-nic",
        "ua-devmig-0",
        "ua-devmig-1",
    ]
    pci, mdev = hd[1], hd[2]
    assert pci.attrib == {"mode": "subsystem", "type": "pci", "managed": "no"}
    assert pci.find("source/address").attrib == {  # type: ignore[union-attr]
        "type": "pci",
        "domain": "0x0000",
        "bus": "0x3b",
        "slot": "0x00",
        "function": "0x1",
    }
    assert mdev.attrib == {"mode": "subsystem", "type": "mdev", "model": "vfio-pci"}
    assert mdev.find("source/address").attrib == {"uuid": VGPU.id}  # type: ignore[union-attr]
    # The controller that followed the last hostdev still follows ours.
    tags = [e.tag for e in ET.fromstring(out).find("devices")]  # type: ignore[union-attr]
    assert tags == ["emulator", "interface", "disk", "hostdev", "hostdev", "hostdev", "controller"]


def test_every_other_byte_of_the_domain_is_kept_including_namespaces_and_comments() -> None:
    out = domain_hook.mutate_domain(DOMAIN, [GPU, VGPU])
    assert strip_devmig(out) == DOMAIN
    assert b'<kubevirt xmlns="http://kubevirt.io">' in out
    assert b"<!-- KubeVirt's own passthrough of a NIC VF -->" in out


def test_new_hostdevs_are_indented_like_their_siblings() -> None:
    out = domain_hook.mutate_domain(DOMAIN, [GPU]).decode()
    assert (
        "    </hostdev>\n"
        "    <hostdev mode='subsystem' type='pci' managed='no'>\n"
        "      <source><address type='pci' domain='0x0000' bus='0x3b' slot='0x00' "
        "function='0x1'/></source>\n"
        "      <alias name='ua-devmig-0'/>\n"
        "    </hostdev>\n"
        "    <controller"
    ) in out


def test_without_hostdevs_devices_go_at_the_end_of_devices() -> None:
    out = domain_hook.mutate_domain(PLAIN, [GPU])
    tags = [e.tag for e in ET.fromstring(out).find("devices")]  # type: ignore[union-attr]
    assert tags == ["emulator", "controller", "hostdev"]
    assert strip_devmig(out) == PLAIN
    assert out.decode().endswith(
        "      <alias name='ua-devmig-0'/>\n    </hostdev>\n  </devices>\n</domain>"
    )


def test_an_empty_devices_element_gets_the_hostdev() -> None:
    out = domain_hook.mutate_domain(b"<domain><name>x</name><devices/></domain>", [GPU])
    assert [h.get("type") for h in hostdevs(out)] == ["pci"]
    assert ET.fromstring(out).find("name").text == "x"  # type: ignore[union-attr]


def test_mutating_twice_gives_the_same_domain() -> None:
    once = domain_hook.mutate_domain(DOMAIN, [GPU, VGPU])
    assert domain_hook.mutate_domain(once, [GPU, VGPU]) == once


def test_a_migration_target_repoints_the_sources_hostdev_keeping_its_guest_address() -> None:
    on_source = domain_hook.mutate_domain(DOMAIN, [GPU])
    # libvirt on the source added the guest PCI address; the target must keep it.
    on_source = on_source.replace(
        b"<alias name='ua-devmig-0'/>",
        b"<alias name='ua-devmig-0'/>\n      "
        b"<address type='pci' domain='0x0000' bus='0x07' slot='0x00' function='0x0'/>",
    )
    target_gpu = DomainDevice("ua-devmig-0", "pci", "0000:af:00.4")
    out = domain_hook.mutate_domain(on_source, [target_gpu])
    hd = [h for h in hostdevs(out) if h.find("alias").get("name") == "ua-devmig-0"]  # type: ignore[union-attr]
    assert len(hd) == 1
    assert hd[0].find("source/address").get("bus") == "0xaf"  # type: ignore[union-attr]
    assert hd[0].find("source/address").get("function") == "0x4"  # type: ignore[union-attr]
    assert hd[0].find("address").get("bus") == "0x07"  # type: ignore[union-attr]
    assert elements(out) == elements(
        on_source.replace(b"0x3b", b"0xaf").replace(b"function='0x1'", b"function='0x4'")
    )
    assert len(out) == len(on_source)


def test_unrelated_hostdevs_including_stale_devmig_ones_are_never_removed() -> None:
    with_two = domain_hook.mutate_domain(DOMAIN, [GPU, VGPU])
    out = domain_hook.mutate_domain(with_two, [GPU])
    assert [h.find("alias").get("name") for h in hostdevs(out)] == [  # type: ignore[union-attr]
        "ua-hostdevice-nic",
        "ua-devmig-0",
        "ua-devmig-1",
    ]


@pytest.mark.parametrize(
    ("xml", "reason"),
    [
        (b"<domain><devices>", "BadDomainXml"),
        (b"<vm><devices/></vm>", "BadDomainXml"),
        (b"<domain><name>x</name></domain>", "BadDomainXml"),
    ],
)
def test_a_broken_domain_is_refused_with_a_reason(xml: bytes, reason: str) -> None:
    with pytest.raises(DomainHookError) as e:
        domain_hook.mutate_domain(xml, [GPU])
    assert e.value.reason == reason
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "entry",
    [
        {"type": "pci", "id": "3b:00.1"},
        {"type": "mdev", "id": "0000:3b:00.1"},
        {"type": "usb", "id": "1-1"},
        {"type": "pci", "id": "0000:3b:00.1", "alias": "devmig-0"},
        {"type": "pci", "id": "0000:3b:00.1", "alias": "ua-x'/><evil"},
        {"type": "mdev", "id": VGPU.id, "model": "vfio-pci' x='"},
    ],
)
def test_a_malformed_device_list_is_refused(entry: dict[str, str]) -> None:
    with pytest.raises(DomainHookError) as e:
        domain_hook.parse_devices({"devices": [entry]})
    assert e.value.reason == "BadDeviceList"


def vmi(annotations: dict[str, str], uid: str = "vmi-uid-1") -> bytes:
    return json.dumps(
        {"metadata": {"name": "db", "namespace": "vms", "uid": uid, "annotations": annotations}}
    ).encode()


DEVMIG_VMI = vmi({"devmig.io/devices": "nvidia.com/T4"})


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Unix socket paths are limited to 108 bytes; pytest's tmp_path can exceed it.
    d = tempfile.mkdtemp(prefix="dm-dh-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def served(sock_dir: str) -> Iterator[tuple[str, str]]:
    devices_dir = f"{sock_dir}/devices"
    path = f"{sock_dir}/domain.sock"
    server = domain_hook.serve(DomainHook(devices_dir, env={}), path)
    yield path, devices_dir
    server.stop(grace=None).wait()


def mutate(path: str, context: str, domain: bytes, vmi_json: bytes) -> bytes:
    with grpc.insecure_channel(f"unix://{path}") as ch:
        r = api_pb2_grpc.DomainHookServiceStub(ch).MutateDomain(
            api_pb2.MutateDomainRequest(
                domain_type="libvirt",
                domain=domain,
                vmi=vmi_json,
                sidecar_context=api_pb2.SidecarContext(invocation_context=context),
            ),
            timeout=30,
        )
    return bytes(r.domain)


@pytest.mark.parametrize("context", ["Boot", "MigrationTarget"])
def test_the_sidecar_attaches_the_devices_the_agent_wrote_for_this_vmi(
    served: tuple[str, str], context: str
) -> None:
    path, devices_dir = served
    written = domain_hook.write_devices_file(devices_dir, "vms", "db", "vmi-uid-1", [GPU, VGPU])
    assert written == f"{devices_dir}/vms_db.json"
    out = mutate(path, context, DOMAIN, DEVMIG_VMI)
    assert out == domain_hook.mutate_domain(DOMAIN, [GPU, VGPU])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_only_root_the_hook_s_own_uid_and_virt_launcher_s_may_call_the_sidecar(
    sock_dir: str,
) -> None:
    """Every container of the pod shares the socket's directory: another
    process there, of another uid, is refused by its kernel credentials and
    never sees a device; virt-launcher's qemu user (107) is served."""
    path, devices_dir = f"{sock_dir}/domain.sock", f"{sock_dir}/devices"
    domain_hook.write_devices_file(devices_dir, "vms", "db", "vmi-uid-1", [GPU])
    refused: list[int] = []
    gate = domain_hook.serve(
        DomainHook(devices_dir, env={}), path, on_refused=lambda _pid, uid: refused.append(uid)
    )
    try:
        assert os.stat(path).st_mode & 0o777 == 0o666  # the credential check decides
        os.chmod(sock_dir, 0o755)  # mkdtemp's 0700 would stop any non-root peer
        with (
            relayed(connect_as(65534, path), sock_dir) as local,
            pytest.raises(grpc.RpcError) as ei,
        ):
            mutate(local, "Boot", PLAIN, DEVMIG_VMI)
        assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert ei.value.details().startswith("PeerNotAllowed: ")
        assert refused == [65534]
        with relayed(connect_as(domain_hook.VIRT_LAUNCHER_UID, path), sock_dir) as local:
            out = mutate(local, "Boot", PLAIN, DEVMIG_VMI)
        assert [h.get("type") for h in hostdevs(out)] == ["pci"]
    finally:
        gate.stop(grace=None).wait()
    assert not os.path.exists(path)


def test_the_migration_source_context_and_vmis_without_devmig_devices_pass_unchanged(
    served: tuple[str, str],
) -> None:
    path, devices_dir = served
    domain_hook.write_devices_file(devices_dir, "vms", "db", "vmi-uid-1", [GPU])
    assert mutate(path, "MigrationSource", DOMAIN, DEVMIG_VMI) == DOMAIN
    assert mutate(path, "Boot", DOMAIN, vmi({})) == DOMAIN
    assert mutate(path, "Boot", DOMAIN, vmi({"devmig.io/devices": " "})) == DOMAIN


def test_a_vmi_whose_devices_are_not_assigned_yet_is_unavailable(
    served: tuple[str, str],
) -> None:
    path, _ = served
    with pytest.raises(grpc.RpcError) as e:
        mutate(path, "Boot", DOMAIN, DEVMIG_VMI)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert e.value.details().startswith("DevicesNotAssigned: ")


def test_a_device_file_left_by_an_earlier_vmi_of_the_same_name_is_refused(
    served: tuple[str, str],
) -> None:
    path, devices_dir = served
    domain_hook.write_devices_file(devices_dir, "vms", "db", "old-uid", [GPU])
    with pytest.raises(grpc.RpcError) as e:
        mutate(path, "Boot", DOMAIN, DEVMIG_VMI)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert e.value.details().startswith("StaleDeviceList: ")


def test_the_environment_variable_wins_over_the_file(sock_dir: str) -> None:
    env = {domain_hook.DEVICES_ENV: json.dumps({"devices": [{"type": "mdev", "id": VGPU.id}]})}
    hook = DomainHook(f"{sock_dir}/none", env=env)
    out = hook.mutate("Boot", PLAIN, DEVMIG_VMI)
    assert [h.get("type") for h in hostdevs(out)] == ["mdev"]
    assert hostdevs(out)[0].find("alias").get("name") == "ua-devmig-0"  # type: ignore[union-attr]


def test_a_broken_domain_over_grpc_is_invalid_argument(served: tuple[str, str]) -> None:
    path, devices_dir = served
    domain_hook.write_devices_file(devices_dir, "vms", "db", "vmi-uid-1", [GPU])
    with pytest.raises(grpc.RpcError) as e:
        mutate(path, "Boot", b"<domain>", DEVMIG_VMI)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("BadDomainXml: ")


@pytest.mark.parametrize(
    "path",
    [
        "/var/run/kubevirt-plugin/devmig/domain.sock",
        "/var/run/kubevirt-plugin/devmig/sub/hook.sock",
    ],
)
def test_socket_paths_that_follow_kubevirts_rules_are_accepted(path: str) -> None:
    domain_hook.check_socket_path(path, "devmig")


@pytest.mark.parametrize(
    "path",
    [
        "/var/run/kubevirt-plugin/other/domain.sock",
        "/var/run/kubevirt-plugin/devmig/domain.socket",
        "/var/run/kubevirt-plugin/devmig/../devmig/domain.sock",
        "/var/run/kubevirt-plugin/devmig//domain.sock",
        "/var/run/kubevirt-plugin/devmig/" + "x" * 80 + ".sock",
    ],
)
def test_socket_paths_that_break_kubevirts_rules_are_refused(path: str) -> None:
    with pytest.raises(ValueError):
        domain_hook.check_socket_path(path, "devmig")


def test_the_domain_hook_command_serves_until_terminated(sock_dir: str) -> None:
    path = f"{sock_dir}/domain.sock"
    env = {
        **os.environ,
        domain_hook.DEVICES_ENV: json.dumps({"devices": [{"type": "pci", "id": GPU.id}]}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "devmig_agent.domain_hook", "--socket", path, "--no-socket-check"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"LISTENING unix://{path}\n"
        out = mutate(path, "Boot", PLAIN, DEVMIG_VMI)
        assert [h.get("type") for h in hostdevs(out)] == ["pci"]
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()


def test_the_domain_hook_command_refuses_a_socket_path_kubevirt_would_reject(
    sock_dir: str,
) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "devmig_agent.domain_hook", "--socket", f"{sock_dir}/x.sock"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "must be under /var/run/kubevirt-plugin/devmig/" in r.stderr


def test_the_domain_hook_entry_point_is_installed() -> None:
    assert shutil.which("devmig-domain-hook", path=os.path.dirname(sys.executable))


def test_a_greater_than_sign_in_attributes_or_text_does_not_confuse_the_edit() -> None:
    odd = (
        b"<domain><description>a/> b</description><devices>\n"
        b'    <hostdev mode="subsystem" type="pci"><source/><alias name="ua-devmig-0"/></hostdev>\n'
        b'    <interface type="ethernet"><target dev="tap>0"/></interface>\n'
        b"  </devices></domain>"
    )
    out = domain_hook.mutate_domain(odd, [GPU, VGPU])
    hd = hostdevs(out)
    assert [h.find("alias").get("name") for h in hd] == ["ua-devmig-0", "ua-devmig-1"]  # type: ignore[union-attr]
    assert hd[0].find("source/address").get("bus") == "0x3b"  # type: ignore[union-attr]
    root = ET.fromstring(out)
    assert root.find("description").text == "a/> b"  # type: ignore[union-attr]
    assert root.find("devices/interface/target").get("dev") == "tap>0"  # type: ignore[union-attr]
