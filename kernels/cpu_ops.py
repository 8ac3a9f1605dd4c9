"""CPU fast paths compiled on first use (torch C++ extension), with the plain-torch path as the fallback.

Building takes about a minute once per machine; the result is cached by torch under TORCH_EXTENSIONS_DIR
(default ~/.cache/torch_extensions). Set FRUGAL_CPU_KERNELS=0 to skip them (e.g. on a host without a compiler).
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading

import torch

logger = logging.getLogger(__name__)

_CSRC = os.path.join(os.path.dirname(__file__), "csrc")
# -ffast-math lets the exp loop vectorize (glibc's vector math); infinities stay meaningful. -fopenmp makes
# at::parallel_for parallel: without it the pragma inside it is dropped and the kernel runs on one thread
# (libgomp.so.1 resolves to the copy torch already loaded, so there is one OpenMP runtime).
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only"]
_LDFLAGS = ["-fopenmp"]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class LazyExtension:
    """A torch C++ extension built on first use; `get()` returns the module, or None when FRUGAL_CPU_KERNELS=0
    or the build failed (logged once, then callers take their fallback path)."""

    def __init__(self, name: str, sources: list[str], cflags: list[str], ldflags: list[str] | None = None,
                 fallback: str = "the torch path", headers: tuple[str, ...] = ("vec.h",)):
        self.name = name
        self.sources = sources
        # NOTE: torch rebuilds a cached extension when its sources or flags change, not its headers: a digest
        # of the headers in the flags makes a header edit rebuild too.
        digest = hashlib.sha1(b"".join(_read(os.path.join(_CSRC, h)) for h in headers)).hexdigest()[:16]
        self.cflags = [*cflags, f"-DFRUGAL_HEADERS_DIGEST={digest}"]
        self.ldflags = ldflags or []
        self.fallback = fallback
        self._lock = threading.Lock()
        self._module = None
        self._failed = False

    def get(self):
        if self._module is not None or self._failed:
            return self._module
        if os.environ.get("FRUGAL_CPU_KERNELS", "1") == "0":
            self._failed = True
            return None
        with self._lock:
            if self._module is None and not self._failed:
                try:
                    from torch.utils.cpp_extension import load

                    logger.info("loading %s (compiled on first use on this machine, about a minute)", self.name)
                    self._module = load(name=self.name, sources=self.sources, extra_cflags=self.cflags,
                                        extra_ldflags=self.ldflags, verbose=False)
                except Exception as e:  # no compiler, no ninja, read-only cache...
                    logger.warning("%s unavailable, using %s: %s", self.name, self.fallback, e)
                    self._failed = True
        return self._module


_paged_attention = LazyExtension("frugal_cpu_kernels", [os.path.join(_CSRC, "paged_attention_cpu.cpp")], _CFLAGS,
                                 _LDFLAGS)


def cpu_kernels():
    """The compiled paged-attention module, or None when disabled or the build failed."""
    return _paged_attention.get()


# NOTE: no -ffast-math and no FMA contraction here: these ops must round as the torch expressions they replace.
_fused_ops = LazyExtension("frugal_fused_cpu", [os.path.join(_CSRC, "fused_ops_cpu.cpp")],
                           ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"], _LDFLAGS)


def fused_ops(x=None):
    """The compiled fused decoder ops (RMSNorm with the residual add, rotary, KV write), or None when disabled,
    the build failed, or `x` (when given) is not an fp32 CPU tensor they take."""
    if x is not None and (x.device.type != "cpu" or x.dtype != torch.float32):
        return None
    return _fused_ops.get()
