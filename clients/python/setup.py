"""Builds tessera-client: generates the gRPC stubs from the repository's proto/ with
grpcio-tools, so the package always speaks the API of the checkout it is built from."""

import pathlib
import re
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).resolve().parent
# The package is built from a checkout: proto/ is two levels up.
PROTO_ROOT = HERE.parent.parent / "proto"


def generate(out: pathlib.Path) -> None:
    """Write tessera_client/_proto/<name>_pb2.py and <name>_pb2_grpc.py with relative imports."""
    from grpc_tools import protoc
    import grpc_tools

    protos = sorted(PROTO_ROOT.glob("tessera/v1/*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT}/tessera/v1: build from a Tessera checkout")
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}", f"--grpc_python_out={tmp}"]
        args += [str(p.relative_to(PROTO_ROOT)) for p in protos]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed on " + " ".join(args[5:]))
        out.mkdir(parents=True, exist_ok=True)
        (out / "__init__.py").write_text('"""Generated from proto/tessera/v1 at build time; do not edit."""\n')
        for f in sorted((pathlib.Path(tmp) / "tessera" / "v1").glob("*.py")):
            text = re.sub(r"^from tessera\.v1 import ", "from . import ", f.read_text(), flags=re.M)
            (out / f.name).write_text(text)


class BuildWithStubs(build_py):
    def run(self):
        super().run()
        generate(pathlib.Path(self.build_lib) / "tessera_client" / "_proto")


def dependencies():
    """At least the grpcio and protobuf the stubs were generated for (they check at import)."""
    from importlib.metadata import version

    grpc = version("grpcio-tools")
    major, minor = version("protobuf").split(".")[:2]
    return [f"grpcio>={grpc}", f"protobuf>={major}.{minor}"]


setup(cmdclass={"build_py": BuildWithStubs}, install_requires=dependencies())
