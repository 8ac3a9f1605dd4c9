"""Malformed request messages answered with INVALID_ARGUMENT instead of grpc's UNKNOWN.

grpc turns a request that fails to parse (corrupt wire format, a string field with invalid UTF-8) into UNKNOWN
with the parser's exception text, which tells the client nothing it can act on. `add_guarded` registers a
generated `add_*Servicer_to_server` function's handlers with a deserializer that cannot raise: a message that
does not parse reaches a wrapper that aborts the call with INVALID_ARGUMENT, and the servicer never sees it.
"""
from __future__ import annotations

from typing import Callable

import grpc


class _Malformed:
    def __init__(self, reason: str):
        self.reason = reason  # why the message did not parse


def _lenient(deserialize: Callable) -> Callable:
    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as e:  # protobuf's DecodeError, or anything a parser raises on garbage
            return _Malformed(str(e) or type(e).__name__)
    return parse


def _checked(behavior: Callable) -> Callable:
    async def run(request, context):
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {request.reason}")
        return await behavior(request, context)
    return run


def _guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    if handler.request_streaming:  # no streaming-request methods here; leave them as grpc builds them
        return handler
    if handler.response_streaming:
        return handler._replace(request_deserializer=_lenient(handler.request_deserializer),
                                unary_stream=_checked(handler.unary_stream))
    return handler._replace(request_deserializer=_lenient(handler.request_deserializer),
                            unary_unary=_checked(handler.unary_unary))


class _Registrar:
    """Stands in for the server while a generated function registers its handlers."""

    def __init__(self, server: grpc.aio.Server):
        self.server = server
        self.registered = False

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # the same handlers arrive through add_registered_method_handlers, where they are guarded

    def add_registered_method_handlers(self, service: str, method_handlers: dict) -> None:
        guarded = {name: _guard(handler) for name, handler in method_handlers.items()}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))
        self.server.add_registered_method_handlers(service, guarded)
        self.registered = True


def add_guarded(add_to_server: Callable, servicer, server: grpc.aio.Server) -> None:
    """`add_to_server(servicer, server)` (a generated function), with malformed requests refused cleanly."""
    registrar = _Registrar(server)
    add_to_server(servicer, registrar)
    if not registrar.registered:
        raise RuntimeError(f"{add_to_server.__name__} registered no method handlers; is grpcio older than 1.62?")
