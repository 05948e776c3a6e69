"""The embedded default must work with the base install alone (no PostgreSQL driver)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_runtime_and_gateway_import_without_psycopg() -> None:
    # Make `import psycopg` fail, then load everything `stopline dev` needs on SQLite.
    code = textwrap.dedent(
        """
        import sys
        sys.modules["psycopg"] = None
        import stopline_cli.main, stopline_cli.dev, runtime_service.app, runtime_service.server
        import gateway_service.server
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
