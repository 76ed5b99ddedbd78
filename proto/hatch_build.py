"""Generate Python gRPC/protobuf code from every .proto in this folder.

Runs inside the wheel build, so an installed devmig-api always matches the
.proto files it was built from. Output: ``*_pb2.py``, ``*_pb2_grpc.py`` and
``*_pb2.pyi`` stubs, laid out by proto package (``devmig/agent/v1alpha1/``).
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class ProtoBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        import grpc_tools
        from grpc_tools import protoc

        root = pathlib.Path(self.root)
        protos = sorted(str(p.relative_to(root)) for p in root.rglob("*.proto"))
        if not protos:
            raise RuntimeError(f"no .proto files under {root}")
        out = pathlib.Path(tempfile.mkdtemp(prefix="devmig-proto-"))
        self._out = out
        well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "protoc",
            f"-I{root}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *protos,
        ]
        self.app.display_info(f"devmig-api: compiling {len(protos)} proto file(s)")
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed: " + " ".join(args))
        # Every folder of generated code is a regular package.
        for d in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
            if d != out:
                (d / "__init__.py").touch()
        for f in out.rglob("*"):
            if f.is_file():
                rel = f.relative_to(out).as_posix()
                build_data["force_include"][str(f)] = rel

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        shutil.rmtree(getattr(self, "_out", ""), ignore_errors=True)
