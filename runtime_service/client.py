"""A small synchronous client for RuntimeService, used by the `stopline runtime` commands.

Synchronous on purpose: command-line tools have no event loop to share, and grpcio-testing can
drive this code through its fake channel. RPC failures become ClientError with the server's
status code and message, which the CLI prints as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from stopline.v1 import operation_pb2 as op_pb
from stopline.v1 import runtime_service_pb2 as pb
from stopline.v1 import runtime_service_pb2_grpc as pb_grpc


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
    def connect(cls, address: str, timeout: float = 10.0) -> RuntimeClient:
        return cls(grpc.insecure_channel(address), timeout)

    def start(
        self, agent: str, input_value: dict[str, Any], idempotency_key: str = ""
    ) -> pb.StartOperationResponse:
        request = pb.StartOperationRequest(agent=agent, idempotency_key=idempotency_key)
        request.input.update(input_value)
        try:
            response: pb.StartOperationResponse = self._stub.StartOperation(
                request, timeout=self._timeout
            )
        except grpc.RpcError as exc:
            raise _client_error(exc) from exc
        return response

    def get(self, operation_id: str) -> op_pb.Operation:
        try:
            response = self._stub.GetOperation(
                pb.GetOperationRequest(operation_id=operation_id), timeout=self._timeout
            )
        except grpc.RpcError as exc:
            raise _client_error(exc) from exc
        operation: op_pb.Operation = response.operation
        return operation

    def list(
        self,
        status: op_pb.OperationStatus.ValueType = op_pb.OPERATION_STATUS_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
    ) -> pb.ListOperationsResponse:
        try:
            response: pb.ListOperationsResponse = self._stub.ListOperations(
                pb.ListOperationsRequest(status=status, page_size=page_size, page_token=page_token),
                timeout=self._timeout,
            )
        except grpc.RpcError as exc:
            raise _client_error(exc) from exc
        return response

    def interrupt(
        self, operation_id: str, requested_by: str = "", reason: str = ""
    ) -> pb.InterruptOperationResponse:
        try:
            response: pb.InterruptOperationResponse = self._stub.InterruptOperation(
                pb.InterruptOperationRequest(
                    operation_id=operation_id, requested_by=requested_by, reason=reason
                ),
                timeout=self._timeout,
            )
        except grpc.RpcError as exc:
            raise _client_error(exc) from exc
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
