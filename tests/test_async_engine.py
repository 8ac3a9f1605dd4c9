"""The async engine: streaming, abort, errors, and the loop surviving bad requests."""
import asyncio

import pytest

from serving import SamplingParams
from serving.engine.async_engine import AsyncLLM
from serving.engine.llm_engine import LLMEngine
from serving.config import EngineConfig


@pytest.fixture
def async_llm(loaded_model):
    engine = LLMEngine(EngineConfig(kv_cache_memory_bytes=96 << 20, max_model_len=1024), loaded=loaded_model)
    llm = AsyncLLM(engine=engine)
    yield llm
    llm.shutdown()


async def _collect(llm, prompt, params, **kw):
    outs = []
    async for out in llm.generate(prompt, params, **kw):
        outs.append(out)
    return outs


def test_streaming_equals_offline(async_llm, make_llm):
    params = SamplingParams(max_tokens=32, temperature=0)
    prompts = ["Tell me about the moon.", "def add(a, b):", "Les fleurs du"]

    async def run():
        return await asyncio.gather(*(_collect(async_llm, p, params) for p in prompts))

    streams = asyncio.run(run())
    offline = make_llm().generate(prompts, params)
    for outs, ref in zip(streams, offline):
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert "".join(o.delta_text for o in outs) == ref.text == outs[-1].text
        assert [t for o in outs for t in o.delta_token_ids] == ref.token_ids


def test_streaming_holds_back_stop_strings(async_llm):
    async def run():
        return await _collect(async_llm, "1, 2, 3, 4,", SamplingParams(max_tokens=30, temperature=0, stop=[" 8,"]))

    outs = asyncio.run(run())
    text = "".join(o.delta_text for o in outs)
    assert " 8" not in text and text == outs[-1].text and outs[-1].finish_reason == "stop"


def test_abort_mid_stream_frees_blocks(async_llm):
    engine = async_llm.engine

    async def run():
        got = 0
        gen = async_llm.generate("Write a long essay about rivers.", SamplingParams(max_tokens=500, ignore_eos=True))
        async for _ in gen:
            got += 1
            if got == 3:
                break
        await gen.aclose()
        # The abort travels through the command queue; wait for the loop to apply it.
        for _ in range(200):
            if not engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        return got

    assert asyncio.run(run()) == 3
    assert not engine.has_unfinished_requests()
    assert engine.stats().num_free_blocks == engine.num_blocks


def test_explicit_abort_returns_abort_reason(async_llm):
    async def run():
        outs = []
        async for out in async_llm.generate("Count forever:", SamplingParams(max_tokens=500, ignore_eos=True),
                                            req_id="victim"):
            outs.append(out)
            if len(outs) == 2:
                await async_llm.abort("victim")
        return outs

    outs = asyncio.run(run())
    assert outs[-1].finished and outs[-1].finish_reason == "abort"


def test_bad_request_does_not_disturb_others(async_llm):
    async def bad():
        return await _collect(async_llm, "", SamplingParams(max_tokens=4))

    async def run():
        good = asyncio.create_task(_collect(async_llm, "Hello there", SamplingParams(max_tokens=8, temperature=0)))
        with pytest.raises(ValueError, match="prompt must not be empty"):
            await bad()
        with pytest.raises(ValueError, match="already in use"):
            await asyncio.gather(_collect(async_llm, "a", SamplingParams(max_tokens=50), req_id="dup"),
                                 _collect(async_llm, "b", SamplingParams(max_tokens=50), req_id="dup"))
        return await good

    outs = asyncio.run(run())
    assert outs[-1].finished and len(outs[-1].token_ids) == 8
