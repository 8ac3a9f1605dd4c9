"""Health that tells the truth. A daemon whose engine step hangs (injected) is declared dead by the watchdog
within its configured stall time: gRPC health NOT_SERVING, /readyz and /healthz 503, the stuck request gets
UNAVAILABLE, new requests are refused, and the process exits non-zero so that it is restarted. In-process, the
same for steps that fail one after another and for an engine loop that crashes."""
import asyncio
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2

from daemon_process import DaemonProcess
from serving import SamplingParams
from serving.config import EngineConfig, WatchdogConfig
from serving.engine.async_engine import AsyncLLM, EngineDeadError
from serving.engine.faults import FaultInjector, FaultRule
from serving.engine.llm_engine import LLMEngine
from serving.engine.watchdog import Watchdog
from serving.rpc.gen.frugal.v1 import inference_pb2 as pb
from serving.rpc.gen.frugal.v1 import inference_pb2_grpc as pb_grpc
from support import report

STALL_TIMEOUT_S = 2.0


@pytest.mark.slow
def test_hung_step_turns_health_off_and_the_daemon_exits(tmp_path):
    proc = DaemonProcess(tmp_path, http=True, env={"FRUGAL_FAULTS": "hang=hang-"},
                         engine={"kv_cache_memory_bytes": "32MiB", "max_model_len": 256},
                         watchdog={"stall_timeout_s": STALL_TIMEOUT_S, "interval_s": 0.1, "exit_after_s": 3})
    proc.start()
    http = f"http://127.0.0.1:{proc.http_port}"
    try:
        assert httpx.get(f"{http}/healthz").status_code == 200 and httpx.get(f"{http}/readyz").status_code == 200
        errors = []

        def stuck_call():
            with grpc.insecure_channel(proc.target) as channel:
                try:
                    pb_grpc.InferenceServiceStub(channel).Generate(pb.GenerateRequest(
                        request_id="hang-1", prompt="hello", sampling=pb.SamplingParams(max_tokens=4)), timeout=60)
                except grpc.RpcError as e:
                    errors.append(e)

        caller = threading.Thread(target=stuck_call)
        started = time.monotonic()
        caller.start()
        while proc.health() != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() - started < STALL_TIMEOUT_S + 5, "health still SERVING"
            time.sleep(0.05)
        flagged_s = time.monotonic() - started
        report("watchdog: hung step to NOT_SERVING", f"{flagged_s:.1f} s (stall_timeout_s {STALL_TIMEOUT_S:g})")
        live, ready = httpx.get(f"{http}/healthz"), httpx.get(f"{http}/readyz")
        assert live.status_code == 503 and "stuck" in live.json()["reason"], live.text
        assert ready.status_code == 503 and ready.json()["status"] == "engine_dead"
        caller.join(timeout=30)
        assert errors and errors[0].code() == grpc.StatusCode.UNAVAILABLE, errors
        assert "stuck" in errors[0].details()
        resp = httpx.post(f"{http}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "engine_dead"
        assert proc.proc.wait(timeout=60) == 1, proc.log_tail()
        assert "engine declared dead" in proc.log_tail(20_000)
    finally:
        proc.stop()


@pytest.fixture
def engine(loaded_model):
    return LLMEngine(EngineConfig(kv_cache_memory_bytes=32 << 20, max_model_len=256), loaded=loaded_model)


async def _collect(llm, prompt, req_id, max_tokens=8):
    outs = []
    async for out in llm.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), req_id=req_id):
        outs.append(out)
    return outs


def test_failing_steps_declare_the_engine_dead(engine):
    engine.faults = FaultInjector([FaultRule("step", "bad-")])
    llm = AsyncLLM(engine=engine)
    dog = Watchdog(llm, WatchdogConfig(max_consecutive_failed_steps=3, interval_s=0.02)).start()

    async def run():
        for i in range(3):  # each fails its own step, and the steps fail one after another
            outs = await _collect(llm, "hello", f"bad-{i}")
            assert outs[-1].error.startswith("the engine step running this request failed")
        for _ in range(100):
            if not llm.health().healthy:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(EngineDeadError):
            await _collect(llm, "hello", "good")

    try:
        asyncio.run(run())
        assert llm.health().reason == "3 engine steps failed in a row"
    finally:
        dog.stop()
        llm.shutdown()


def test_one_failed_step_does_not(engine):
    engine.faults = FaultInjector([FaultRule("step", "bad-")])
    llm = AsyncLLM(engine=engine)
    dog = Watchdog(llm, WatchdogConfig(max_consecutive_failed_steps=2, interval_s=0.02)).start()

    async def run():
        assert (await _collect(llm, "hello", "bad-0"))[-1].error is not None
        good = await _collect(llm, "hello", "good")  # a step that works resets the count
        assert good[-1].error is None and len(good[-1].token_ids) == 8
        assert (await _collect(llm, "hello", "bad-1"))[-1].error is not None
        await asyncio.sleep(0.2)

    try:
        asyncio.run(run())
        assert llm.health().healthy
    finally:
        dog.stop()
        llm.shutdown()


def test_a_crashed_loop_fails_open_requests_and_health(engine):
    llm = AsyncLLM(engine=engine)
    dog = Watchdog(llm, WatchdogConfig(interval_s=0.02)).start()
    real_step = engine.step

    def crashing_step():
        if any(r.startswith("crash") for r in engine.tracked_req_ids()):
            raise SystemError("loop bug")  # step() never raises; a bug outside it ends the loop
        return real_step()

    engine.step = crashing_step

    async def run():
        with pytest.raises(EngineDeadError, match="crashed"):
            await _collect(llm, "hello", "crash-1")

    try:
        asyncio.run(run())
        assert not llm.health().healthy and "crashed" in llm.health().reason
        llm.shutdown()  # the loop's last act frees what the engine still held; wait for it
        assert not engine.has_unfinished_requests() and engine.stats().num_free_blocks == engine.num_blocks
    finally:
        dog.stop()
        llm.shutdown()


def test_a_hung_step_fails_the_waiting_clients_at_once(engine):
    engine.faults = FaultInjector([FaultRule("hang", "hang-")], hang_s=30)
    llm = AsyncLLM(engine=engine)
    dog = Watchdog(llm, WatchdogConfig(stall_timeout_s=0.5, interval_s=0.02)).start()

    async def run():
        started = time.monotonic()
        with pytest.raises(EngineDeadError, match="stuck"):
            await asyncio.gather(_collect(llm, "hello", "hang-1"), _collect(llm, "other", "bystander"))
        return time.monotonic() - started

    try:
        assert asyncio.run(run()) < 10
        assert not llm.is_running
    finally:
        dog.stop()
        llm.shutdown()
