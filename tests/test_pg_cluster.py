"""The private PostgreSQL cluster helper: restart, cut-off and crash really happen, and recover."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from tests.pg_cluster import (
    PrivatePostgres,
    PrivatePostgresUnavailable,
    private_postgres,
    require_private_postgres,
)


@pytest.fixture
def pg() -> Iterator[PrivatePostgres]:
    require_private_postgres()
    with private_postgres() as cluster:
        yield cluster


@pytest.fixture
def engine_for() -> Iterator[Callable[[str], Engine]]:
    """Engines without a pool, so every connect() is a real new connection; disposed after."""
    engines: list[Engine] = []

    def make(url: str) -> Engine:
        engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


def rows(conn: Connection) -> list[str]:
    return list(conn.execute(text("SELECT note FROM notes ORDER BY id")).scalars())


def make_notes(engine: Engine, *notes: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE notes (id serial PRIMARY KEY, note text NOT NULL)"))
        for note in notes:
            conn.execute(text("INSERT INTO notes (note) VALUES (:note)"), {"note": note})


def start_time(engine: Engine) -> object:
    with engine.connect() as conn:
        return conn.execute(text("SELECT pg_postmaster_start_time()")).scalar_one()


def test_is_private_and_a_row_survives_a_restart(
    pg: PrivatePostgres, engine_for: Callable[[str], Engine]
) -> None:
    assert pg.port != 5432
    url = pg.create_database("restart_db")
    assert url == f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/restart_db"
    engine = engine_for(url)
    make_notes(engine, "before restart")
    with engine.connect() as conn:
        socket_dir = conn.execute(text("SHOW unix_socket_directories")).scalar_one()
    assert Path(socket_dir) == pg.data_dir
    started = start_time(engine)

    pg.restart()

    assert start_time(engine) != started  # a new postmaster, not the same one
    with engine.connect() as conn:
        assert rows(conn) == ["before restart"]


def test_cut_connections_breaks_open_connections_only(
    pg: PrivatePostgres, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(pg.create_database("cut_db"))
    make_notes(engine, "kept")
    # The set-up's own connections are closed, but each backend exits after its client has
    # gone: wait for them, or the cut below counts one that was leaving anyway.
    deadline = time.monotonic() + 10
    while pg.client_backends() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pg.cut_connections() == 0  # nobody else connected

    with engine.connect() as victim:
        assert rows(victim) == ["kept"]
        assert pg.cut_connections() == 1

        with pytest.raises(OperationalError) as failure:
            victim.execute(text("SELECT 1"))
        assert failure.value.connection_invalidated

    with engine.connect() as fresh:
        assert rows(fresh) == ["kept"]


def test_kill_is_a_crash_and_start_recovers(
    pg: PrivatePostgres, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(pg.create_database("crash_db"))
    make_notes(engine, "committed before the crash")

    with engine.connect() as victim:
        assert rows(victim) == ["committed before the crash"]
        pg.kill()
        assert not pg.running
        with pytest.raises(OperationalError):
            victim.execute(text("SELECT 1"))
    with pytest.raises(OperationalError), engine.connect():
        pass  # nothing listens any more

    pg.start()

    assert "not properly shut down; automatic recovery in progress" in pg.log_text()
    with engine.connect() as conn:
        assert rows(conn) == ["committed before the crash"]


def test_stop_modes_and_repeated_stop(
    pg: PrivatePostgres, engine_for: Callable[[str], Engine]
) -> None:
    engine = engine_for(pg.url())
    with pytest.raises(ValueError, match="stop mode"):
        pg.stop("gentle")

    pg.stop("immediate")
    assert not pg.running
    pg.stop()  # already stopped: nothing to do
    pg.start()
    assert "automatic recovery in progress" in pg.log_text()  # immediate = no checkpoint

    pg.stop("smart")
    pg.start()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1


def test_close_stops_the_server_and_removes_its_directory() -> None:
    require_private_postgres()
    with private_postgres() as cluster:
        assert cluster.running
        pid = cluster.pid
        base = cluster.base_dir
        assert pid is not None and base.is_dir()
    assert not cluster.running
    assert not base.exists()
    assert not Path(f"/proc/{pid}").exists()  # reaped, not left as a zombie


def test_missing_binaries_raise_at_once(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(PrivatePostgresUnavailable, match="not found"), private_postgres(tmp_path):
        pass
    assert time.monotonic() - started < 1


def test_require_private_postgres_skips_or_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STOPLINE_REQUIRE_POSTGRES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not found"):
        require_private_postgres(tmp_path)

    monkeypatch.setenv("STOPLINE_REQUIRE_POSTGRES", "1")
    with pytest.raises(pytest.fail.Exception, match="STOPLINE_REQUIRE_POSTGRES=1"):
        require_private_postgres(tmp_path)


def sysv_segment_ids() -> set[str]:
    lines = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    return {line.split()[1] for line in lines}


def test_close_after_kill_frees_the_crashed_servers_shared_memory() -> None:
    require_private_postgres()
    if not Path("/proc/sysvipc/shm").exists():
        pytest.skip("no /proc/sysvipc/shm to inspect")
    with private_postgres() as cluster:
        cluster.kill()
        # postmaster.pid outlives a crash; line 7 is "<shm key> <shm id>".
        shm_id = (cluster.data_dir / "postmaster.pid").read_text().splitlines()[6].split()[1]
        assert shm_id in sysv_segment_ids()
    assert shm_id not in sysv_segment_ids()
