"""The README's `buf curl` and `grpcurl` examples, run as printed: each ```sh block of "Calling
the services with buf curl (or grpcurl)" and each command of the Errors section is taken from
README.md and run with bash against a real runtime and gateway (subprocesses), with the
variables the README names (STOPLINE_TOKEN, STOPLINE_SERVICE_TOKEN) set and the two default
addresses replaced by the test's ports. Then the outcomes are checked: what a new user pasting
the block would see, including a second run of the same block."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.transport import open_sync_channel
from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as rt_pb
from stopline.v1 import runtime_service_pb2_grpc as rt_grpc
from tests.credentials import ENV, SERVICE_TOKEN, TOKEN
from tests.processes import GatewayProcess, RuntimeProcess, free_port

README = Path(__file__).resolve().parent.parent / "README.md"
RUNTIME_DEFAULT, GATEWAY_DEFAULT = "127.0.0.1:50051", "127.0.0.1:50052"
SECTION = "## Calling the services with buf curl (or grpcurl)"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start : end if end != -1 else len(text)]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


SETUP, GATEWAY_BLOCK, RUNTIME_BLOCK, GRPCURL_BLOCK = blocks(section(SECTION), "sh")


class Services:
    def __init__(self, runtime: RuntimeProcess, gateway: GatewayProcess, workdir: Path) -> None:
        self.runtime = runtime
        self.gateway = gateway
        self.workdir = workdir

    def bash(
        self, *parts: str, gateway_address: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run README text with bash as a user would paste it, tools from this environment's
        bin directory (where pip put `buf` and `grpcurl`) first on PATH."""
        script = "\n".join(parts)
        script = script.replace(RUNTIME_DEFAULT, self.runtime.address)
        script = script.replace(GATEWAY_DEFAULT, gateway_address or self.gateway.address)
        bin_dir = str(Path(sys.executable).parent)
        env = {**os.environ, **ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
        return subprocess.run(
            ["bash", "-c", script],
            capture_output=True,
            text=True,
            env=env,
            cwd=self.workdir,
            timeout=90,
        )

    def gateway_get(self, operation_id: str) -> op_pb.Operation:
        with open_sync_channel(self.gateway.address, TOKEN) as channel:
            stub = pb_grpc.GatewayServiceStub(channel)
            request = pb.GetOperationRequest(operation_id=operation_id)
            return stub.GetOperation(request, timeout=5).operation

    def runtime_get(self, operation_id: str) -> op_pb.Operation:
        with open_sync_channel(self.runtime.address, SERVICE_TOKEN) as channel:
            stub = rt_grpc.RuntimeServiceStub(channel)
            request = rt_pb.GetOperationRequest(operation_id=operation_id)
            return stub.GetOperation(request, timeout=5).operation

    def newest(self) -> op_pb.Operation:
        with open_sync_channel(self.runtime.address, SERVICE_TOKEN) as channel:
            stub = rt_grpc.RuntimeServiceStub(channel)
            page = stub.ListOperations(rt_pb.ListOperationsRequest(page_size=1), timeout=5)
            return page.operations[0]


def wait_for(probe: Any, timeout: float = 20) -> Any:
    """Poll `probe` until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)  # polling interval, not synchronisation: the loop checks state


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    workdir = tmp_path_factory.mktemp("readme")
    runtime = RuntimeProcess(f"sqlite:///{workdir / 'runtime.db'}", workdir)
    try:
        gateway = GatewayProcess(runtime.address, workdir)
        try:
            yield Services(runtime, gateway, workdir)
        finally:
            gateway.close()
    finally:
        runtime.close()


def tool(name: str) -> None:
    """The tools come with the test extras: a missing one fails the test, never skips it."""
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / name).exists(), f"{name} is missing: pip install -e '.[test]'"


def printed(result: subprocess.CompletedProcess[str], name: str) -> str:
    """The value of `name` printed by the `printf` the test appends to a block."""
    found = re.findall(rf"^{name}=(.*)$", result.stdout, flags=re.MULTILINE)
    assert found, (name, result.stdout[-2000:], result.stderr[-2000:])
    return str(found[-1])


def is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


SHOW = 'printf "\\nOP=%s\\nHELD=%s\\n" "$OP" "${HELD:-}"'


def test_the_setup_block_lists_methods_and_health(services: Services) -> None:
    tool("buf")
    result = services.bash(SETUP)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    for method in (
        "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "grpc.health.v1.Health/List",
        "stopline.v1.RuntimeService/StartOperation",
        "stopline.gateway.v1.GatewayService/StartAndStream",
    ):
        assert method in result.stdout, method
    assert result.stdout.count('"status": "SERVING"') >= 4  # two Checks, then List's entries
    assert '"stopline.gateway.v1.GatewayService": {' in result.stdout  # List names the service


def test_the_gateway_block_runs_as_printed(services: Services) -> None:
    tool("buf")
    result = services.bash(SETUP, GATEWAY_BLOCK, SHOW)
    # The one error is the grace example's own deadline (--timeout 2s) on its stream.
    assert json.loads(result.stderr)["code"] == "deadline_exceeded", result.stderr
    op = printed(result, "OP")
    assert is_uuid(op), result.stdout[-2000:]
    assert '"delivery": "STOP_DELIVERY_DELIVERED"' in result.stdout
    assert '"outcome": "INTERRUPT_OUTCOME_ACCEPTED"' in result.stdout
    assert '"interrupted": {' in result.stdout  # the reconnect replayed to the terminal event
    stopped = services.gateway_get(op)
    assert stopped.status == op_pb.OPERATION_STATUS_INTERRUPTED
    assert stopped.stop_request.reason == "wrong prompt"
    assert stopped.idempotency_key.startswith("gateway-")  # as the README's output shows

    grace = services.newest()
    assert grace.labels["stopline.cancel_policy"] == "stop_after_grace"
    ended = wait_for(
        lambda: (
            (op := services.runtime_get(grace.id)).status == op_pb.OPERATION_STATUS_INTERRUPTED
            and op
        )
    )
    assert ended.stop_request.reason == "nobody reconnected within 3s"


def test_the_runtime_block_runs_as_printed_twice(services: Services) -> None:
    """Twice, as a user pastes it twice: the second run starts a new operation (a fresh key)."""
    tool("buf")
    seen: set[str] = set()
    for _ in range(2):
        result = services.bash(SETUP, RUNTIME_BLOCK, SHOW)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        op, held = printed(result, "OP"), printed(result, "HELD")
        assert is_uuid(op) and is_uuid(held) and op not in seen
        seen.add(op)
        # The repeated start answered the same operation with created: false (left out).
        assert '"created": true' not in result.stdout
        assert result.stdout.count(f'"id": "{op}"') >= 3  # the repeat, get, lists, ...
        assert '"outcome": "INTERRUPT_OUTCOME_ACCEPTED"' in result.stdout
        assert '"interrupted": {' in result.stdout  # the watch ran to the terminal event
        assert services.runtime_get(op).stop_request.requested_by == "alice"
        wait_for(lambda h=held: services.runtime_get(h).status == op_pb.OPERATION_STATUS_COMPLETED)


def test_the_grpcurl_block_runs_as_printed(services: Services) -> None:
    tool("grpcurl")
    result = services.bash(GRPCURL_BLOCK, SHOW)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "stopline.gateway.v1.GatewayService\n" in result.stdout  # list
    assert "service RuntimeService {" in result.stdout  # describe
    assert '"statuses": {' in result.stdout  # Health/List
    assert '"delivery": "STOP_DELIVERY_DELIVERED"' in result.stdout
    assert result.stdout.count('"outcome": "INTERRUPT_OUTCOME_ACCEPTED"') == 2
    op, held = printed(result, "OP"), printed(result, "HELD")
    assert services.runtime_get(op).status in (
        op_pb.OPERATION_STATUS_STOPPING,
        op_pb.OPERATION_STATUS_INTERRUPTED,
    )
    wait_for(lambda: services.runtime_get(held).status == op_pb.OPERATION_STATUS_COMPLETED)


def error_examples() -> list[tuple[str, dict[str, str]]]:
    """(command, the JSON error printed under it) for each `$ ` line of the Errors section."""
    (console,) = [b for b in blocks(section("## Errors"), "console") if b.startswith("$ ")]
    examples = []
    for chunk in console.split("$ ")[1:]:
        command, _, answer = chunk.partition("\n")
        examples.append((command, json.loads(answer)))
    return examples


@pytest.mark.parametrize(("command", "expected"), error_examples())
def test_the_errors_sections_commands_answer_as_printed(
    services: Services, tmp_path: Path, command: str, expected: dict[str, str]
) -> None:
    tool("buf")
    gateway_address = None
    if "# runtime stopped" in command:
        # A gateway whose runtime does not answer: nothing listens on that port.
        down = GatewayProcess(f"127.0.0.1:{free_port()}", tmp_path)
        gateway_address = down.address
    try:
        result = services.bash(SETUP, command, gateway_address=gateway_address)
    finally:
        if gateway_address is not None:
            down.close()
    answer = json.loads(result.stderr)
    assert answer["code"] == expected["code"], result.stderr
    if expected["code"] == "unavailable":
        # gRPC's own words after "(" depend on its version and the load-balancing policy.
        printed = expected["message"].split("(")[0]
        assert answer["message"].startswith(printed), (answer, printed)
        assert answer["message"].endswith("); retry")
    else:
        assert answer["message"] == expected["message"]


def test_reflection_v1_and_health_list(services: Services) -> None:
    """What current clients ask first: grpc.reflection.v1 (no fallback to v1alpha here)."""
    tool("buf")
    for address in (services.runtime.address, services.gateway.address):
        result = services.bash(
            "buf curl --http2-prior-knowledge --protocol grpc --reflect-protocol grpc-v1 "
            f"--list-methods http://{address}",
            "buf curl --http2-prior-knowledge --protocol grpc --reflect-protocol grpc-v1 "
            f"-d '{{}}' http://{address}/grpc.health.v1.Health/List",
        )
        assert result.returncode == 0 and result.stderr == "", result.stderr
        listed = json.loads(result.stdout[result.stdout.index("{") :])
        assert listed["statuses"][""] == {"status": "SERVING"}
        assert len(listed["statuses"]) == 2
