"""Greedy outputs of the engine are token-exact against transformers on the same GGUF weights (fp32).

16 prompts of varied lengths run concurrently through the scheduler under four regimes: plain, prefix caching
with a warm cache, chunked prefill forced by a tiny token budget, and preemption forced by a tiny block pool.
The reference runs each prompt alone through transformers' `generate`.
"""
import pytest
import torch

from serving import SamplingParams

MAX_TOKENS = 24

_SYSTEM = ("You are a careful assistant for a logistics company. Answer briefly, cite the policy section you rely "
           "on, and never invent tracking numbers. Policies: refunds within 30 days; express shipping is "
           "non-refundable; damaged goods are replaced at no cost when reported within 7 days.")
_QUESTIONS = ["Can I get a refund after 20 days?", "Is express shipping refundable?",
              "My parcel arrived damaged yesterday. What now?", "What is your tracking number format?"]
_RAW = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "1, 2, 3, 4, 5,",
    "Translate to French: Good morning, how are you?",
    "The three laws of thermodynamics are",
    "SELECT name FROM users WHERE",
    "In 1969, the first humans",
]


def _prompts(tokenizer) -> list[list[int]]:
    chats = []
    for q in _QUESTIONS:
        messages = [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": q}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        chats.append(list(tokenizer(text, add_special_tokens=False).input_ids))
    raw = [list(tokenizer(p).input_ids) for p in _RAW]
    long_text = " ".join(["The history of computing spans abacus, mechanical calculators, and the transistor."] * 12)
    longs = [list(tokenizer(long_text + f" Chapter {i}: the").input_ids) for i in range(4)]
    return chats + raw + longs


@pytest.fixture(scope="module")
def prompts(loaded_model):
    p = _prompts(loaded_model.tokenizer)
    assert len(p) == 16 and max(map(len, p)) > 150 and min(map(len, p)) < 10
    return p


@pytest.fixture(scope="module")
def reference(prompts, hf_model, loaded_model):
    eos = loaded_model.args.eos_token_ids
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            gen = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
            outs.append(gen[0, len(ids):].tolist())
    return outs


def _greedy():
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)


def _check(outs, reference):
    mismatches = [(i, o.token_ids, ref) for i, (o, ref) in enumerate(zip(outs, reference)) if o.token_ids != ref]
    assert not mismatches, f"{len(mismatches)} of {len(reference)} prompts differ: {mismatches[:2]}"


def test_greedy_matches_transformers(make_llm, prompts, reference):
    llm = make_llm(enable_prefix_caching=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy())
    _check(outs, reference)
    assert all(o.finish_reason in ("stop", "length") for o in outs)


def test_prefix_caching_matches_transformers(make_llm, prompts, reference):
    llm = make_llm(enable_prefix_caching=True)
    first = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy())
    _check(first, reference)
    # Second pass: every prompt's full blocks are cached now (its own and the shared system prompt).
    second = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy())
    _check(second, reference)
    assert sum(o.num_cached_tokens for o in second) > sum(len(p) for p in prompts) // 2
    stats = llm.engine.stats()
    assert stats.prefix_cache_hits > 0


def test_chunked_prefill_matches_transformers(make_llm, prompts, reference):
    llm = make_llm(enable_prefix_caching=False, max_num_batched_tokens=16, max_num_seqs=16)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy())
    _check(outs, reference)
    records = list(llm.engine.step_records)
    assert max(r.num_tokens for r in records) <= 16
    assert max(map(len, prompts)) > 16  # so the long prompts really ran in chunks


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preemption_matches_transformers(make_llm, loaded_model, prompts, reference, prefix_caching):
    # 40 blocks of 16 tokens hold far less than 16 prompts plus their outputs: the scheduler must preempt.
    from serving.engine.model_runner import kv_bytes_per_block

    per_block = kv_bytes_per_block(loaded_model.args, 16, torch.float32)
    llm = make_llm(enable_prefix_caching=prefix_caching, max_model_len=512, kv_cache_memory_bytes=40 * per_block)
    assert llm.engine.num_blocks == 40
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy())
    _check(outs, reference)
    assert llm.engine.stats().num_preemptions > 0
    assert sum(o.metrics.num_preemptions for o in outs) > 0
