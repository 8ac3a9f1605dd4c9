"""The real daemon over real gRPC clients: generation, streaming, cancellation, deadlines, errors, health,
reflection. One daemon process serves the whole module (model load takes ~15-30 s)."""
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from daemon_process import REPO_ROOT, DaemonProcess, http_app_available
from serving.rpc.gen.frugal.v1 import inference_pb2 as pb
from serving.rpc.gen.frugal.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
MAX_MODEL_LEN = 1024


@pytest.fixture(scope="module", params=["native", pytest.param("vllm", marks=pytest.mark.vllm)])
def daemon(tmp_path_factory, request):
    proc = DaemonProcess(tmp_path_factory.mktemp("daemon"), http=http_app_available(),
                         engine={"kv_cache_memory_bytes": "64MiB", "max_model_len": MAX_MODEL_LEN, "max_waiting": 64,
                                 "backend": request.param})
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def channel(daemon):
    with grpc.insecure_channel(daemon.target) as ch:
        yield ch


@pytest.fixture
def stub(channel):
    return pb_grpc.InferenceServiceStub(channel)


@pytest.fixture
def debug(channel):
    return pb_grpc.DebugServiceStub(channel)


def greedy(prompt: str, max_tokens: int = 16, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                        **sampling))


def wait_all_blocks_free(debug, timeout: float = 15.0) -> pb.EngineStats:
    """Polls the stats RPC until no request holds a block (the abort lands at the next step boundary)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = debug.GetEngineStats(pb.GetEngineStatsRequest())
        if stats.num_unfinished == 0 and stats.num_free_blocks == stats.num_total_blocks:
            return stats
        assert time.monotonic() < deadline, f"blocks not returned: {stats}"
        time.sleep(0.05)


def test_health_is_serving(daemon):
    assert daemon.health("") == health_pb2.HealthCheckResponse.SERVING
    assert daemon.health("frugal.v1.InferenceService") == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_services(channel):
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {"frugal.v1.InferenceService", "frugal.v1.DebugService", "grpc.health.v1.Health"} <= services
    assert db.FindFileContainingSymbol("frugal.v1.GenerateRequest").package == "frugal.v1"


def test_list_models(stub, daemon):
    models = stub.ListModels(pb.ListModelsRequest()).models
    assert len(models) == 1 and models[0].max_model_len == MAX_MODEL_LEN and models[0].id


def test_unary_generate_reports_usage_and_request_id(stub):
    resp = stub.Generate(greedy("The capital of France is", max_tokens=8, logprobs=2), timeout=60)
    resp_again = stub.Generate(pb.GenerateRequest(request_id="my-req-1", model=resp.model, prompt="Hi",
                                                  sampling=pb.SamplingParams(max_tokens=2)), timeout=60)
    assert resp.request_id and resp_again.request_id == "my-req-1"
    assert resp.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert resp.usage.completion_tokens == len(resp.token_ids) > 0
    assert resp.usage.prompt_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert len(resp.logprobs) == len(resp.token_ids)
    assert [lp.token_id for lp in resp.logprobs] == list(resp.token_ids)
    assert all(len(lp.top_logprobs) == 2 and lp.logprob <= 0.0 for lp in resp.logprobs)


def test_streaming_equals_unary(stub):
    request = greedy("Explain what a KV cache is.", max_tokens=24)
    unary = stub.Generate(request, timeout=60)
    chunks = list(stub.GenerateStream(request, timeout=60))
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert chunks[-1].finish_reason == unary.finish_reason
    assert not any(c.finish_reason for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == unary.usage.completion_tokens
    assert {c.request_id for c in chunks} == {chunks[0].request_id}


def test_chat_messages_and_stop_string(stub):
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="system", content="You are terse."),
                                     pb.ChatMessage(role="user", content="Count from 1 to 10.")])
    resp = stub.Generate(pb.GenerateRequest(chat=chat, sampling=pb.SamplingParams(max_tokens=40, temperature=0)),
                         timeout=60)
    assert resp.text and resp.usage.prompt_tokens > 10
    stopped = stub.Generate(greedy("1, 2, 3, 4,", max_tokens=30, stop=[" 8,"]), timeout=60)
    assert stopped.finish_reason == pb.FINISH_REASON_STOP and stopped.stop_string == " 8,"
    assert " 8" not in stopped.text


def test_seeded_sampling_is_reproducible(stub):
    request = pb.GenerateRequest(prompt="Once upon a time", priority=pb.PRIORITY_BATCH,
                                 sampling=pb.SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7))
    assert stub.Generate(request, timeout=60).token_ids == stub.Generate(request, timeout=60).token_ids


def test_prefix_cache_hit_shows_in_usage_and_stats(stub, debug):
    # Longer than one KV block of either backend (vLLM's are 128 tokens on CPU).
    prompt = "You are a helpful assistant that answers questions about rivers and lakes. " * 12
    stub.Generate(greedy(prompt, max_tokens=2), timeout=60)
    second = stub.Generate(greedy(prompt, max_tokens=2), timeout=60)
    assert second.usage.cached_tokens >= 16
    assert debug.GetEngineStats(pb.GetEngineStatsRequest()).prefix_cache_hit_rate > 0.0


def test_cancel_mid_stream_frees_blocks(stub, debug):
    call = stub.GenerateStream(greedy("Write a long essay about rivers.", max_tokens=600, ignore_eos=True))
    for _ in range(3):
        next(call)
    busy = debug.GetEngineStats(pb.GetEngineStatsRequest())
    assert busy.num_running == 1 and busy.num_free_blocks < busy.num_total_blocks
    call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        next(call)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    wait_all_blocks_free(debug)


def test_deadline_exceeded_frees_blocks(stub, debug):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(greedy("Write a long essay about lakes.", max_tokens=600, ignore_eos=True), timeout=1.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_all_blocks_free(debug)


@pytest.mark.parametrize("request_kwargs, field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "hi", "sampling": pb.SamplingParams(max_tokens=-5)}, "sampling.max_tokens"),
    ({"prompt": "hi", "sampling": pb.SamplingParams(top_p=1.5)}, "sampling.top_p"),
    ({"prompt": "hi", "sampling": pb.SamplingParams(temperature=-1)}, "sampling.temperature"),
    ({"prompt": "hi", "sampling": pb.SamplingParams(stop_token_ids=[-1])}, "sampling.stop_token_ids"),
    ({"prompt": "hi", "sampling": pb.SamplingParams(logprobs=99)}, "sampling.logprobs"),
    ({"prompt_token_ids": pb.TokenIds(ids=[1] * (MAX_MODEL_LEN + 10))}, "prompt"),
    ({"prompt_token_ids": pb.TokenIds(ids=[10**9])}, "prompt_token_ids must be"),
    ({"chat": pb.ChatMessages()}, "chat.messages"),
    ({}, "input"),
    ({"prompt": "hi", "priority": 42}, "priority"),
])
def test_invalid_argument_names_the_field(stub, request_kwargs, field):
    for method in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as err:
            method(pb.GenerateRequest(**request_kwargs), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()


def test_unknown_model_is_not_found_and_daemon_keeps_serving(stub, debug):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(model="gpt-17", prompt="hi"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "gpt-17" in err.value.details()
    assert stub.Generate(greedy("Hello", max_tokens=2), timeout=60).usage.completion_tokens == 2
    wait_all_blocks_free(debug)


def test_http_api_shares_the_engine(daemon, stub):
    if daemon.http_port is None:
        pytest.skip("serving.http.app is not available")
    import httpx

    model_id = stub.ListModels(pb.ListModelsRequest()).models[0].id
    resp = httpx.get(f"http://127.0.0.1:{daemon.http_port}/v1/models", timeout=30)
    assert resp.status_code == 200 and model_id in resp.text


def test_chat_cli_streams_an_answer(daemon):
    result = subprocess.run([sys.executable, "-m", "serving.cli", "chat", "What is 2 plus 2?", "--target",
                             daemon.target, "--max-tokens", "12"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "tokens, finish:" in result.stderr
