"""Runtimes and gateways as separate processes for a benchmark, on SQLite or PostgreSQL.

Separate processes, as in production: the client, the gateway and the runtime do not share an
event loop or a GIL, so what is measured includes the real hops.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import TracebackType

from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from runtime_service.schema import steps
from tests.ports import free_port
from tests.processes import GatewayProcess, RuntimeProcess

ADMIN_URL = os.environ.get(
    "STOPLINE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REPO = Path(__file__).resolve().parent.parent


def admin(statement: str) -> None:
    """A statement on PostgreSQL's admin database, outside any transaction (CREATE and DROP
    DATABASE for the benchmarks' own databases)."""
    engine = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


class FakeLLMProcess:
    """`python -m fake_llm` in its own process (as a real provider is: its event loop does not
    share the runtime's or the client's), stamping each token with its send time."""

    def __init__(self, tokens: int = 100, tokens_per_second: float = 50.0) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fake_llm",
                "--port",
                "0",
                "--stamp-tokens",
                "--tokens",
                str(tokens),
                "--tokens-per-second",
                str(tokens_per_second),
            ],
            stdout=subprocess.PIPE,
            cwd=REPO,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()
        if "listening on" not in line:
            self.close()
            raise RuntimeError(f"fake_llm did not start: {line!r}")
        self.base_url = line.split()[-1]
        self.control = self.base_url.removesuffix("/v1")

    def runtime_args(self) -> tuple[str, ...]:
        return ("--llm-base-url", self.base_url, "--llm-model", "fake-model")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


class Stack:
    def __init__(
        self,
        backend: str,
        workdir: Path,
        replicas: int = 1,
        abort_mid_step: bool = True,
        runtime_args: tuple[str, ...] = (),
        gateway_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        advertise: bool = False,
        balanced: bool = False,
        last_replica_args: tuple[str, ...] = (),
    ) -> None:
        """`runtime_args` and `gateway_args` are added to each replica's command line, `env` to
        every service's environment (the observability scenario switches metrics, tracing and
        JSON logs on with them). One gateway per replica, pinned to it; `balanced` adds one
        more, last, over every replica with round_robin (production's shape); `advertise`
        names each replica to it (`--advertise-address`), so that it routes an operation's
        release and stops to the replica streaming it. `last_replica_args` are added to the
        last replica's command line only (after the others: a flag given twice takes the last
        value)."""
        # The services at their default log level, as shipped: their INFO lines (a stop's, a
        # start's, an operation's end) are logged on the paths measured. (Before 2026-12-01
        # 16:50 every figure but bench.overhead's ran at WARNING, the tests' level, and so
        # missed what those lines cost: about 1.5 ms of a stop's answer on an idle gateway and
        # runtime while they were written by the code that logged them.)
        env = {"STOPLINE_LOG_LEVEL": "INFO", **(env or {})}
        # The runtime subprocesses load bench.agents from this checkout.
        os.environ["PYTHONPATH"] = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        self.backend = backend
        self._database: str | None = None
        if backend == "sqlite":
            self.url = f"sqlite:///{workdir / f'bench-{uuid.uuid4().hex[:8]}.db'}"
        else:
            self._database = f"stopline_bench_{uuid.uuid4().hex[:10]}"
            admin(f'CREATE DATABASE "{self._database}"')
            self.url = make_url(ADMIN_URL).set(database=self._database).render_as_string(False)
        args = (
            "--agent",
            "noop=bench.agents:NoopAgent",
            "--abort-mid-step" if abort_mid_step else "--stop-at-boundary",
            "--max-running",
            "5000",
            "--lease-seconds",
            "10",
            "--poll-seconds",
            "0.5",
            *runtime_args,
        )
        self.runtimes: list[RuntimeProcess] = []
        self.gateways: list[GatewayProcess] = []
        try:
            for i in range(replicas):
                port = free_port()
                named = ("--advertise-address", f"127.0.0.1:{port}") if advertise else ()
                last = last_replica_args if i == replicas - 1 else ()
                self.runtimes.append(
                    RuntimeProcess(self.url, workdir, port, (*args, *named, *last), env=env)
                )
            for runtime in self.runtimes:
                self.gateways.append(
                    GatewayProcess(runtime.address, workdir, extra_args=gateway_args, env=env)
                )
            if balanced:
                every = "ipv4:" + ",".join(r.address for r in self.runtimes)
                lb = ("--runtime-lb-policy", "round_robin", *gateway_args)
                self.gateways.append(GatewayProcess(every, workdir, extra_args=lb, env=env))
        except BaseException:
            self.close()
            raise

    def owner(self, operation_id: str) -> int:
        """Index of the runtime replica that ran the operation's first step."""
        engine = create_engine(self.url)
        try:
            with engine.connect() as conn:
                runner_id = conn.execute(
                    select(steps.c.runner_id).where(steps.c.operation_id == operation_id)
                ).scalar()
        finally:
            engine.dispose()
        pid = int(str(runner_id).split("-")[-2])
        return next(i for i, r in enumerate(self.runtimes) if r.process.pid == pid)

    def close(self) -> None:
        # The last replica first: one shutting down hands its operations back, and a replica
        # still serving claims them (10,000 kept the next one from exiting in time). One that
        # does not exit in time is killed, so that the database is dropped all the same.
        processes: list[GatewayProcess | RuntimeProcess] = [
            *self.gateways,
            *reversed(self.runtimes),
        ]
        for process in processes:
            if process.process.poll() is None:
                try:
                    process.terminate()
                except subprocess.TimeoutExpired:
                    process.kill()
        if self._database is not None:
            admin(f'DROP DATABASE IF EXISTS "{self._database}" WITH (FORCE)')

    def __enter__(self) -> Stack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
