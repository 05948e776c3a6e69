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
    fresh_dir = tmp_path / "stopline" / "v1"
    checked_in_dir = REPO / "stopline" / "v1"
    fresh = {p.name: p.read_bytes() for p in fresh_dir.iterdir() if p.is_file()}
    checked_in = {
        p.name: p.read_bytes()
        for p in checked_in_dir.iterdir()
        if p.is_file() and p.suffix in {".py", ".pyi"}
    }
    stale = sorted(n for n in fresh.keys() | checked_in.keys() if fresh.get(n) != checked_in.get(n))
    assert not stale, f"generated code is stale ({stale}): run python scripts/generate_protos.py"


def test_every_rpc_message_and_field_is_documented() -> None:
    """buf's COMMENTS rules enforce this; checked here too so a lint config change can't hide it."""
    from google.protobuf import descriptor_pb2

    from stopline.v1 import operation_pb2, runtime_service_pb2

    for module in (operation_pb2, runtime_service_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        assert module.DESCRIPTOR.package == "stopline.v1"
        for enum in proto.enum_type:
            assert enum.value[0].name.endswith("_UNSPECIFIED") and enum.value[0].number == 0
