"""The wire contract: buf lint/format clean, and the checked-in generated code up to date."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _buf() -> str:
    beside = Path(sys.executable).parent / "buf"
    found = str(beside) if beside.exists() else shutil.which("buf")
    if found is None:
        pytest.fail("buf is not installed: pip install -e '.[test]' provides it (buf-bin)")
    return found


def test_buf_lint_is_clean() -> None:
    result = subprocess.run([_buf(), "lint"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_format_is_clean() -> None:
    result = subprocess.run(
        [_buf(), "format", "--diff", "--exit-code"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, "run `buf format -w`:\n" + result.stdout + result.stderr


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "generate_protos.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from generate_protos import generated_files  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    fresh = {str(p.relative_to(tmp_path)): p.read_bytes() for p in generated_files(tmp_path)}
    checked_in = {str(p.relative_to(REPO)): p.read_bytes() for p in generated_files(REPO)}
    stale = sorted(n for n in fresh.keys() | checked_in.keys() if fresh.get(n) != checked_in.get(n))
    assert not stale, f"generated code is stale ({stale}): run python scripts/generate_protos.py"


def test_every_rpc_message_and_field_is_documented() -> None:
    """buf's COMMENTS rules enforce this; checked here too so a lint config change can't hide it."""
    from google.protobuf import descriptor_pb2

    from stopline.gateway.v1 import gateway_service_pb2
    from stopline.v1 import operation_pb2, runtime_service_pb2

    for module in (operation_pb2, runtime_service_pb2, gateway_service_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        assert module.DESCRIPTOR.package.endswith(".v1")
        for enum in proto.enum_type:
            assert enum.value[0].name.endswith("_UNSPECIFIED") and enum.value[0].number == 0
