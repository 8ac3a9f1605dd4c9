"""The CPU kernels compile for the host's widest vectors (kernels/csrc/vec.h). Tests build the other widths the
sources carry too, so a host with AVX-512 also proves the AVX2 and portable loops a CI machine may run."""
from __future__ import annotations

from kernels.cpu_ops import LazyExtension


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


# (label, flags that replace -march=native)
OTHER_BUILDS = [("portable", ["-march=x86-64"])]
if "avx512f" in _cpu_flags():
    OTHER_BUILDS.append(("avx2", ["-march=native", "-mno-avx512f"]))
OTHER_BUILD_IDS = [label for label, _ in OTHER_BUILDS]


def build_variant(name: str, sources: list[str], cflags: list[str], ldflags: list[str], label: str,
                  arch_flags: list[str]):
    """The extension `name` built again with `arch_flags` in place of -march=native, under its own name."""
    flags = [f for f in cflags if not f.startswith("-march=")] + arch_flags
    return LazyExtension(f"{name}_{label}", sources, flags, ldflags).get()
