"""Helpers for tests that run the services as real OS processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.credentials import ENV
from tests.ports import free_port as free_port


def stopline_command() -> list[str]:
    return [sys.executable, "-m", "stopline_cli"]


def wait_serving(
    address: str,
    process: subprocess.Popen[bytes],
    timeout: float = 30,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Poll health (exempt from authentication) until SERVING; over TLS with `credentials`."""
    deadline = time.monotonic() + timeout
    channel = (
        grpc.secure_channel(address, credentials)
        if credentials is not None
        else grpc.insecure_channel(address)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise AssertionError(f"server exited with {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{address} not serving within {timeout}s")
            time.sleep(0.05)


class ServiceProcess:
    """`stopline <service> serve` in a subprocess, serving (health SERVING) when constructed."""

    def __init__(
        self,
        service: str,
        workdir: Path,
        args: list[str],
        port: int | None = None,
        health_credentials: grpc.ChannelCredentials | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = workdir / f"{service}-{self.port}-{time.monotonic_ns()}.log"
        # Every service runs with the shared test credentials (tests/credentials.py).
        env = {**os.environ, **ENV, "STOPLINE_LOG_LEVEL": "WARNING", **(env or {})}
        command = [*stopline_command(), service, "serve", "--address", self.address]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [*command, "--shutdown-grace", "1", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                env=env,
            )
        wait_serving(self.address, self.process, credentials=health_credentials)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 20) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()


class RuntimeProcess(ServiceProcess):
    """`stopline runtime serve` on a database."""

    def __init__(
        self,
        database_url: str,
        workdir: Path,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(
            "runtime", workdir, ["--database-url", database_url, *extra_args], port, **kwargs
        )


class GatewayProcess(ServiceProcess):
    """`stopline gateway serve`, pointed at a runtime."""

    def __init__(
        self,
        runtime_address: str,
        workdir: Path,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(
            "gateway", workdir, ["--runtime", runtime_address, *extra_args], port, **kwargs
        )


def owner_of(
    replicas: list[ServiceProcess], database_url: str, operation_id: str
) -> ServiceProcess:
    """The replica process running an operation now. A start lands on one replica, but any
    replica's claim loop may take the new operation first, so a test that kills "the" runner
    must look. Runner ids are host-pid-suffix."""
    from sqlalchemy import create_engine, select

    from runtime_service.schema import operations

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            runner_id = conn.execute(
                select(operations.c.runner_id).where(operations.c.id == operation_id)
            ).scalar_one()
    finally:
        engine.dispose()
    pid = int(runner_id.split("-")[-2])
    return next(r for r in replicas if r.process.pid == pid)


@contextlib.contextmanager
def fake_llm_process(script: Path | None = None) -> Iterator[str]:
    """`python -m fake_llm` in a subprocess (for tests whose runtimes are processes too): its
    base URL; it is terminated on exit."""
    command = [sys.executable, "-m", "fake_llm", "--port", "0", "--tokens-per-second", "0"]
    if script is not None:
        command += ["--script", str(script)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("fake_llm listening on "), line
        yield line.split()[-1]
    finally:
        process.terminate()
        process.wait(timeout=10)
