"""CPU fast paths compiled on first use (torch C++ extension), with the plain-torch path as the fallback.

Building takes about a minute once per machine; the result is cached by torch under TORCH_EXTENSIONS_DIR
(default ~/.cache/torch_extensions). Set FRUGAL_CPU_KERNELS=0 to skip them (e.g. on a host without a compiler).
"""
from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger(__name__)

_CSRC = os.path.join(os.path.dirname(__file__), "csrc")
# -ffast-math lets the exp loop vectorize (glibc's vector math); infinities stay meaningful.
_CFLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-ffast-math", "-fno-finite-math-only"]
_lock = threading.Lock()
_module = None
_failed = False


def cpu_kernels():
    """The compiled module, or None when disabled or the build failed (logged once)."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    if os.environ.get("FRUGAL_CPU_KERNELS", "1") == "0":
        _failed = True
        return None
    with _lock:
        if _module is None and not _failed:
            try:
                from torch.utils.cpp_extension import load

                _module = load(name="frugal_cpu_kernels",
                               sources=[os.path.join(_CSRC, "paged_attention_cpu.cpp")],
                               extra_cflags=_CFLAGS, verbose=False)
            except Exception as e:  # no compiler, no ninja, read-only cache...
                logger.warning("CPU kernels unavailable, using the torch path: %s", e)
                _failed = True
    return _module
