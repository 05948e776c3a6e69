"""Regenerate the Python code for the contracts in protos/.

The one way generated code is produced, so that a test can rerun it into a temporary folder and
fail when the checked-in files differ (someone edited a .proto and forgot to regenerate).
Usage: python scripts/generate_protos.py [OUT_DIR]   (default: the repository root)
"""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"
GENERATED_ROOT = Path("stopline")


def _plugin(name: str) -> str:
    """Find a protoc plugin installed next to this interpreter (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: install the test extras (pip install -e '.[test]')")
    return found


def generated_files(root: Path) -> list[Path]:
    """Every file this script writes below root/stopline (hand-written modules excluded)."""
    base = root / GENERATED_ROOT
    return sorted(
        p
        for p in base.rglob("*")
        if p.is_file() and ("_pb2" in p.name or (p.name == "__init__.py" and p.parent.name == "v1"))
    )


def generate(out_dir: Path) -> list[Path]:
    """Generate messages, gRPC stubs and their type stubs into out_dir/stopline/..."""
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    for old in generated_files(out_dir):
        if "_pb2" in old.name:
            old.unlink()
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out=quiet:{out_dir}",
        f"--mypy_grpc_out=quiet:{out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for proto in protos:
        package_dir = out_dir / proto.relative_to(PROTO_ROOT).parent
        rel = package_dir.relative_to(out_dir)
        (package_dir / "__init__.py").write_text(
            f'"""Generated from protos/{rel}: do not edit."""\n'
        )
        for parent in list(rel.parents)[:-1]:  # stopline/gateway etc.: plain packages
            init = out_dir / parent / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated contracts."""\n')
    return generated_files(out_dir)


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO
    for path in generate(out):
        print(path.relative_to(out))
