"""`frugal chat`: a small gRPC client for a person at a terminal; streams the answer to stdout."""
from __future__ import annotations

import sys

import grpc

from serving.rpc.gen.frugal.v1 import inference_pb2 as pb
from serving.rpc.gen.frugal.v1 import inference_pb2_grpc as pb_grpc


def chat_request(question: str, system: str | None, max_tokens: int, temperature: float,
                 model: str = "") -> pb.GenerateRequest:
    messages = ([pb.ChatMessage(role="system", content=system)] if system else []) + \
        [pb.ChatMessage(role="user", content=question)]
    return pb.GenerateRequest(model=model, chat=pb.ChatMessages(messages=messages), priority=pb.PRIORITY_INTERACTIVE,
                              sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=temperature))


def stream_chat(target: str, request: pb.GenerateRequest, timeout_s: float | None, out=sys.stdout,
                err=sys.stderr) -> int:
    """Streams one answer to `out`; returns an exit code (0 ok, 1 RPC error, 130 interrupted)."""
    with grpc.insecure_channel(target) as channel:
        call = pb_grpc.InferenceServiceStub(channel).GenerateStream(request, timeout=timeout_s)
        try:
            last = None
            for chunk in call:
                out.write(chunk.text)
                out.flush()
                last = chunk
            out.write("\n")
            if last is not None and last.usage.completion_tokens:
                reason = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
                err.write(f"[{last.usage.completion_tokens} tokens, finish: {reason}]\n")
            return 0
        except KeyboardInterrupt:
            call.cancel()
            out.write("\n")
            return 130
        except grpc.RpcError as e:
            out.write("\n")
            err.write(f"error: {e.code().name}: {e.details()}\n")
            return 1
