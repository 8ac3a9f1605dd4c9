"""Gemma 3 (serving/models/gemma3.py): greedy outputs token-exact against transformers' Gemma3ForCausalLM.

1. A tiny random Gemma 3 (local and global layers, a sliding window of 8 tokens, QK-norm with random norm weights,
   linear rope scaling on the global layers, a query scale that is not head_dim, with and without final logit
   softcapping) saved as an HF safetensors
   directory, run through the engine (batched, paged KV cache, prefix caching, chunked prefill) on prompts
   longer than the window.
2. The bundled Gemma 3 270M Q4_K_M GGUF against transformers loading the same file (fp32), including a prompt
   longer than its 512-token window (slow).
"""
import os

import pytest
import torch

from serving import SamplingParams
from serving.loaders import CheckpointError, gemma3_model_path, load_model
from serving.models.gemma3 import FULL, SLIDING, Gemma3ForCausalLM

WINDOW = 8
LAYER_TYPES = [SLIDING, SLIDING, FULL, SLIDING, FULL]
MAX_TOKENS = 12


def _tiny_gemma(model_dir, **overrides):
    """A random Gemma3ForCausalLM saved to `model_dir` with a word-level tokenizer; returns the HF model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma3ForCausalLM as HFGemma3, Gemma3TextConfig, PreTrainedTokenizerFast

    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=len(LAYER_TYPES),
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  sliding_window=WINDOW, layer_types=LAYER_TYPES, query_pre_attn_scalar=24,
                  rope_parameters={FULL: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                                   SLIDING: {"rope_type": "default", "rope_theta": 10_000.0}},
                  initializer_range=0.08, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    kwargs.update(overrides)
    config = Gemma3TextConfig(**kwargs)
    torch.manual_seed(0)
    model = HFGemma3(config).eval()
    with torch.no_grad():  # Gemma's norms start at w = 0 (scale 1): random ones check the (1 + w) handling
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.3)
    model.save_pretrained(model_dir, safe_serialization=True)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t2", eos_token="t1").save_pretrained(model_dir)
    return model


def _hf_greedy(hf, prompts, eos_ids, max_tokens):
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            gen = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos_ids,
                              pad_token_id=eos_ids[0])
            outs.append(gen[0, len(ids):].tolist())
    return outs


def _check(outs, reference):
    mismatches = [(i, o.token_ids, ref) for i, (o, ref) in enumerate(zip(outs, reference)) if o.token_ids != ref]
    assert not mismatches, f"{len(mismatches)} of {len(reference)} prompts differ: {mismatches[:2]}"


def _tiny_prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    shared = torch.randint(4, 128, (13,), generator=gen).tolist()  # a shared prefix longer than the window
    prompts = [shared + torch.randint(4, 128, (n,), generator=gen).tolist() for n in (3, 9, 20)]
    prompts += [torch.randint(4, 128, (n,), generator=gen).tolist() for n in (5, 11, 30, 47)]
    return prompts


@pytest.fixture(scope="module", params=["plain", "softcapped"])
def tiny(request, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp(f"gemma3_{request.param}")
    overrides = {}
    if request.param == "softcapped":
        overrides = dict(final_logit_softcapping=6.0)
    hf = _tiny_gemma(model_dir, **overrides)
    loaded = load_model(str(model_dir), quantization="none")
    prompts = _tiny_prompts()
    return loaded, hf, prompts, _hf_greedy(hf, prompts, loaded.args.eos_token_ids, MAX_TOKENS)


def test_tiny_config_is_read(tiny):
    loaded, hf, _, _ = tiny
    args = loaded.args
    assert isinstance(loaded.model, Gemma3ForCausalLM)
    assert args.layer_types == LAYER_TYPES and args.sliding_window == WINDOW
    assert args.rope_scaling == {"rope_type": "linear", "factor": 2.0} and args.rope_local_theta == 10_000.0
    assert args.query_pre_attn_scalar == 24 and args.tie_word_embeddings
    assert args.final_logit_softcapping == hf.config.final_logit_softcapping


def test_tiny_logits_match_transformers(tiny):
    from scheduler.output import ScheduledSeq
    from serving.engine.model_runner import ModelRunner

    loaded, hf, prompts, _ = tiny
    ids = prompts[-1]  # 47 tokens: most queries see only their window in the local layers
    runner = ModelRunner(loaded.model, num_blocks=16, block_size=4, device=torch.device("cpu"),
                         kv_dtype=torch.float32)
    input_ids, meta, _ = runner.build_batch([ScheduledSeq("r", ids, 0, list(range(16)), True)])
    meta.logits_indices = torch.arange(len(ids))
    with torch.inference_mode():
        ours = loaded.model.compute_logits(loaded.model(input_ids, meta, runner.kv_caches))
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("regime", ["prefix_caching", "chunked_prefill"])
def test_tiny_engine_greedy_matches_transformers(tiny, regime):
    from serving import LLM

    loaded, _, prompts, reference = tiny
    assert max(map(len, prompts)) > 4 * WINDOW and min(map(len, prompts)) < WINDOW
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    batch = [{"prompt_token_ids": p} for p in prompts]
    if regime == "prefix_caching":
        llm = LLM(loaded=loaded, quantization="none", block_size=4, max_model_len=128,
                  kv_cache_memory_bytes=4 << 20, enable_prefix_caching=True)
        _check(llm.generate(batch, greedy), reference)
        second = llm.generate(batch, greedy)  # every prompt's full blocks are cached now
        _check(second, reference)
        assert sum(o.num_cached_tokens for o in second) > sum(map(len, prompts)) // 2
    else:
        llm = LLM(loaded=loaded, quantization="none", block_size=4, max_model_len=128,
                  kv_cache_memory_bytes=4 << 20, enable_prefix_caching=True, max_num_batched_tokens=8, max_num_seqs=8)
        _check(llm.generate(batch, greedy), reference)
        assert max(r.num_tokens for r in llm.engine.step_records) <= 8


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("window", [None, 1, 5, 16])
def test_windowed_paged_attention_matches_reference(window, softcap):
    """Decodes and prefill chunks (fresh and behind a cached prefix) with a sliding window against the naive
    reference; decodes longer than the window take the torch path, shorter ones may take the CPU kernel."""
    from kernels.paged_attention import paged_attention, paged_attention_ref, write_kv
    from scheduler.output import ScheduledSeq
    from serving.engine.model_runner import ModelRunner

    torch.manual_seed(0)
    num_heads, num_kv_heads, head_dim, block_size = 4, 2, 8, 4
    # decodes first (context 3 and 23), then a fresh 13-token prompt and a 6-token chunk behind 9 cached tokens
    seqs = [ScheduledSeq("a", [0], 2, [5], True), ScheduledSeq("b", [0], 22, [1, 2, 3, 4, 6, 7], True),
            ScheduledSeq("c", [0] * 13, 0, [8, 9, 10, 11], True), ScheduledSeq("d", [0] * 6, 9, [12, 13, 14, 15], True)]
    runner = ModelRunner.__new__(ModelRunner)
    runner.block_size, runner.device = block_size, torch.device("cpu")
    _, meta, _ = runner.build_batch(seqs)
    num_tokens = sum(s.num_tokens for s in seqs)
    k_cache = torch.randn(16, block_size, num_kv_heads, head_dim)
    v_cache = torch.randn(16, block_size, num_kv_heads, head_dim)
    q = torch.randn(num_tokens, num_heads, head_dim)
    k, v = torch.randn(num_tokens, num_kv_heads, head_dim), torch.randn(num_tokens, num_kv_heads, head_dim)
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = paged_attention(q, k, v, k_cache, v_cache, meta, 0.3, sliding_window=window, softcap=softcap)
    ref = paged_attention_ref(q, k_cache, v_cache, [s.block_ids for s in seqs], [s.start_pos for s in seqs],
                              [s.num_tokens for s in seqs], 0.3, sliding_window=window, softcap=softcap)
    assert out.isfinite().all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_unsupported_gemma3_config_is_refused(tmp_path):
    _tiny_gemma(tmp_path, hidden_activation="gelu")
    with pytest.raises(CheckpointError, match="hidden_activation"):
        load_model(str(tmp_path))


# -- the bundled Gemma 3 270M (GGUF Q4_K_M) --

REAL_MAX_TOKENS = 16
_REAL_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village by the sea,"]


@pytest.fixture(scope="module")
def real():
    from transformers import AutoModelForCausalLM

    path = gemma3_model_path()
    loaded = load_model(path, quantization="none")
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    return loaded, hf


@pytest.mark.slow
def test_real_gemma3_270m_matches_transformers(real):
    from serving import LLM

    loaded, hf = real
    args = loaded.args
    assert args.arch == "gemma3" and args.sliding_window == 512 and args.layer_types.count(FULL) == 3
    assert hf.config.layer_types == args.layer_types and hf.config.sliding_window == args.sliding_window
    tok = loaded.tokenizer
    prompts = [list(tok(p).input_ids) for p in _REAL_PROMPTS]
    story = ("The lighthouse keeper wrote in his log every evening: the weather, the ships that passed, the "
             "birds on the rocks, and the small repairs the old tower always needed. ")
    long_ids = list(tok(story * 20 + "On the last page of the log he wrote").input_ids)
    assert 560 < len(long_ids) < 700, len(long_ids)  # longer than the 512-token window
    prompts.append(long_ids)
    reference = _hf_greedy(hf, prompts, args.eos_token_ids, REAL_MAX_TOKENS)
    llm = LLM(loaded=loaded, quantization="none", max_model_len=1024, kv_cache_memory_bytes=64 << 20,
              enable_prefix_caching=True)
    greedy = SamplingParams(max_tokens=REAL_MAX_TOKENS, temperature=0.0)
    _check(llm.generate([{"prompt_token_ids": p} for p in prompts], greedy), reference)


def _write_tiny_gemma_gguf(path, hf, extra_key: str | None = None):
    """`hf` as llama.cpp's converter writes a gemma3 GGUF: norm weights stored as 1 + w, no Q/K permutation,
    no key for the layer pattern (every 6th layer global), the local rope base or the query scale."""
    import gguf
    import numpy as np

    cfg = hf.config
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters[FULL]["rope_theta"])
    writer.add_sliding_window(cfg.sliding_window)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_eos_token_id(1)
    if extra_key is not None:
        writer.add_uint32(extra_key, 1)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"] + 1)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for src, dst in names.items():
            tensor = sd[f"model.layers.{i}.{src}.weight"]
            writer.add_tensor(f"blk.{i}.{dst}.weight", tensor + 1 if "norm" in src else tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_tiny_hf(model_dir):
    return _tiny_gemma(model_dir, num_hidden_layers=6, layer_types=None, query_pre_attn_scalar=16,
                       rope_parameters={FULL: {"rope_type": "default", "rope_theta": 1_000_000.0},
                                        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0}})


def test_tiny_gguf_matches_transformers(tmp_path, monkeypatch):
    from scheduler.output import ScheduledSeq
    from serving.engine.model_runner import ModelRunner

    hf = _gguf_tiny_hf(tmp_path / "hf")
    assert hf.config.layer_types == [SLIDING] * 5 + [FULL]
    _write_tiny_gemma_gguf(tmp_path / "tiny.gguf", hf)
    monkeypatch.setattr("serving.loaders.load_tokenizer", lambda path: None)
    loaded = load_model(str(tmp_path / "tiny.gguf"), quantization="none")
    assert loaded.args.layer_types == hf.config.layer_types and loaded.args.query_pre_attn_scalar == 16
    ids = _tiny_prompts()[-1]
    runner = ModelRunner(loaded.model, num_blocks=16, block_size=4, device=torch.device("cpu"),
                         kv_dtype=torch.float32)
    input_ids, meta, _ = runner.build_batch([ScheduledSeq("r", ids, 0, list(range(16)), True)])
    meta.logits_indices = torch.arange(len(ids))
    with torch.inference_mode():
        ours = loaded.model.compute_logits(loaded.model(input_ids, meta, runner.kv_caches))
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_gguf_with_unknown_gemma3_metadata_is_refused(tmp_path):
    hf = _gguf_tiny_hf(tmp_path / "hf")
    _write_tiny_gemma_gguf(tmp_path / "tiny.gguf", hf, extra_key="gemma3.attention.shared_kv_layers")
    with pytest.raises(CheckpointError, match="shared_kv_layers"):
        load_model(str(tmp_path / "tiny.gguf"))
