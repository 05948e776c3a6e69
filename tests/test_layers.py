"""The floors of the house: `stopline` at the bottom, the two services on it, the `stopline`
command (stopline_cli) on top. Imports only run downwards; each check imports every module of a
package in a fresh interpreter and looks at what else got loaded."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

PACKAGES = ("stopline", "runtime_service", "gateway_service", "stopline_cli")


def loaded_by(package: str) -> set[str]:
    """The top-level packages of this project in sys.modules after importing every module of
    `package` (alembic's migration scripts excepted: they run only inside alembic)."""
    code = textwrap.dedent(
        f"""
        import importlib, json, pkgutil, sys
        root = importlib.import_module({package!r})
        for info in pkgutil.walk_packages(root.__path__, root.__name__ + "."):
            importlib.import_module(info.name)
        print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}})))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout)) & set(PACKAGES)


def test_the_shared_package_imports_nothing_above_it() -> None:
    assert loaded_by("stopline") == {"stopline"}


@pytest.mark.parametrize("service", ["runtime_service", "gateway_service"])
def test_a_service_imports_only_the_shared_package(service: str) -> None:
    # Neither the command on top nor the other service.
    assert loaded_by(service) == {service, "stopline"}
