"""Builds kvserve_client with its gRPC stubs generated from ../../proto (never committed).

protoc and grpc_python_plugin come from PATH (Debian: protobuf-compiler, protobuf-compiler-grpc)
or from $KVSERVE_PROTOC and $KVSERVE_GRPC_PYTHON_PLUGIN. The stubs import each other as
`kvserve.v1`; they are rewritten to live inside the package, as kvserve_client._pb.
"""

import os
import pathlib
import shutil
import subprocess
import tempfile

from setuptools import setup

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
PROTO = "kvserve/v1/generation.proto"


def generate_stubs(package_dir: pathlib.Path) -> None:
    protoc = os.environ.get("KVSERVE_PROTOC") or shutil.which("protoc")
    plugin = os.environ.get("KVSERVE_GRPC_PYTHON_PLUGIN") or shutil.which("grpc_python_plugin")
    if not protoc or not plugin or not (PROTO_ROOT / PROTO).exists():
        raise RuntimeError(
            f"kvserve_client needs protoc, grpc_python_plugin and {PROTO_ROOT / PROTO} to build "
            "its stubs (Debian: protobuf-compiler protobuf-compiler-grpc)")
    out = package_dir / "_pb"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([protoc, f"--proto_path={PROTO_ROOT}", f"--python_out={scratch}",
                        f"--grpc_python_out={scratch}",
                        f"--plugin=protoc-gen-grpc_python={plugin}", str(PROTO_ROOT / PROTO)],
                       check=True)
        for name in ("generation_pb2.py", "generation_pb2_grpc.py"):
            text = (pathlib.Path(scratch) / "kvserve" / "v1" / name).read_text()
            text = text.replace("from kvserve.v1 import", "from kvserve_client._pb import")
            (out / name).write_text(text)
    (out / "__init__.py").write_text('"""Generated from proto/kvserve/v1/generation.proto."""\n')


# Before setup(): pip asks for the package's metadata (its file list included) before it builds.
generate_stubs(HERE / "kvserve_client")
setup()
