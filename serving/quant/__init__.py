"""Weight-only quantization: packed layouts and primitives (layout.py), GGUF block import (gguf_import.py), the
quantized linear layer (linear.py), the module swap (install.py), checkpoints (checkpoint.py), the quality
gate (quality.py) and the `frugal quantize` command (export.py)."""
from serving.quant.layout import QuantizedWeight, dequantize, quantize

__all__ = ["QuantizedWeight", "dequantize", "quantize"]
