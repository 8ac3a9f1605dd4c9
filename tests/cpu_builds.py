"""The CPU kernels compile for the host's widest vectors (kernels/csrc/vec.h). Tests build the other widths the
sources carry too, so a host with AVX-512 also proves the AVX2 and portable loops a CI machine may run.

`require` is how a test gets a compiled extension: it fails when the build fails on a host that can build, and
skips only where nothing could (no C++ compiler, or FRUGAL_CPU_KERNELS=0 on purpose)."""
from __future__ import annotations

import os
import shlex
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from kernels.cpu_ops import LazyExtension


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


CPU_FLAGS = _cpu_flags()
# (label, flags that replace -march=native)
OTHER_BUILDS = [("portable", ["-march=x86-64"])]
if "avx512f" in CPU_FLAGS:
    OTHER_BUILDS.append(("avx2", ["-march=native", "-mno-avx512f"]))
OTHER_BUILD_IDS = [label for label, _ in OTHER_BUILDS]


def can_build() -> bool:
    """A C++ compiler is on PATH (the one torch builds with: $CXX, else c++) and the kernels are not disabled."""
    cxx = shlex.split(os.environ.get("CXX") or "c++") or ["c++"]
    return os.environ.get("FRUGAL_CPU_KERNELS", "1") != "0" and shutil.which(cxx[0]) is not None


def require(extension: LazyExtension):
    """The extension's module; a failed build fails the test (with the compiler's reason) wherever it could
    build, since a skip there would hide the broken kernel behind the fallback path."""
    module = extension.get()
    if module is None:
        if not can_build():
            pytest.skip("no C++ compiler, or FRUGAL_CPU_KERNELS=0")
        pytest.fail(f"{extension.name} did not build: {extension.error}")
    return module


_VARIANTS: dict[str, LazyExtension] = {}  # one per build name, so a variant compiles once per session


def _variant(name: str, sources: list[str], cflags: list[str], ldflags: list[str], label: str,
             arch_flags: list[str]) -> LazyExtension:
    key = f"{name}_{label}"
    if key not in _VARIANTS:
        flags = [f for f in cflags if not f.startswith("-march=")] + arch_flags
        _VARIANTS[key] = LazyExtension(key, sources, flags, ldflags)
    return _VARIANTS[key]


def build_variant(name: str, sources: list[str], cflags: list[str], ldflags: list[str], label: str,
                  arch_flags: list[str], siblings: list[tuple[str, list[str]]] = ()):
    """The extension `name` built again with `arch_flags` in place of -march=native, under its own name.

    `siblings` are the other (label, arch_flags) builds of the same sources that later tests ask for: they compile
    at the same time, one per core (each build is one compiler process), and wait built for those tests, whose
    own `require` then reports a sibling's failed build.
    """
    wanted = _variant(name, sources, cflags, ldflags, label, arch_flags)
    others = [_variant(name, sources, cflags, ldflags, other, flags) for other, flags in siblings if other != label]
    with ThreadPoolExecutor(max_workers=max(1, min(1 + len(others), os.cpu_count() or 1))) as pool:
        list(pool.map(LazyExtension.get, [wanted, *others]))
    return require(wanted)
