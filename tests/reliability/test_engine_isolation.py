"""The engine alone, in-process: a refused request leaves nothing behind (atomic admission), and a fault in one
request's own work fails that request alone while its batch-mates finish exactly as in their solo runs."""
import pytest

from scheduler import QueueFullError
from serving import SamplingParams
from serving.config import EngineConfig
from serving.engine.faults import FaultInjector, FaultRule
from serving.engine.llm_engine import LLMEngine

PROMPTS = ["Tell me about the moon.", "def fibonacci(n):", "Les fleurs du mal est", "List three colours:"]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0)
SEEDED = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=11, logprobs=2)


@pytest.fixture
def engine(loaded_model):
    return LLMEngine(EngineConfig(kv_cache_memory_bytes=32 << 20, max_model_len=256), loaded=loaded_model)


def run_all(engine) -> dict:
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.req_id] = out
        check_consistent(engine)
    return finals


def check_consistent(engine) -> None:
    """The engine tracks exactly the requests the scheduler holds."""
    assert engine.tracked_req_ids() == set(engine.scheduler.requests)


def solo(engine, prompt, params):
    engine.add_request(prompt, params, req_id="solo")
    out = run_all(engine)["solo"]
    return out.token_ids, out.text, out.logprobs


def assert_logprobs_close(rows, reference_rows) -> None:
    """Same tokens and alternatives; values equal up to float rounding (a batch of several rows takes another
    matmul blocking than one row alone)."""
    if reference_rows is None:
        assert rows is None
        return
    assert [[t for t, _ in row] for row in rows] == [[t for t, _ in row] for row in reference_rows]
    assert [lp for row in rows for _, lp in row] == pytest.approx([lp for row in reference_rows for _, lp in row],
                                                                  abs=1e-4)


def assert_empty(engine) -> None:
    check_consistent(engine)
    assert not engine.has_unfinished_requests()
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks and stats.num_running == stats.num_waiting == 0


@pytest.mark.parametrize("prompt, params, message", [
    ("hi", dict(seed=2**70), "seed must be an integer"),
    ("hi", dict(seed=-(2**63) - 1), "seed must be an integer"),
    ("hi", dict(stop_token_ids=[10**9], min_tokens=4), "stop_token_ids must be token ids"),
    ("hi", dict(stop_token_ids=[True]), "stop_token_ids must be non-negative integers"),
    ("hi", dict(temperature=float("nan")), "temperature must be a finite number"),
    ("hi", dict(temperature=float("inf")), "temperature must be a finite number"),
    ("hi", dict(top_p=float("nan")), "top_p must be in (0, 1]"),
    ("hi", dict(max_tokens=True), "max_tokens must be an integer"),
    ("hi", dict(ignore_eos="yes"), "ignore_eos must be true or false"),
    ("hi", dict(logprobs=21), "logprobs must be an integer in [0, 20]"),
    ([1, 10**9], {}, "prompt_token_ids must be integers"),
    ([1, -1], {}, "prompt_token_ids must be integers"),
    ([1, True], {}, "prompt_token_ids must be integers"),
    ({"prompt_token_ids": "abc"}, {}, "prompt_token_ids must be a list"),
    ("", {}, "prompt must not be empty"),
    (list(range(1, 300)), {}, "prompt has 299 tokens but the context length is 256"),
])
def test_a_refused_request_leaves_nothing_behind(engine, prompt, params, message):
    reference = solo(engine, PROMPTS[0], GREEDY)
    with pytest.raises(ValueError) as err:
        engine.add_request(prompt, SamplingParams(**params) if params else GREEDY, req_id="bad")
    assert str(err.value).startswith(message), err.value
    assert_empty(engine)
    assert solo(engine, PROMPTS[0], GREEDY) == reference  # the id "bad" and every block are free again
    engine.add_request(PROMPTS[1], GREEDY, req_id="bad")
    run_all(engine)
    assert_empty(engine)


