"""Server reflection that also answers for ``package.Service.Method`` symbols.

grpc-python's reflection servicer looks symbols up with the descriptor pool's
``FindFileContainingSymbol``, which knows messages, enums and services but not
methods (grpc/grpc#34743), so ``grpcurl describe
llamachat.v1.ChatService.ChatStream`` got "Symbol not found". The reflection
protocol allows method symbols; this answers them with the service's file.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc


class MethodAwareReflection(reflection.aio.ReflectionServicer):
    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        service_name, _, method = fully_qualified_name.rpartition(".")
        try:
            service = self._pool.FindServiceByName(service_name)
        except KeyError:
            service = None
        if service is not None and method in service.methods_by_name:
            fully_qualified_name = service_name
        return super()._file_containing_symbol(request, fully_qualified_name)


def enable_server_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        MethodAwareReflection(service_names), server
    )
