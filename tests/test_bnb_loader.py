"""bitsandbytes checkpoints: our decoder against the documented tables and hand-serialized tensors (always), and,
where bitsandbytes installs, real checkpoints written by transformers checked against bitsandbytes' own decoder."""
import json
import os

import pytest
import torch

from serving.loaders import load_model
from serving.loaders.bnb_loader import FP4_CODE, NF4_CODE, dequantize_4bit, load_bnb_state_dict
from serving.loaders.safetensors_loader import hf_model_args
from serving.quant.layout import QuantizedWeight, dequantize
from test_loaders import _our_logits, _tiny_hf

IDS = [5, 17, 3, 88, 42, 9, 60, 61, 2, 33, 71, 12]
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _linear_names(hf):
    return [f"model.layers.{i}.{'self_attn' if p in _LINEARS[:4] else 'mlp'}.{p}"
            for i in range(hf.config.num_hidden_layers) for p in _LINEARS]


def encode_4bit(w: torch.Tensor, code: tuple, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb's 4-bit encoding as serialized: per block absmax, nearest code, two codes a byte (first HIGH)."""
    flat = w.flatten().float()
    absmax = flat.reshape(-1, blocksize).abs().amax(1)
    normed = flat / absmax.repeat_interleave(blocksize)
    codes = (normed.unsqueeze(1) - torch.tensor(code).unsqueeze(0)).abs().argmin(1).to(torch.uint8)
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1), absmax


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_hand_serialized_4bit_decodes(quant_type):
    torch.manual_seed(0)
    code = NF4_CODE if quant_type == "nf4" else FP4_CODE
    w = torch.randn(24, 64)
    packed, absmax = encode_4bit(w, code, 64)
    quant = {"quant_type": quant_type, "blocksize": 64, "dtype": "float32", "shape": [24, 64]}
    decoded = dequantize_4bit(packed, quant, {"absmax": absmax})  # no quant_map: our table
    codes = torch.stack([packed.flatten() >> 4, packed.flatten() & 0xF], 1).flatten().long()
    expected = (torch.tensor(code)[codes] * absmax.repeat_interleave(64)).reshape(24, 64)
    assert torch.equal(decoded, expected)
    assert (decoded - w).abs().max() <= absmax.max() * 0.25  # within half the widest code gap


def test_code_tables_are_the_documented_ones():
    assert len(NF4_CODE) == len(FP4_CODE) == 16
    assert NF4_CODE[0] == -1.0 and NF4_CODE[7] == 0.0 and NF4_CODE[15] == 1.0
    assert sorted(NF4_CODE) == list(NF4_CODE)
    assert max(abs(v) for v in FP4_CODE) == 1.0 and FP4_CODE[1] == 0.0625 / 12
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(bnb_functional.get_4bit_type("nf4", device="cpu").float(), torch.tensor(NF4_CODE))
    assert torch.equal(bnb_functional.get_4bit_type("fp4", device="cpu").float(), torch.tensor(FP4_CODE))


def _bnb_checkpoint(tmp_path, kind):
    """A tiny random Llama quantized by bitsandbytes through transformers and saved; returns (dir, fp32 model)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    hf = _tiny_hf(tmp_path, "llama")
    config = {"nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
              "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                        bnb_4bit_compute_dtype=torch.float32),
              "int8": BitsAndBytesConfig(load_in_8bit=True)}[kind]
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu")
    out = tmp_path / kind
    quantized.save_pretrained(out)
    for name in os.listdir(tmp_path):  # the tokenizer files
        if name.startswith(("tokenizer", "special_tokens")):
            os.link(tmp_path / name, out / name)
    return out, hf


def _reference_from_bnb(out, hf, kind):
    """`hf` with every linear weight replaced by bitsandbytes' own decoding of the saved tensors."""
    import bitsandbytes.functional as F
    from safetensors.torch import load_file

    raw = load_file(out / "model.safetensors")
    for name in _linear_names(hf):
        if kind == "int8":
            w = raw[f"{name}.weight"].float() * (raw[f"{name}.SCB"] / 127).unsqueeze(1)
        else:
            prefix = f"{name}.weight."
            parts = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
            state = F.QuantState.from_dict(parts, device=torch.device("cpu"))
            w = F.dequantize_4bit(raw[f"{name}.weight"], state).float()
        with torch.no_grad():
            hf.get_submodule(name).weight.copy_(w)
    return hf


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_real_bnb_checkpoint_loads(tmp_path, kind):
    out, hf = _bnb_checkpoint(tmp_path, kind)
    ref_model = _reference_from_bnb(out, hf, kind)
    with torch.inference_mode():
        ref = ref_model(torch.tensor([IDS])).logits[0]
    exact = load_model(str(out), quantization="none")  # our decoder, fp32: must equal bitsandbytes' decoding
    torch.testing.assert_close(_our_logits(exact, IDS), ref, rtol=1e-4, atol=1e-4)

    state = load_bnb_state_dict(str(out), hf_model_args(str(out)))
    qkv = state["layers.0.self_attn.qkv_proj.weight"]
    assert isinstance(qkv, QuantizedWeight)
    w_ref = ref_model.model.layers[0].self_attn.q_proj.weight.detach()
    err = (dequantize(qkv)[: w_ref.shape[0]] - w_ref).abs()
    if kind == "int8":  # same codes; only SCB / 127 rounded to fp16
        assert qkv.format == "int8" and err.max() <= w_ref.abs().max() * 2 ** -11
    else:  # re-quantized to our int4-g64: within half a step of the bnb values
        assert qkv.format == "int4" and qkv.group_size == 64
        assert (err <= qkv.scales.float().repeat_interleave(64, 1)[: w_ref.shape[0]] / 2 + 1e-6).all()
    packed = load_model(str(out), quantization="auto", quant_cpu_path="dequant")
    ours = _our_logits(packed, IDS)
    assert torch.nn.functional.cosine_similarity(ours, ref, dim=-1).min() > 0.98


def test_bnb_checkpoint_is_recognised(tmp_path):
    from serving.loaders.bnb_loader import is_bnb_checkpoint

    with open(tmp_path / "config.json", "w") as f:
        json.dump({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}, f)
    assert is_bnb_checkpoint(str(tmp_path))
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"quantization_config": {"quant_method": "gptq", "bits": 4}}, f)
    assert not is_bnb_checkpoint(str(tmp_path))
