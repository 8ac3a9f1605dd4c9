"""The load-time agreement gate of the W4A8 CPU path: int8 activations are kept only where they agree with fp32.

"w4a8" (kernels/w4a8_cpu.py) rounds activations to int8 per block of 32, so a model's greedy next tokens can
differ from those of the fp32-activation path ("kernel", exact to the dequantized weights). When the
engine loads a model with `quant_cpu_path: auto`, this gate reads a few held texts through both paths in one teacher-forced
prefill each (serving/quant/quality.py) and keeps "w4a8" only when the share of positions with the same argmax
is at least MIN_AGREEMENT; otherwise every layer goes back to "kernel". The verdict is stored under
$FRUGAL_CACHE_DIR/quant_paths, keyed by the model file and the kernel build, so later loads skip the measurement.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import torch
from torch import nn

from kernels.w4a8_cpu import _SOURCE as W4A8_SOURCE
from kernels.w4a8_cpu import w4a8_kernels
from serving.quant.linear import QuantLinear
from serving.quant.quality import prompt_logits

logger = logging.getLogger(__name__)

MIN_AGREEMENT = 0.95  # share of held positions whose greedy next token must match the fp32-activation path
# NOTE: prose, code, a list and a chat turn: activation outliers differ by kind of text.
HELD_TEXTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined movable "
    "metal type, oil-based ink and a wooden screw press. Within fifty years presses were at work in more than two "
    "hundred European cities, and the price of a book fell so far that reading spread beyond the clergy.",
    "def merge_sorted(a, b):\n    out, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            out.append(a[i])\n            i += 1\n        else:\n"
    "            out.append(b[j])\n            j += 1\n    return out + a[i:] + b[j:]\n",
    "Shopping list for the week: two loaves of bread, a dozen eggs, milk, spinach, tomatoes, rice, lentils, "
    "olive oil, coffee beans, apples and a bar of dark chocolate. Remember to bring the reusable bags.",
    "User: My laptop gets very hot when I run video calls. What can I do?\nAssistant: A few things usually help: "
    "close other apps that use the camera or CPU, lower the call's video resolution, keep the vents clear and use "
    "the laptop on a hard surface rather than a bed or a cushion.",
]


def _verdict_path(model_path: str | None) -> str | None:
    if not model_path or not os.path.exists(model_path):
        return None
    stat = os.stat(model_path)
    with open(W4A8_SOURCE, "rb") as f:
        source = hashlib.sha1(f.read()).hexdigest()
    key = f"{os.path.realpath(model_path)}|{stat.st_size}|{stat.st_mtime_ns}|{w4a8_kernels().lane_count()}|" \
          f"{source}|{MIN_AGREEMENT}"
    root = os.environ.get("FRUGAL_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "frugal"))
    return os.path.join(root, "quant_paths", hashlib.sha1(key.encode()).hexdigest()[:20] + ".json")


def _set_path(layers: list[QuantLinear], cpu_path: str) -> None:
    for layer in layers:
        layer.set_path(cpu_path)


def measure_agreement(model: nn.Module, tokenizer, layers: list[QuantLinear], max_tokens: int = 96) -> float:
    """Share of held positions where `layers` on "w4a8" and on "kernel" give the same argmax; leaves them on
    "kernel"."""
    token_ids = [list(tokenizer(text).input_ids)[:max_tokens] for text in HELD_TEXTS]
    fast = [prompt_logits(model, ids).argmax(-1) for ids in token_ids]
    _set_path(layers, "kernel")
    exact = [prompt_logits(model, ids).argmax(-1) for ids in token_ids]
    num_same = sum((a == b).sum().item() for a, b in zip(fast, exact))
    return num_same / sum(len(ids) for ids in token_ids)


def gate_w4a8(model: nn.Module, tokenizer, model_path: str | None, min_agreement: float = MIN_AGREEMENT) -> float | None:
    """Keeps the model's "w4a8" layers only if they meet `min_agreement`; returns the agreement measured (or read
    from the stored verdict), None when no layer runs "w4a8"."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and m.path == "w4a8"]
    if not layers:
        return None
    verdict_path = _verdict_path(model_path) if min_agreement == MIN_AGREEMENT else None
    agreement = None
    if verdict_path and os.path.exists(verdict_path):
        try:
            with open(verdict_path) as f:
                agreement = float(json.load(f)["agreement"])
        except (OSError, ValueError, KeyError, TypeError):
            agreement = None  # a torn or foreign file: measure again
    if agreement is None:
        with torch.inference_mode():
            agreement = measure_agreement(model, tokenizer, layers)
        if agreement >= min_agreement:
            _set_path(layers, "w4a8")
        if verdict_path:
            os.makedirs(os.path.dirname(verdict_path), exist_ok=True)
            tmp = f"{verdict_path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({"model": model_path, "agreement": agreement, "min_agreement": min_agreement}, f)
            os.replace(tmp, verdict_path)
    elif agreement < min_agreement:
        _set_path(layers, "kernel")
    chosen = "w4a8" if agreement >= min_agreement else "kernel"
    logger.info("CPU quant path %s: int8-activation greedy agreement %.1f%% (gate %.0f%%)", chosen,
                100 * agreement, 100 * min_agreement)
    return agreement
