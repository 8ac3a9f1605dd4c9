"""`frugal quantize`: the checkpoint it writes loads and generates, Q4_1 stays lossless, and the gate refuses."""
import json
import os

import pytest
import torch

import serving.quant.export as export_module
from serving import LLM, SamplingParams
from serving.cli import main
from serving.loaders import default_model_path, load_model
from serving.quant.checkpoint import load_checkpoint_state
from serving.quant.layout import QuantizedWeight, dequantize
from serving.quant.linear import QuantLinear


@pytest.fixture(scope="module")
def int4_checkpoint(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt") / "smollm2-int4")
    assert main(["quantize", default_model_path(), "--format", "int4-g32", "--out", out]) == 0
    return out


def test_checkpoint_is_lossless_for_q4_1_and_complete(int4_checkpoint, loaded_model):
    with open(os.path.join(int4_checkpoint, "config.json")) as f:
        config = json.load(f)
    assert config["quantization_config"]["quant_method"] == "frugal"
    assert config["quantization_config"]["format"] == "int4-g32"
    assert os.path.isfile(os.path.join(int4_checkpoint, "tokenizer.json"))
    state = load_checkpoint_state(int4_checkpoint)
    qkv = state["layers.0.self_attn.qkv_proj.weight"]
    assert isinstance(qkv, QuantizedWeight) and (qkv.format, qkv.group_size) == ("int4", 32)
    reference = loaded_model.model.state_dict()  # the GGUF dequantized by gguf, fp32
    for name in ("layers.0.self_attn.qkv_proj.weight", "layers.29.mlp.gate_up_proj.weight",
                 "layers.11.mlp.down_proj.weight"):
        assert torch.equal(dequantize(state[name]), reference[name]), name


def test_checkpoint_loads_and_generates(int4_checkpoint, make_llm):
    loaded = load_model(int4_checkpoint, quantization="auto")
    assert isinstance(loaded.model.layers[3].mlp.down_proj, QuantLinear)
    params = SamplingParams(max_tokens=12, temperature=0.0)
    prompt = "The capital of France is"
    out = LLM(loaded=loaded, quantization="auto", kv_cache_memory_bytes=32 << 20, max_model_len=256).generate(
        [prompt], params)[0]
    assert out.token_ids == make_llm().generate([prompt], params)[0].token_ids  # the same weights as the GGUF


def test_gate_refuses_and_writes_nothing(tmp_path, monkeypatch, capsys):
    real_texts = export_module.sharegpt_texts
    monkeypatch.setattr(export_module, "sharegpt_texts", lambda: real_texts(2))  # keep the test small
    out = str(tmp_path / "refused")
    code = main(["quantize", default_model_path(), "--format", "int4-g128", "--out", out, "--eval",
                 "--max-ppl-increase", "0.0001"])
    assert code == 1
    err = capsys.readouterr().err
    assert "refusing to write" in err and "--max-ppl-increase 0.01%" in err
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")


def test_bad_format_and_existing_output(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        export_module.export(default_model_path(), "int8", str(tmp_path / "full"))
    with pytest.raises(ValueError, match="format must be one of int4-g32"):
        export_module.export(default_model_path(), "int2", str(tmp_path / "new"))


def test_config_keeps_llama3_rope_factors(tmp_path, loaded_model):
    """A Llama-3.1 GGUF carries its rope scaling as per-frequency factors; our checkpoint must keep them."""
    import dataclasses
    import json

    from serving.loaders.safetensors_loader import hf_model_args
    from serving.quant.checkpoint import hf_config

    half = loaded_model.args.head_dim // 2
    args = dataclasses.replace(loaded_model.args, rope_freq_factors=[1.0 + i / half for i in range(half)])
    (tmp_path / "config.json").write_text(json.dumps(hf_config(args, {"format": "int4", "group_size": 32})))
    assert hf_model_args(str(tmp_path)).rope_freq_factors == args.rope_freq_factors
    plain = dataclasses.replace(loaded_model.args, rope_freq_factors=None)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(plain, {"format": "int4", "group_size": 32})))
    assert hf_model_args(str(tmp_path)).rope_freq_factors is None