def test_a_full_queue_leaves_nothing_behind(loaded_model):
    engine = LLMEngine(EngineConfig(kv_cache_memory_bytes=32 << 20, max_model_len=256, max_waiting=8),
                       loaded=loaded_model)
    for i in range(8):
        engine.add_request(PROMPTS[i % 4], GREEDY, req_id=f"r{i}")
    with pytest.raises(QueueFullError):
        engine.add_request(PROMPTS[0], GREEDY, req_id="one-too-many")
    check_consistent(engine)
    assert "one-too-many" not in engine.tracked_req_ids()
    assert len(run_all(engine)) == 8
    assert_empty(engine)


@pytest.mark.parametrize("point, prefix, error", [
    ("sample", "poison-", "sampling failed for this request (InjectedFault)"),
    ("detokenize", "poison-", "detokenizing failed for this request (InjectedFault)"),
])
def test_a_fault_in_one_request_fails_it_alone(engine, point, prefix, error):
    references = [solo(engine, p, params) for p in PROMPTS for params in (GREEDY, SEEDED)]
    engine.faults = FaultInjector([FaultRule(point, prefix)])
    req_ids = []
    for i, prompt in enumerate(PROMPTS):
        for j, params in enumerate((GREEDY, SEEDED)):
            req_ids.append(engine.add_request(prompt, params, req_id=f"honest-{i}-{j}"))
        engine.add_request(prompt, SEEDED, req_id=f"{prefix}{i}")  # in the same batches as the honest ones
    finals = run_all(engine)
    for req_id, reference in zip(req_ids, references):
        out = finals[req_id]
        assert out.error is None and (out.token_ids, out.text) == reference[:2], req_id
        assert_logprobs_close(out.logprobs, reference[2])
    for i in range(len(PROMPTS)):
        poison = finals[f"{prefix}{i}"]
        assert poison.finish_reason == "abort" and poison.error == error
    assert engine.stats().steps.num_failed_requests == len(PROMPTS)
    assert engine.stats().steps.num_failed_steps == 0
    assert_empty(engine)


def test_a_failed_step_fails_its_requests_without_anyone_elses_data(engine):
    engine.faults = FaultInjector([FaultRule("step", "poison-")])
    long = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    engine.add_request(PROMPTS[0], long, req_id="honest-early")
    engine.step()  # prefill: the honest request now decodes
    engine.add_request("secret prompt of another tenant", GREEDY, req_id="poison-1")
    outs = {o.req_id: o for o in engine.step()}
    assert set(outs) == {"honest-early", "poison-1"}
    for out in outs.values():
        assert out.finish_reason == "abort" and out.error.startswith("the engine step running this request failed")
        assert "secret" not in out.error and "poison" not in out.error
    assert engine.stats().steps.num_consecutive_failed_steps == 1
    assert_empty(engine)
    assert solo(engine, PROMPTS[1], GREEDY)[0]  # the next request runs, and the count resets
    assert engine.stats().steps.num_consecutive_failed_steps == 0


def test_a_failing_scheduler_fails_no_request(engine):
    engine.add_request(PROMPTS[0], GREEDY, req_id="a")
    real = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: (_ for _ in ()).throw(RuntimeError("scheduler bug"))
    assert engine.step() == []
    assert engine.stats().steps.num_consecutive_failed_steps == 1
    engine.scheduler.schedule = real
    assert run_all(engine)["a"].error is None
    assert_empty(engine)


def test_the_offline_llm_gives_up_on_an_engine_that_fails_every_step(make_llm):
    llm = make_llm()
    llm.engine.scheduler.schedule = lambda: (_ for _ in ()).throw(RuntimeError("scheduler bug"))
    with pytest.raises(RuntimeError, match="failed 5 steps in a row"):
        llm.generate("hi", GREEDY)
    assert not llm.engine.has_unfinished_requests()
