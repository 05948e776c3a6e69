"""Which libraries each side loads: the gateway has no database, so it imports no database
library (storage failures reach the shared error mapping as domain errors, not as SQLAlchemy's)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_the_gateway_imports_no_database_library() -> None:
    probe = (
        "import json, sys, gateway_service.server, stopline.grpc_status; "
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('sqlalchemy', 'psycopg', 'sqlite3', '_sqlite3', 'alembic'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(loaded.stdout) == []
