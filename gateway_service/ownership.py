"""Operations belong to the principal that started them; callers only ever reach their own.

Another principal's operation is answered exactly like an unknown id (same NOT_FOUND, same
message; see stopline.errors.operation_not_found), so ids cannot be probed for existence.

Owners never change, so the gateway remembers the owners it has seen (bounded, least recently
used first out). A stop by the owner of an operation this gateway started or streamed therefore
costs no extra runtime read, and still works while the runtime is unreachable (the stop is then
acknowledged and delivered later, as before ownership existed). A stop of an operation whose
owner this gateway has not seen is not preceded by a read either: the runtime checks the owner
in the stop's own write (core.Gateway.stop).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable

from stopline.errors import operation_not_found
from stopline.v1 import operation_pb2 as op_pb


class OwnerCache:
    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._owners: OrderedDict[str, str] = OrderedDict()

    def remember(self, operation: op_pb.Operation) -> None:
        self._owners[operation.id] = operation.owner
        self._owners.move_to_end(operation.id)
        while len(self._owners) > self._capacity:
            self._owners.popitem(last=False)

    def owner(self, operation_id: str) -> str | None:
        owner = self._owners.get(operation_id)
        if owner is not None:
            self._owners.move_to_end(operation_id)
        return owner

    def check(self, operation: op_pb.Operation, principal: str) -> op_pb.Operation:
        """`operation` if it is the principal's, else the unknown-id NOT_FOUND."""
        self.remember(operation)
        if operation.owner != principal:
            raise operation_not_found(operation.id)
        return operation

    async def require(
        self,
        operation_id: str,
        principal: str,
        fetch: Callable[[str], Awaitable[op_pb.Operation]],
    ) -> None:
        """Raise the unknown-id NOT_FOUND unless the principal owns the operation; reads the
        runtime (`fetch`) only for an owner not seen before."""
        owner = self.owner(operation_id)
        if owner is None:
            self.check(await fetch(operation_id), principal)
        elif owner != principal:
            raise operation_not_found(operation_id)
