"""Where one write's time goes on SQLite: one output chunk (an `UPDATE ... RETURNING` and an
`INSERT`, in one transaction) through SQLAlchemy Core statements built per call, the same SQL
through `engine.begin()`, the runtime's hot path (runtime_service/hot_path.py) on its own and
inline, and a bare pooled DBAPI connection. This is the probe behind BENCHMARKS.md's "what limits
it"; rerun it after changing the store.

    python -m bench.write_path
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from runtime_service.database import create_db_engine
from runtime_service.domain import EventKind
from runtime_service.migrate import upgrade_to_head
from runtime_service.store import OperationStore, _owned_by

UPDATE = (
    "UPDATE operations SET last_seq=last_seq+1, updated_at=? "
    "WHERE id=? AND status='RUNNING' AND runner_id='r' RETURNING last_seq"
)
INSERT = "INSERT INTO events VALUES (?,?,?,?,?)"
NOW = "2026-01-01 00:00:00"


def per_call_us(fn: Callable[[], object], n: int) -> float:
    began = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - began) / n * 1e6


def main(n: int = 2000) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        engine = create_db_engine(f"sqlite:///{Path(tmp) / 'probe.db'}")
        upgrade_to_head(engine)
        store = OperationStore(engine)
        op_id = store.create("noop", {}, None).operation.id
        store.claim(op_id, "r", 600)

        def via_core() -> object:
            # How every write was made before the hot path: Core statements built per call.
            with engine.begin() as conn:
                return store._append(
                    conn,
                    op_id,
                    EventKind.OUTPUT_CHUNK,
                    {"step": 0, "text": "x" * 64},
                    datetime.now(UTC),
                    where=_owned_by("r"),
                )

        def via_hot_path() -> object:
            return store.append_chunk(op_id, 0, "x" * 64, "r")

        def via_inline() -> object:
            return store.hot.inline(store.hot.append_chunk_in, op_id, 0, "x" * 64, "r")

        def via_begin() -> object:
            with engine.begin() as conn:
                seq = conn.exec_driver_sql(UPDATE, (NOW, op_id)).scalar()
                conn.exec_driver_sql(INSERT, (op_id, seq, "output_chunk", "{}", NOW))
            return seq

        raw = engine.raw_connection()

        def via_dbapi() -> object:
            cur = raw.cursor()
            cur.execute("BEGIN IMMEDIATE")
            seq = cur.execute(UPDATE, (NOW, op_id)).fetchone()[0]
            cur.execute(INSERT, (op_id, seq, "output_chunk", "{}", NOW))
            cur.execute("COMMIT")
            return seq

        for label, fn in (
            ("Core statements built per call (the old store)", via_core),
            ("same SQL via engine.begin() + exec_driver_sql", via_begin),
            ("store.append_chunk: hot path, its own transaction", via_hot_path),
            ("hot path inline (the runner's idle case)", via_inline),
            ("same SQL on the pooled DBAPI connection", via_dbapi),
        ):
            print(f"{label:<54} {per_call_us(fn, n):6.0f} us")
        raw.close()
        store.hot.close()
        engine.dispose()


if __name__ == "__main__":
    main()
