"""Builds the grpc.aio server: the frugal services, the standard health service and server reflection.

Health starts NOT_SERVING; the daemon flips it to SERVING once the model is loaded and warm, and back to
NOT_SERVING for good when it starts draining, so Kubernetes gRPC probes and grpcurl see the truth.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.rpc.gen.frugal.v1 import inference_pb2 as pb
from serving.rpc.gen.frugal.v1 import inference_pb2_grpc as pb_grpc
from serving.rpc.malformed import add_guarded
from serving.rpc.servicer import DebugServicer, InferenceServicer, StateHolder

logger = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
DEBUG_SERVICE = pb.DESCRIPTOR.services_by_name["DebugService"].full_name
_OPTIONS = [
    # NOTE: with SO_REUSEPORT (gRPC's default on Linux) a second daemon would bind the same port silently.
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


@dataclass(slots=True)
class GrpcServer:
    server: grpc.aio.Server  # the running server
    health: health.aio.HealthServicer  # drives SERVING / NOT_SERVING
    holder: StateHolder  # where the servicers find the engine once it is loaded
    port: int  # the bound port (the real one when 0 was asked for)

    async def set_serving(self) -> None:
        for service in ("", INFERENCE_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def set_not_serving(self) -> None:
        """NOT_SERVING for every service (the engine is dead); the daemon exits soon after."""
        for service in ("", INFERENCE_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def enter_drain(self) -> None:
        """NOT_SERVING for every service, for good: later `set` calls are ignored."""
        await self.health.enter_graceful_shutdown()


async def start_grpc_server(host: str, port: int, max_message_bytes: int = 4 << 20) -> GrpcServer:
    """Binds and starts the server, NOT_SERVING until `set_serving`. Raises OSError when the port is taken.
    A request message over `max_message_bytes` is refused by grpc itself with RESOURCE_EXHAUSTED."""
    server = grpc.aio.server(options=[*_OPTIONS, ("grpc.max_receive_message_length", max_message_bytes)])
    holder = StateHolder()
    add_guarded(pb_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(holder), server)
    add_guarded(pb_grpc.add_DebugServiceServicer_to_server, DebugServicer(holder), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", INFERENCE_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (INFERENCE_SERVICE, DEBUG_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"cannot bind gRPC to {address}: {e}") from e
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {address}")
    await server.start()
    logger.info("gRPC listening on %s:%d (NOT_SERVING until the model is warm)", host, bound)
    return GrpcServer(server=server, health=health_servicer, holder=holder, port=bound)
