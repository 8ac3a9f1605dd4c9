"""The engine on packed weights: the bundled Q4_1 model stays packed under quantization="auto", and its greedy
outputs agree with the same weights dequantized to fp32: exactly on the fp32-activation path ("kernel"),
and above the agreement gate with int8 activations ("w4a8", taken by quant_cpu_path "auto", the default)."""
import os

import pytest
import torch

from serving import LLM, SamplingParams
from serving.config import EngineConfig
from serving.loaders import load_model
from serving.quant import path_gate, quality
from serving.quant.install import quant_summary
from serving.quant.linear import QuantEmbedding, QuantLinear
from kernels.w4a8_cpu import _extension as w4a8_extension
from cpu_builds import require

PROMPTS = [
    "The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village by the sea,",
    "1, 2, 3, 4, 5,", "Translate to French: Good morning, how are you?", "The three laws of thermodynamics are",
    "SELECT name FROM users WHERE", "In 1969, the first humans", "Write a haiku about autumn.",
    "Give me three tips for writing clear emails.", "Explain what a KV cache is.", "The best way to learn Python is",
    "Photosynthesis is the process by which", "Dear hiring manager,", "The stock market crashed in 1929 because",
    "Here is a recipe for pancakes:",
]
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def packed_model():
    return load_model(quantization="auto", quant_cpu_path="kernel")


@pytest.fixture(scope="module")
def w4a8_model(tmp_path_factory):
    require(w4a8_extension)
    os.environ["FRUGAL_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))  # a fresh verdict: measured here
    try:
        return load_model(quantization="auto", quant_cpu_path="auto")
    finally:
        del os.environ["FRUGAL_CACHE_DIR"]


def test_auto_keeps_the_bundled_q4_1_weights_packed(packed_model, loaded_model):
    model = packed_model.model
    layers = [m for m in model.layers.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 4 * packed_model.args.num_layers
    qkv = model.layers[0].self_attn.qkv_proj
    assert (qkv.format, qkv.group_size, qkv.out_features, qkv.in_features) == ("int4", 32, 960, 576)
    # the Q8_0 embedding stays packed too, and the tied lm_head reads the same int8 tensors
    assert isinstance(model.embed_tokens, QuantEmbedding)
    assert model.embed_tokens.source is model.lm_head and model.embed_tokens.weight_nbytes == 0
    assert (model.lm_head.format, model.lm_head.out_features) == ("int8", packed_model.args.vocab_size)
    assert torch.equal(model.embed_tokens(torch.tensor([0, 7, 49151])),
                       loaded_model.model.embed_tokens(torch.tensor([0, 7, 49151])))
    packed, dense = quant_summary(model), quant_summary(loaded_model.model)
    assert packed["total_bytes"] <= 0.35 * dense["total_bytes"]


def test_quantization_field_is_validated():
    with pytest.raises(ValueError, match="quantization must be one of none, auto, int4-g32"):
        EngineConfig(quantization="int3")


def test_packed_greedy_outputs_agree_with_dequantized(packed_model, make_llm, record_property):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    reference = [o.token_ids for o in make_llm().generate(PROMPTS, params)]
    packed_llm = LLM(loaded=packed_model, quantization="auto", kv_cache_memory_bytes=96 << 20, max_model_len=1024)
    packed = [o.token_ids for o in packed_llm.generate(PROMPTS, params)]
    num_same = sum(a == b for ref, out in zip(reference, packed) for a, b in zip(ref, out))
    num_exact = sum(ref == out for ref, out in zip(reference, packed))
    rate = num_same / (len(PROMPTS) * MAX_TOKENS)
    record_property("greedy_agreement", rate)
    print(f"packed vs dequantized: {100 * rate:.1f}% of tokens agree, {num_exact}/{len(PROMPTS)} sequences exact")
    assert rate >= 0.95


def test_cpu_path_auto_takes_int8_activations_where_they_meet_the_gate(w4a8_model, loaded_model, make_llm, record_property):
    model = w4a8_model.model
    assert {m.path for m in model.modules() if isinstance(m, QuantLinear)} == {"w4a8"}
    assert torch.equal(model.embed_tokens(torch.tensor([0, 7, 49151])),
                       loaded_model.model.embed_tokens(torch.tensor([0, 7, 49151])))  # rows read back exactly
    # teacher-forced on the engine's own fp32 continuations of prompts the gate never saw
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    texts = [p + o.text for p, o in zip(PROMPTS, make_llm().generate(PROMPTS, params))]
    report = quality.evaluate(loaded_model.model, model, loaded_model.tokenizer, texts)
    record_property("w4a8_greedy_agreement", report.greedy_agreement)
    print(f"w4a8 against fp32: {report.summary()}")
    assert report.greedy_agreement >= path_gate.MIN_AGREEMENT
    assert report.ppl_increase < 0.01


def test_the_gate_falls_back_to_fp32_activations_below_its_threshold(w4a8_model):
    model = w4a8_model.model
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    x = torch.randn(3, layers[0].in_features)
    before = layers[0](x)
    try:
        agreement = path_gate.gate_w4a8(model, w4a8_model.tokenizer, None, min_agreement=1.01)
        assert path_gate.MIN_AGREEMENT <= agreement < 1.01
        assert {m.path for m in layers} == {"kernel"}
        assert not torch.equal(layers[0](x), before)  # fp32 activations now: no int8 rounding
    finally:
        for layer in layers:
            layer.set_path("w4a8")
    assert torch.equal(layers[0](x), before)


def test_int8_activations_keep_each_request_independent_of_its_batch(w4a8_model):
    """int8 rounding turns a last-bit difference into a different code, and so into a different token, so on
    "w4a8" every token must round the same however it is scheduled: each request's tokens and logprobs equal its
    solo run when it runs again behind its own cached prefix, beside the others, and with its prompt cut into
    small chunks."""
    def make(**kwargs):
        return LLM(loaded=w4a8_model, quantization="auto", kv_cache_memory_bytes=96 << 20, max_model_len=1024,
                   **kwargs)
    llm = make()
    chat = [{"prompt_token_ids": llm.apply_chat_template([{"role": "user", "content": c}], True)}
            for c in ("Write a haiku.", "Name a colour.", "Explain what a KV cache is.")]
    prompts = chat + PROMPTS[:5]
    params = [SamplingParams(max_tokens=16, temperature=0.0, logprobs=2),
              SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=7, logprobs=1)] * 4

    def run(engine, batch):
        return [(o.token_ids, o.logprobs) for o in engine.generate([prompts[i] for i in batch],
                                                                  [params[i] for i in batch])]
    solo = [run(llm, [i])[0] for i in range(len(prompts))]
    assert [run(llm, [i])[0] for i in range(len(prompts))] == solo  # behind their cached prefixes
    assert run(llm, range(len(prompts))) == solo
    assert run(make(max_num_batched_tokens=24, max_num_seqs=8, enable_prefix_caching=False), range(len(prompts))) == solo
