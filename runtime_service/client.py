"""A small synchronous client for RuntimeService, used by the `stopline runtime` commands.

Synchronous on purpose: command-line tools have no event loop to share, and grpcio-testing can
drive this code through its fake channel. RPC failures become ClientError with the server's
status code and message, which the CLI prints as they are.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from stopline.transport import SERVICE_TOKEN_ENV, ClientTLS, open_sync_channel
from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as pb
from stopline.v1 import runtime_service_pb2_grpc as pb_grpc

T = TypeVar("T")


class ClientError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def _client_error(exc: grpc.RpcError) -> ClientError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return ClientError(code, details or "")


class RuntimeClient:
    def __init__(self, channel: grpc.Channel, timeout: float = 10.0) -> None:
        self._stub = pb_grpc.RuntimeServiceStub(channel)
        self._timeout = timeout

    @classmethod
    def connect(
        cls,
        address: str,
        timeout: float = 10.0,
        token: str | None = None,
        tls: ClientTLS | None = None,
    ) -> RuntimeClient:
        """`token` is the service credential; by default the one in STOPLINE_SERVICE_TOKEN."""
        if token is None:
            token = os.environ.get(SERVICE_TOKEN_ENV) or None
        return cls(open_sync_channel(address, token, tls), timeout)

    def _unary(self, method: Callable[..., T], request: Any) -> T:
        try:
            return method(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise _client_error(exc) from exc

    def start(
        self, agent: str, input_value: dict[str, Any], idempotency_key: str = ""
    ) -> pb.StartOperationResponse:
        request = pb.StartOperationRequest(agent=agent, idempotency_key=idempotency_key)
        request.input.update(input_value)
        response: pb.StartOperationResponse = self._unary(self._stub.StartOperation, request)
        return response

    def get(self, operation_id: str) -> op_pb.Operation:
        request = pb.GetOperationRequest(operation_id=operation_id)
        response: pb.GetOperationResponse = self._unary(self._stub.GetOperation, request)
        return response.operation

    def list(
        self,
        status: op_pb.OperationStatus.ValueType = op_pb.OPERATION_STATUS_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
    ) -> pb.ListOperationsResponse:
        request = pb.ListOperationsRequest(
            status=status, page_size=page_size, page_token=page_token
        )
        response: pb.ListOperationsResponse = self._unary(self._stub.ListOperations, request)
        return response

    def interrupt(
        self, operation_id: str, requested_by: str = "", reason: str = ""
    ) -> pb.InterruptOperationResponse:
        request = pb.InterruptOperationRequest(
            operation_id=operation_id, requested_by=requested_by, reason=reason
        )
        response: pb.InterruptOperationResponse = self._unary(
            self._stub.InterruptOperation, request
        )
        return response

    def watch(self, operation_id: str, after_seq: int = 0) -> Iterator[op_pb.Event]:
        """Events after `after_seq` until the terminal one (no deadline: operations are long)."""
        stream = self._stub.WatchOperation(
            pb.WatchOperationRequest(operation_id=operation_id, after_seq=after_seq)
        )
        try:
            for response in stream:
                yield response.event
        except grpc.RpcError as exc:
            raise _client_error(exc) from exc
        finally:
            stream.cancel()  # type: ignore[no-untyped-call]
