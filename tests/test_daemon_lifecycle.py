"""The daemon under pressure and at the end of its life: a full waiting queue is refused with
RESOURCE_EXHAUSTED and a retry hint, and SIGTERM drains (in-flight work finishes, new calls are refused,
exit 0). One small daemon (one sequence at a time, one waiting slot) serves the module; the drain test ends it,
so it runs last."""
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2

from daemon_process import DaemonProcess, http_app_available
from serving.rpc.gen.frugal.v1 import inference_pb2 as pb
from serving.rpc.gen.frugal.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    proc = DaemonProcess(tmp_path_factory.mktemp("small-daemon"), http=http_app_available(), drain_grace_s=60,
                         retry_after_ms=250, engine={"kv_cache_memory_bytes": "48MiB", "max_model_len": 1024,
                                                     "max_num_seqs": 1, "max_waiting": 1})
    proc.start()
    yield proc
    proc.stop()


def long_request(max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt="Tell me a story.", sampling=pb.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def test_full_queue_is_resource_exhausted_with_retry_hint(daemon):
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)

        def call(_):
            try:
                return stub.Generate(long_request(24), timeout=120)
            except grpc.RpcError as e:
                return e

        # One runs, one waits, the rest find the queue full: they arrive within the first one's 24 steps.
        with ThreadPoolExecutor(5) as pool:
            results = list(pool.map(call, range(5)))
        refused = [r for r in results if isinstance(r, grpc.RpcError)]
        served = [r for r in results if not isinstance(r, grpc.RpcError)]
        assert refused and served
        for err in refused:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
            assert "retry" in err.details()
            assert dict(err.trailing_metadata())["retry-after-ms"] == "250"
        assert all(r.usage.completion_tokens == 24 for r in served)
        stats = pb_grpc.DebugServiceStub(channel).GetEngineStats(pb.GetEngineStatsRequest())
        assert stats.num_waiting == 0 and stats.max_waiting == 1
        assert stub.Generate(long_request(2), timeout=60).usage.completion_tokens == 2


def test_sigterm_drains_in_flight_and_refuses_new_calls(daemon):
    with grpc.insecure_channel(daemon.target) as channel:
        stream = pb_grpc.InferenceServiceStub(channel).GenerateStream(long_request(64), timeout=120)
        chunks = [next(stream), next(stream)]
        daemon.terminate()
        # While the stream still runs: health turns NOT_SERVING (once the signal lands) and new calls are refused.
        deadline = time.monotonic() + 10
        while daemon.health("") != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health still SERVING after SIGTERM"
            time.sleep(0.02)
        with grpc.insecure_channel(daemon.target) as fresh:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.InferenceServiceStub(fresh).Generate(long_request(2), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        if daemon.http_port is not None:
            import httpx

            resp = httpx.post(f"http://127.0.0.1:{daemon.http_port}/v1/completions", timeout=30,
                              json={"prompt": "hi", "max_tokens": 2})
            assert resp.status_code == 503
            # Kubernetes: readiness fails first (the pod leaves the endpoints), liveness holds (no restart).
            assert httpx.get(f"http://127.0.0.1:{daemon.http_port}/readyz", timeout=10).status_code == 503
            assert httpx.get(f"http://127.0.0.1:{daemon.http_port}/healthz", timeout=10).status_code == 200
        chunks += list(stream)
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert sum(len(c.token_ids) for c in chunks) == 64 == chunks[-1].usage.completion_tokens
    assert daemon.proc.wait(timeout=60) == 0, daemon.log_tail()
    assert "drained" in daemon.log_tail()
