"""``kubectl devmig``: start, watch, list and cancel device migrations.

    kubectl devmig migrate VMI [--to NODE] [--wait] [--timeout 15m]
    kubectl devmig status [NAME] [-o json]
    kubectl devmig devices [--node NODE] [-o json]
    kubectl devmig cancel NAME

Installed as the ``kubectl-devmig`` entry point, so kubectl finds it on PATH.
Exit codes are meant for scripts: 0 done (or Succeeded with --wait),
1 the migration Failed or was Aborted, 2 bad usage, 3 not found,
4 the API server refused or could not be reached, 5 --timeout passed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from devmig_operator import GROUP, VERSION
from devmig_operator.cluster import DM_PLURAL, INVENTORY_PLURAL

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_API, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 5
FINAL = ("Succeeded", "Failed", "Aborted")


class CliError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------ formatting


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def totals(status: Mapping[str, Any]) -> tuple[int, int, int]:
    """(bytes sent, bytes remaining, bytes per second) over all devices."""
    devs = status.get("devices") or []
    sent = sum(int(d.get("bytesSent", 0)) for d in devs)
    left = sum(int(d.get("remainingBytes", 0)) for d in devs)
    rate = sum(int(d.get("throughputBytesPerSecond", 0)) for d in devs)
    return sent, left, rate


def progress_line(obj: Mapping[str, Any], width: int = 30) -> str:
    """One line: phase, bar, bytes, rate, ETA (or downtime when done)."""
    st = obj.get("status") or {}
    phase = st.get("phase") or "Pending"
    sent, left, rate = totals(st)
    frac = sent / (sent + left) if sent + left else (1.0 if phase == "Succeeded" else 0.0)
    filled = int(frac * width)
    bar = "#" * filled + "-" * (width - filled)
    parts = [f"{phase:<15}", f"[{bar}] {frac * 100:5.1f}%", f"{human_bytes(sent)} sent"]
    if rate:
        parts.append(f"{human_bytes(rate)}/s")
        if left and phase not in FINAL:
            parts.append(f"ETA {left / rate:.1f}s")
    if phase in FINAL and st.get("downtimeMs") is not None:
        parts.append(f"downtime {st['downtimeMs']} ms")
    return "  ".join(parts)


def table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def reason_of(obj: Mapping[str, Any]) -> str:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Failed" and c.get("status") == "True":
            return f"{c.get('reason')}: {c.get('message')}"
    return str((obj.get("status") or {}).get("message") or "")


# ------------------------------------------------------------------- commands


class Cli:
    def __init__(self, api: client.ApiClient, namespace: str, out: TextIO, err: TextIO) -> None:
        self.co = client.CustomObjectsApi(api)
        self.namespace = namespace
        self.out, self.err = out, err

    def _get(self, name: str) -> dict[str, Any]:
        try:
            obj = self.co.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, DM_PLURAL, name
            )
        except ApiException as e:
            if e.status == 404:
                raise CliError(
                    EXIT_NOT_FOUND, f"devicemigration {name!r} not found in {self.namespace}"
                ) from e
            raise
        assert isinstance(obj, dict)
        return obj

    def migrate(self, vmi: str, to: str | None, wait: bool, timeout_s: float, output: str) -> int:
        try:
            self.co.get_namespaced_custom_object(
                "kubevirt.io", "v1", self.namespace, "virtualmachineinstances", vmi
            )
        except ApiException as e:
            if e.status == 404:
                raise CliError(
                    EXIT_NOT_FOUND, f"virtualmachineinstance {vmi!r} not found in {self.namespace}"
                ) from e
            raise
        # A random suffix: several migrations of one VMI over time coexist.
        name = f"{vmi}-{secrets.token_hex(3)}"[:253]
        spec: dict[str, Any] = {"vmiName": vmi}
        if to:
            spec["targetNode"] = to
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "DeviceMigration",
            "metadata": {"name": name},
            "spec": spec,
        }
        obj = self.co.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, DM_PLURAL, body
        )
        assert isinstance(obj, dict)
        if output == "json" and not wait:
            json.dump(obj, self.out, indent=2)
            self.out.write("\n")
            return EXIT_OK
        self.err.write(f"devicemigration.devmig.io/{name} created\n")
        if not wait:
            self.out.write(f"{name}\n")
            return EXIT_OK
        return self.follow(name, timeout_s, output)

    def follow(self, name: str, timeout_s: float, output: str = "") -> int:
        """Watch one migration to its end, redrawing the progress line."""
        deadline = time.monotonic() + timeout_s
        tty = self.err.isatty()
        last = ""
        obj = self._get(name)
        while (obj.get("status") or {}).get("phase") not in FINAL:
            left = deadline - time.monotonic()
            if left <= 0:
                self.err.write("\n")
                raise CliError(EXIT_TIMEOUT, f"{name}: not finished within the timeout")
            w = watch.Watch()
            for ev in w.stream(
                self.co.list_namespaced_custom_object,
                GROUP,
                VERSION,
                self.namespace,
                DM_PLURAL,
                field_selector=f"metadata.name={name}",
                resource_version=obj["metadata"]["resourceVersion"],
                timeout_seconds=max(1, int(min(left, 60))),
            ):
                obj = ev["object"]
                line = progress_line(obj)
                if line != last:
                    self.err.write(("\r" + line + "\033[K") if tty else (line + "\n"))
                    self.err.flush()
                    last = line
                if (obj.get("status") or {}).get("phase") in FINAL:
                    w.stop()
                    break
        if tty:
            self.err.write("\n")
        phase = obj["status"]["phase"]
        if output == "json":
            json.dump(obj, self.out, indent=2)
            self.out.write("\n")
        else:
            sent, _, _ = totals(obj["status"])
            summary = f"{name}: {phase}"
            if phase == "Succeeded":
                st = obj["status"]
                summary += (
                    f" on {st.get('targetNode')}, {human_bytes(sent)} of device state, "
                    f"downtime {st.get('downtimeMs', '?')} ms"
                )
            else:
                summary += f" ({reason_of(obj)})"
            self.out.write(summary + "\n")
        return EXIT_OK if phase == "Succeeded" else EXIT_FAILED

    def status(self, name: str | None, output: str) -> int:
        if name:
            objs = [self._get(name)]
        else:
            lst = self.co.list_namespaced_custom_object(GROUP, VERSION, self.namespace, DM_PLURAL)
            assert isinstance(lst, dict)
            objs = lst["items"]
        if output == "json":
            json.dump(objs[0] if name else {"items": objs}, self.out, indent=2)
            self.out.write("\n")
            return EXIT_OK
        if not objs:
            self.err.write(f"No devicemigrations in {self.namespace}.\n")
            return EXIT_OK
        rows = [["NAME", "VMI", "PHASE", "SOURCE", "TARGET", "PROGRESS", "DOWNTIME", "MESSAGE"]]
        for o in objs:
            st = o.get("status") or {}
            sent, left, _ = totals(st)
            prog = f"{sent * 100 // (sent + left)}%" if sent + left else "-"
            rows.append(
                [
                    o["metadata"]["name"],
                    o["spec"]["vmiName"],
                    st.get("phase", "Pending"),
                    st.get("sourceNode", "-"),
                    st.get("targetNode", "-"),
                    prog,
                    f"{st['downtimeMs']}ms" if "downtimeMs" in st else "-",
                    reason_of(o)[:80],
                ]
            )
        table(rows, self.out)
        return EXIT_OK

    def devices(self, node: str | None, output: str) -> int:
        lst = self.co.list_cluster_custom_object(GROUP, VERSION, INVENTORY_PLURAL)
        assert isinstance(lst, dict)
        invs = [i for i in lst["items"] if not node or i["spec"]["nodeName"] == node]
        if node and not invs:
            raise CliError(
                EXIT_NOT_FOUND,
                f"no device inventory for node {node!r} (is the devmig agent there?)",
            )
        if output == "json":
            json.dump({"items": invs}, self.out, indent=2)
            self.out.write("\n")
            return EXIT_OK
        rows = [["NODE", "DEVICE", "IDS", "DRIVER", "MDEV", "MIGRATABLE", "IN USE BY"]]
        for inv in sorted(invs, key=lambda i: i["spec"]["nodeName"]):
            for d in (inv.get("status") or {}).get("devices") or []:
                mig = "yes" if d.get("migratable") else f"no: {d.get('notMigratableReason', '?')}"
                rows.append(
                    [
                        inv["spec"]["nodeName"],
                        d["id"],
                        f"{d.get('vendorId', '?')}:{d.get('deviceId', '?')}",
                        d.get("driver", "-"),
                        d.get("mdevType") or "-",
                        mig,
                        d.get("vmi") or d.get("pod") or "-",
                    ]
                )
        if len(rows) == 1:
            self.err.write("No devices found.\n")
            return EXIT_OK
        table(rows, self.out)
        return EXIT_OK

    def cancel(self, name: str) -> int:
        obj = self._get(name)
        if (obj.get("status") or {}).get("phase") in FINAL:
            raise CliError(EXIT_FAILED, f"{name} already ended ({obj['status']['phase']})")
        self.co.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, DM_PLURAL, name, {"spec": {"cancel": True}}
        )
        self.out.write(f"devicemigration.devmig.io/{name} cancel requested\n")
        return EXIT_OK


def parse_duration(s: str) -> float:
    """'90s', '15m', '1h' or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        return float(s[:-1]) * units[s[-1]] if s and s[-1] in units else float(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a duration: {s!r} (e.g. 90s, 15m, 1h)") from e


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubectl devmig", description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's)")
    p.add_argument("--kubeconfig", help="path to the kubeconfig file")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("migrate", help="migrate a VMI's devices")
    m.add_argument("vmi")
    m.add_argument("--to", metavar="NODE", help="target node (default: devmig chooses)")
    m.add_argument("--wait", action="store_true", help="follow the migration to its end")
    m.add_argument("--timeout", type=parse_duration, default=parse_duration("15m"))
    m.add_argument("-o", "--output", choices=["json"], default="")
    s = sub.add_parser("status", help="show migrations")
    s.add_argument("name", nargs="?")
    s.add_argument("-o", "--output", choices=["json"], default="")
    d = sub.add_parser("devices", help="show the device inventory")
    d.add_argument("--node")
    d.add_argument("-o", "--output", choices=["json"], default="")
    c = sub.add_parser("cancel", help="cancel a migration")
    c.add_argument("name")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        a = parser().parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage, 0 on --help
        return int(e.code or 0)
    try:
        config.load_kube_config(config_file=a.kubeconfig or os.environ.get("KUBECONFIG"))
        _, ctx = config.list_kube_config_contexts(config_file=a.kubeconfig)
        namespace = (
            a.namespace or (ctx.get("context", {}).get("namespace") if ctx else None) or "default"
        )
        cli = Cli(client.ApiClient(), namespace, sys.stdout, sys.stderr)
        if a.command == "migrate":
            return cli.migrate(a.vmi, a.to, a.wait, a.timeout, a.output)
        if a.command == "status":
            return cli.status(a.name, a.output)
        if a.command == "devices":
            return cli.devices(a.node, a.output)
        return cli.cancel(a.name)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except ApiException as e:
        print(f"error: the API server refused: {e.status} {e.reason}", file=sys.stderr)
        return EXIT_API
    except (HTTPError, OSError, config.ConfigException) as e:
        print(f"error: cannot reach the cluster: {e}", file=sys.stderr)
        return EXIT_API
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
