"""A client that gives up while its request is still on the way into the engine (a gRPC deadline or cancel
landing during submission) must neither kill the engine thread nor leave an orphan request holding KV blocks.

A fake engine whose step and add block on events makes the races deterministic, without a model."""
import asyncio
import threading
import time

from serving.engine.async_engine import AsyncLLM
from serving.engine.outputs import RequestOutput


class GatedEngine:
    """The LLMEngine surface AsyncLLM uses; `step` and `add_request` wait while the test holds their gates."""

    tokenizer = None
    faults = None
    last_step_num_tokens = 1

    def __init__(self) -> None:
        self.tracked: dict[str, int] = {}  # req_id -> tokens generated
        self.in_step, self.open_steps = threading.Event(), threading.Event()
        self.in_add, self.release_add = threading.Event(), threading.Event()
        self.release_add.set()
        self.added: list[str] = []  # every req_id ever queued

    def add_request(self, prompt, params, req_id, **kwargs):
        self.in_add.set()
        self.release_add.wait()
        if req_id in self.tracked:
            raise ValueError(f"request id {req_id!r} is already in use")
        self.tracked[req_id] = 0
        self.added.append(req_id)
        return req_id

    def abort_request(self, req_id):
        if self.tracked.pop(req_id, None) is None:
            return None
        return RequestOutput(req_id=req_id, prompt=None, prompt_token_ids=[1], finished=True, finish_reason="abort")

    def abort_all(self, error=None):
        return [self.abort_request(r) for r in list(self.tracked)]

    def has_unfinished_requests(self) -> bool:
        return bool(self.tracked)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.tracked)

    def close(self) -> None:  # nothing to release: no publisher, no model
        pass

    def step(self):
        self.in_step.set()
        self.open_steps.wait()
        time.sleep(0.001)
        return [RequestOutput(req_id=r, prompt=None, prompt_token_ids=[1], token_ids=[5], delta_token_ids=[5])
                for r in self.tracked]


async def _consume(llm, req_id):
    async for _ in llm.generate("x", None, req_id=req_id):
        pass


async def _until(flag: threading.Event):
    while not flag.is_set():
        await asyncio.sleep(0.005)


async def _settle(engine):
    """Lets cancellations land, opens the step gate, and gives the engine thread time to run the commands."""
    await asyncio.sleep(0.05)
    engine.open_steps.set()
    await asyncio.sleep(0.2)


def test_cancel_before_the_add_runs_drops_the_request():
    engine = GatedEngine()
    llm = AsyncLLM(engine=engine)

    async def run():
        busy = asyncio.create_task(_consume(llm, "busy"))
        await _until(engine.in_step)  # the engine thread is inside a step: new commands wait
        late = asyncio.create_task(_consume(llm, "late"))
        await asyncio.sleep(0.05)
        late.cancel()
        await _settle(engine)
        assert llm.is_running, "the engine thread died"
        assert "late" not in engine.added
        busy.cancel()
        await _settle(engine)

    try:
        asyncio.run(run())
        assert engine.tracked == {}
    finally:
        engine.open_steps.set()
        llm.shutdown()


def test_cancel_while_the_add_runs_aborts_what_it_queued():
    engine = GatedEngine()
    llm = AsyncLLM(engine=engine)

    async def run():
        engine.release_add.clear()
        task = asyncio.create_task(_consume(llm, "mid"))
        await _until(engine.in_add)  # the add is running in the engine thread
        task.cancel()
        await asyncio.sleep(0.05)
        engine.release_add.set()
        await _settle(engine)
        assert llm.is_running and engine.added == ["mid"]
        assert engine.tracked == {}, "the cancelled request was left running"

    try:
        asyncio.run(run())
    finally:
        engine.open_steps.set()
        llm.shutdown()


def test_refused_duplicate_id_does_not_abort_the_holder():
    engine = GatedEngine()
    engine.open_steps.set()
    llm = AsyncLLM(engine=engine)

    async def run():
        holder = asyncio.create_task(_consume(llm, "same"))
        await _until(engine.in_step)
        try:
            await _consume(llm, "same")
        except ValueError as e:
            assert "already in use" in str(e)
        else:
            raise AssertionError("the duplicate id was accepted")
        await _settle(engine)
        assert "same" in engine.tracked, "the duplicate's cleanup aborted the first request"
        holder.cancel()
        await _settle(engine)
        assert engine.tracked == {}

    try:
        asyncio.run(run())
    finally:
        llm.shutdown()
