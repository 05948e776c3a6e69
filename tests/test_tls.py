"""docs/tls.md, run as written: certificates from its openssl script, the services as real
processes with its flags, a client over TLS, and what must be refused. Also: production `serve`
refuses to start without credentials."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from stopline.gateway.v1 import gateway_service_pb2 as pb
from stopline.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from stopline.transport import SERVICE_TOKEN_ENV, bearer_metadata
from stopline.v1 import runtime_service_pb2 as rt_pb
from stopline.v1 import runtime_service_pb2_grpc as rt_grpc
from tests.processes import GatewayProcess, RuntimeProcess, free_port, stopline_command

DOC = Path(__file__).resolve().parent.parent / "docs" / "tls.md"


def doc_script() -> str:
    text = DOC.read_text()
    block = text.split("<!-- tls-script:begin -->", 1)[1].split("<!-- tls-script:end -->", 1)[0]
    return block.strip().removeprefix("```sh").removesuffix("```")


class Pki:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "pki"
        self.service_token = (self.dir / "service-token").read_text().strip()

    def file(self, name: str) -> str:
        return str(self.dir / name)

    def read(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()

    def client_credentials(self, with_cert: bool) -> grpc.ChannelCredentials:
        if not with_cert:
            return grpc.ssl_channel_credentials(self.read("ca.pem"))
        return grpc.ssl_channel_credentials(
            self.read("ca.pem"), self.read("gateway-client.key"), self.read("gateway-client.pem")
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    root = tmp_path_factory.mktemp("tls")
    subprocess.run(["bash", "-euc", doc_script()], cwd=root, check=True, capture_output=True)
    return Pki(root)


def no_credentials_env() -> dict[str, str]:
    """The environment without the test credentials conftest adds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STOPLINE_",))}
    return env


def new_key_file(root: Path) -> str:
    """`stopline gateway new-key`, as docs/tls.md step 2; returns the token."""
    out = subprocess.run(
        [*stopline_command(), "gateway", "new-key", "--principal", "alice"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    token = re.search(r"^\s+(stl_\S+)$", out, re.MULTILINE)
    entry = re.search(r"^\[\[keys\]\].*?^sha256 = \"[0-9a-f]{64}\"$", out, re.MULTILINE | re.DOTALL)
    assert token is not None and entry is not None, out
    (root / "keys.toml").write_text(entry.group(0) + "\n")
    return token.group(1)


@pytest.fixture(scope="module")
def stack(pki: Pki) -> Iterator[tuple[RuntimeProcess, GatewayProcess, str]]:
    token = new_key_file(pki.root)
    # Only the credentials the doc configures: no test keys, no service token from the env.
    env = {SERVICE_TOKEN_ENV: "", "STOPLINE_API_KEYS": ""}
    runtime = RuntimeProcess(
        f"sqlite:///{pki.root / 'runtime.db'}",
        pki.root,
        extra_args=(
            "--tls-cert",
            pki.file("server.pem"),
            "--tls-key",
            pki.file("server.key"),
            "--tls-client-ca",
            pki.file("ca.pem"),
            "--service-token-file",
            pki.file("service-token"),
        ),
        health_credentials=pki.client_credentials(with_cert=True),
        env=env,
    )
    try:
        gateway = GatewayProcess(
            f"localhost:{runtime.port}",
            pki.root,
            extra_args=(
                "--tls-cert",
                pki.file("server.pem"),
                "--tls-key",
                pki.file("server.key"),
                "--runtime-tls-ca",
                pki.file("ca.pem"),
                "--runtime-tls-cert",
                pki.file("gateway-client.pem"),
                "--runtime-tls-key",
                pki.file("gateway-client.key"),
                "--service-token-file",
                pki.file("service-token"),
                "--api-keys-file",
                str(pki.root / "keys.toml"),
                "--no-reflection",
            ),
            health_credentials=pki.client_credentials(with_cert=False),
            env=env,
        )
    except BaseException:
        runtime.close()
        raise
    try:
        yield runtime, gateway, token
    finally:
        gateway.close()
        runtime.close()


def test_a_client_runs_an_operation_over_tls_end_to_end(
    stack: tuple[RuntimeProcess, GatewayProcess, str], pki: Pki
) -> None:
    _, gateway, token = stack
    env = {**no_credentials_env(), "STOPLINE_TOKEN": token}
    address = f"localhost:{gateway.port}"
    tls_ca = ["--gateway", address, "--tls-ca", pki.file("ca.pem")]
    run = subprocess.run(
        [*stopline_command(), "run", "echo", *tls_ca, "--input", '{"hello": "tls"}'],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    assert "COMPLETED" in run.stdout
    listed = subprocess.run(
        [*stopline_command(), "ls", *tls_ca, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert listed.returncode == 0 and '"owner": "alice"' in listed.stdout


def test_tls_ports_refuse_plaintext_missing_certificates_and_credentials(
    stack: tuple[RuntimeProcess, GatewayProcess, str], pki: Pki
) -> None:
    runtime, gateway, _ = stack
    runtime_address = f"localhost:{runtime.port}"
    listing = rt_pb.ListOperationsRequest()

    def runtime_call(channel: grpc.Channel, token: str | None) -> grpc.StatusCode:
        metadata = bearer_metadata(token) if token else None
        try:
            rt_grpc.RuntimeServiceStub(channel).ListOperations(
                listing, timeout=5, metadata=metadata
            )
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    with grpc.insecure_channel(runtime_address) as plaintext:
        assert runtime_call(plaintext, pki.service_token) is grpc.StatusCode.UNAVAILABLE
    no_cert = pki.client_credentials(with_cert=False)
    with grpc.secure_channel(runtime_address, no_cert) as channel:  # handshake refused
        assert runtime_call(channel, pki.service_token) is grpc.StatusCode.UNAVAILABLE
    with_cert = pki.client_credentials(with_cert=True)
    with grpc.secure_channel(runtime_address, with_cert) as channel:
        assert runtime_call(channel, None) is grpc.StatusCode.UNAUTHENTICATED
        assert runtime_call(channel, "wrong-service-token-00000") is grpc.StatusCode.UNAUTHENTICATED
        assert runtime_call(channel, pki.service_token) is grpc.StatusCode.OK

    with grpc.secure_channel(f"localhost:{gateway.port}", no_cert) as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.GatewayServiceStub(channel).ListOperations(
                pb.ListOperationsRequest(), timeout=5
            )
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED


def serve_refusal(service: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    address = f"127.0.0.1:{free_port()}"
    return subprocess.run(
        [*stopline_command(), service, "serve", "--address", address, *args],
        capture_output=True,
        text=True,
        env=no_credentials_env(),
        cwd=tmp_path,
        timeout=30,
    )


def test_production_serve_refuses_to_start_without_credentials(tmp_path: Path) -> None:
    runtime = serve_refusal("runtime", tmp_path, "--database-url", f"sqlite:///{tmp_path}/r.db")
    assert runtime.returncode != 0
    assert "would serve any caller" in runtime.stderr
    assert "--insecure-allow-any-caller" in runtime.stderr
    gateway = serve_refusal("gateway", tmp_path)
    assert gateway.returncode != 0
    assert "no credentials configured" in gateway.stderr
    assert "new-key" in gateway.stderr
