"""Shared fixtures: databases (SQLite file, throwaway PostgreSQL database), runtimes, stubs,
service processes."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from runtime_service.app import RuntimeApp
from runtime_service.config import RuntimeConfig
from runtime_service.database import Database, create_db_engine
from runtime_service.migrate import upgrade_to_head
from runtime_service.server import RunningRuntime, start_runtime
from runtime_service.storage import Storage, open_storage
from stopline.v1 import runtime_service_pb2_grpc as rt_grpc
from tests.agents import GatedAgent, registry
from tests.credentials import ENV, SERVICE_TOKEN, runtime_channel
from tests.processes import ServiceProcess

POSTGRES_ADMIN_URL = os.environ.get(
    "STOPLINE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REQUIRE_POSTGRES = os.environ.get("STOPLINE_REQUIRE_POSTGRES") == "1"
# Every `stopline` command and service a test starts authenticates with the shared test
# credentials, exactly as in production; tests of refusals pass an environment without them.
os.environ.update(ENV)
T = TypeVar("T")


def _postgres_unavailable() -> str | None:
    try:
        engine = create_engine(POSTGRES_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
    except (OperationalError, ImportError) as exc:
        return f"PostgreSQL at {POSTGRES_ADMIN_URL} is not reachable: {exc}"
    return None


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    problem = _postgres_unavailable()
    if problem is not None:
        if REQUIRE_POSTGRES:
            pytest.fail(f"{problem} (STOPLINE_REQUIRE_POSTGRES=1: PostgreSQL tests must run)")
        pytest.skip(problem)
    return POSTGRES_ADMIN_URL


@pytest.fixture
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh database for one test, dropped afterwards."""
    name = f"stopline_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(postgres_admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'runtime.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Runs the test once per backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runtime.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


def runtime_config(database_url: str, **overrides: object) -> RuntimeConfig:
    settings: dict[str, object] = {
        "address": "127.0.0.1:0",
        "database_url": database_url,
        "stop_grace_seconds": 0.5,
        "shutdown_grace_seconds": 0.0,
        "watch_poll_seconds": 1.0,
        "poll_seconds": 0.1,
        "lease_seconds": 3.0,
        "service_tokens": (SERVICE_TOKEN,),
    }
    settings.update(overrides)
    return RuntimeConfig(**settings)  # type: ignore[arg-type]


async def opened_storage(url: str) -> Storage:
    """Storage for `url`, migrated, as the runtime opens it (close it when done)."""
    engine = create_db_engine(url)
    upgrade_to_head(engine)
    return open_storage(Database(engine), url)


@pytest.fixture
async def storage(db_url: str) -> AsyncIterator[Storage]:
    """Storage alone, migrated, on each backend: the interface the runner uses."""
    opened = await opened_storage(db_url)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def gated() -> GatedAgent:
    return GatedAgent()


@pytest.fixture
async def app(db_url: str, gated: GatedAgent) -> AsyncIterator[RuntimeApp]:
    """The runtime's core without gRPC, on each backend."""
    runtime_app = await RuntimeApp.open(runtime_config(db_url), registry(gated))
    try:
        yield runtime_app
    finally:
        await runtime_app.close()


@pytest.fixture
async def runtime(sqlite_url: str, gated: GatedAgent) -> AsyncIterator[RunningRuntime]:
    """A real gRPC runtime server on a free port, over a SQLite file."""
    running = await start_runtime(runtime_config(sqlite_url), registry(gated))
    try:
        yield running
    finally:
        await running.stop(grace=0)


@pytest.fixture
async def stub(runtime: RunningRuntime) -> AsyncIterator[rt_grpc.RuntimeServiceAsyncStub]:
    async with runtime_channel(runtime.address) as channel:
        yield rt_grpc.RuntimeServiceStub(channel)


async def eventually(
    probe: Callable[[], Awaitable[T | None]], timeout: float = 10.0, interval: float = 0.01
) -> T:
    """Poll `probe` until it returns something other than None/False, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    """Every process a test starts, killed at the end whatever happened."""
    started: list[ServiceProcess] = []
    yield started
    for process in started:
        process.close()
