"""Where one write's time goes on SQLite: one output chunk (an `UPDATE ... RETURNING` and an
`INSERT`, in one transaction) through SQLAlchemy Core statements built per call, the same SQL
through `engine.begin()`, the runtime's SQLite writes (runtime_service/storage/sqlite.py) in a
transaction of their own and inline, and a bare pooled DBAPI connection. This is the probe
behind BENCHMARKS.md's "what limits it"; rerun it after changing storage.

    python -m bench.write_path
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import insert, update

from runtime_service.database import Database, create_db_engine
from runtime_service.domain import EventKind, JSONValue, OperationStatus
from runtime_service.migrate import upgrade_to_head
from runtime_service.schema import events, operations
from runtime_service.storage import SqliteStorage
from stopline.json_values import dump_json

UPDATE = (
    "UPDATE operations SET last_seq=last_seq+1, updated_at=? "
    "WHERE id=? AND status='RUNNING' AND runner_id='r' RETURNING last_seq"
)
INSERT = "INSERT INTO events VALUES (?,?,?,?,?)"
NOW = "2026-01-01 00:00:00"
CHUNK = EventKind.OUTPUT_CHUNK
CHUNK_DATA: dict[str, JSONValue] = {"step": 0, "text": "x" * 64}


def per_call_us(fn: Callable[[], object], n: int) -> float:
    began = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - began) / n * 1e6


def main(n: int = 2000) -> None:
    asyncio.run(_main(n))


async def _main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        engine = create_db_engine(f"sqlite:///{Path(tmp) / 'probe.db'}")
        upgrade_to_head(engine)
        storage = SqliteStorage(Database(engine))
        op_id = (await storage.create("noop", {}, None)).operation.id
        await storage.claim_and_start(op_id, "r", 600)

        def via_core() -> object:
            # How every write was made before fixed SQL: Core statements built per call.
            now = datetime.now(UTC)
            with engine.begin() as conn:
                seq = conn.execute(
                    update(operations)
                    .where(
                        operations.c.id == op_id,
                        operations.c.status == OperationStatus.RUNNING,
                        operations.c.runner_id == "r",
                    )
                    .values(last_seq=operations.c.last_seq + 1, updated_at=now)
                    .returning(operations.c.last_seq)
                ).scalar_one()
                conn.execute(
                    insert(events).values(
                        operation_id=op_id,
                        seq=seq,
                        kind="output_chunk",
                        data_json=dump_json({"step": 0, "text": "x" * 64}),
                        created_at=now,
                    )
                )
            return seq

        def via_own_transaction() -> object:
            with storage.cursors.transaction() as cursor:
                return storage._append_event(cursor, op_id, CHUNK, CHUNK_DATA, "r", False)

        def via_inline() -> object:
            return storage._inline.run(storage._append_event, op_id, CHUNK, CHUNK_DATA, "r", False)

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
            ("storage chunk: fixed SQL, its own transaction", via_own_transaction),
            ("storage chunk inline (the runner's idle case)", via_inline),
            ("same SQL on the pooled DBAPI connection", via_dbapi),
        ):
            print(f"{label:<54} {per_call_us(fn, n):6.0f} us")
        raw.close()
        await storage.close()


if __name__ == "__main__":
    main()
