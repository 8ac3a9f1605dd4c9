"""CPU fast paths compiled on first use (torch C++ extension), with the plain-torch path as the fallback.

Building takes about a minute once per machine; the result is cached by torch under TORCH_EXTENSIONS_DIR
(default ~/.cache/torch_extensions), one build per CPU feature set (`build_name`). Set FRUGAL_CPU_KERNELS=0 to
skip them (e.g. on a host without a compiler). FRUGAL_CPU_ARCH replaces -march=native with other target flags, e.g.
"-march=x86-64-v3" to build for a fleet's common AVX2 level, or "-march=native -mno-avx512f" to measure the AVX2
kernels on an AVX-512 host.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import re
import shlex
import subprocess
import sys
import threading

import torch

logger = logging.getLogger(__name__)

_CSRC = os.path.join(os.path.dirname(__file__), "csrc")
# -ffast-math lets the portable loops' sums vectorize; infinities stay meaningful (the softmax pads its rows with
# -inf). -fopenmp makes at::parallel_for parallel: without it the pragma inside it is dropped and the kernel runs on
# one thread (libgomp.so.1 resolves to the copy torch already loaded, so there is one OpenMP runtime).
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only"]
_LDFLAGS = ["-fopenmp"]
# clang's compiler proper takes the target as "-target-cpu X" / "-target-feature +avx2" pairs
_CLANG_TARGET_ARGS = ("-target-cpu", "-tune-cpu", "-target-feature")
# the lines of a failed build worth a log line: compiler and linker errors, not the command lines around them
_ERROR_LINE = re.compile(r"(^|: )(fatal )?error\b|undefined reference")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def parse_target_flags(verbose_output: str) -> tuple[str, ...]:
    """The target flags on the compiler-proper line of `<cxx> -v` output (gcc's cc1plus: -march=, -mtune=,
    -m<feature>; clang's -cc1: -target-cpu, -target-feature), in order; () when there is no such line."""
    for line in verbose_output.splitlines():
        if "cc1" not in line:
            continue
        tokens = shlex.split(line)  # clang quotes every argument
        if tokens and (tokens[0].endswith("cc1plus") or "-cc1" in tokens):
            return tuple([t for t in tokens if t.startswith("-m")]
                         + [f"{a}={b}" for a, b in zip(tokens, tokens[1:]) if a in _CLANG_TARGET_ARGS])
    return ()


@functools.cache
def _probe(cxx: str, arch_flags: tuple[str, ...]) -> tuple[str, ...]:
    try:
        run = subprocess.run([*shlex.split(cxx), *arch_flags, "-E", "-v", "-x", "c++", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return arch_flags  # no compiler: the build fails too, with its own message
    if run.returncode != 0:
        return arch_flags  # the build fails on the same flags
    resolved = parse_target_flags(run.stderr)
    if not resolved:
        # NOTE: refusing is safer than a cache entry that another CPU could load and die on (SIGILL)
        raise RuntimeError(f"cannot tell what {' '.join(arch_flags)} selects: no target flags in `{cxx} -v`")
    return resolved


def resolved_arch(cflags: list[str]) -> tuple[str, ...]:
    """The target `cflags` select with the compiler torch builds with: their -m flags, -march=native (or
    -mtune/-mcpu=native) expanded into this host's CPU and features by the compiler driver. Probed once per
    process and compiler (a few ms)."""
    arch_flags = tuple(f for f in cflags if f.startswith("-m"))
    if not any(f.endswith("=native") for f in arch_flags):
        return arch_flags
    from torch.utils.cpp_extension import get_cxx_compiler

    return _probe(get_cxx_compiler(), arch_flags)


def build_name(name: str, cflags: list[str]) -> str:
    """`name` with a digest of the target `cflags` select on this host. torch keys its build cache by name,
    sources and flags, and the flag "-march=native" reads the same on every CPU: a build made for AVX-512 (a
    container image, a shared home) would load on an AVX2 host and die with SIGILL. In the name, each feature set
    gets a build directory of its own, so none is loaded elsewhere and none is rebuilt when another is used."""
    # NOTE: only the -m flags: cache-size tuning (--param l1-cache-size=...) changes speed, not what runs
    digest = hashlib.sha1(" ".join(resolved_arch(cflags)).encode()).hexdigest()[:12]
    return f"{name}_{digest}"


def target_cflags(cflags: list[str]) -> list[str]:
    """`cflags` with -march=native replaced by $FRUGAL_CPU_ARCH's flags when that is set."""
    arch = os.environ.get("FRUGAL_CPU_ARCH", "").strip()
    if not arch or "-march=native" not in cflags:
        return list(cflags)
    i = cflags.index("-march=native")
    return [*cflags[:i], *shlex.split(arch), *cflags[i + 1:]]


def _build_error(e: Exception) -> str:
    """The first line of a build failure and its first compiler errors, not the whole ninja log."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    head = lines[0].split(": [", 1)[0]  # torch prefixes the ninja log with "Error building extension 'x': "
    errors = [line for line in lines[1:] if _ERROR_LINE.search(line)][:3]
    return "; ".join([head[:300], *errors])


def build_root() -> str:
    """Where the CPU extensions are built and cached: $TORCH_EXTENSIONS_DIR, else torch's default root with a
    folder per Python version (these builds never use CUDA, so the folder says cpu on every torch build)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return root
    from torch.utils.cpp_extension import get_default_build_root

    return os.path.join(get_default_build_root(),
                        f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_cpu")


@contextlib.contextmanager
def build_lock(build_dir: str):
    """Holds the build folder for this process while it builds or loads the extension there.

    torch guards a build with a plain file ("lock") that only the builder removes: a process killed mid-build
    (Ctrl-C on a first start, a pod evicted, a test run cut short) leaves it behind, and every later start then
    waits on it for ever. This lock is an flock(2), which the kernel drops when its holder dies; whoever holds it
    is the only live builder of that folder, so a torch lock file it finds is stale and is removed."""
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(build_dir, "frugal.lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # waits for a live builder in another process; released on exit
        try:
            stale = os.path.join(build_dir, "lock")
            if os.path.exists(stale):
                logger.warning("removing %s: left by a build that did not finish (its process exited)", stale)
                os.remove(stale)
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class LazyExtension:
    """A torch C++ extension built on first use; `get()` returns the module, or None when FRUGAL_CPU_KERNELS=0
    or the build failed (logged once, then callers take their fallback path). After a failed build `error`
    holds the reason, for the engine's log and the tests; it stays None when the kernels are disabled."""

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
        self.error: str | None = None
        self._lock = threading.Lock()
        self._module = None
        self._tried = False

    def build_directory(self) -> str:
        """This host's build folder for the extension (one per target feature set: `build_name`)."""
        return os.path.join(build_root(), build_name(self.name, target_cflags(self.cflags)))

    def get(self):
        if self._module is not None or self._tried:
            return self._module
        if os.environ.get("FRUGAL_CPU_KERNELS", "1") == "0":
            return None
        with self._lock:
            if not self._tried:
                try:
                    from torch.utils.cpp_extension import load

                    logger.info("loading %s (compiled on first use on this machine, about a minute)", self.name)
                    cflags = target_cflags(self.cflags)
                    build_dir = self.build_directory()
                    with build_lock(build_dir):
                        self._module = load(name=os.path.basename(build_dir), sources=self.sources,
                                            extra_cflags=cflags, extra_ldflags=self.ldflags,
                                            build_directory=build_dir, verbose=False)
                except Exception as e:  # no compiler, no ninja, a compile error, read-only cache...
                    self.error = _build_error(e)
                    logger.warning("CPU extension %s did not build, using the slower fallback (%s): %s",
                                   self.name, self.fallback, self.error)
                self._tried = True
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


def prebuild_cpu_extensions() -> list[threading.Thread]:
    """Starts building (or loading) every CPU extension of the package at once, as many compilers at a time as
    this process has cores, and returns without waiting. Called when a model starts loading on the CPU: the
    builds overlap the checkpoint's parsing, and a layer that asks for its kernel meanwhile waits on that
    extension's lock instead of compiling it a second time. Returns the build threads.

    NOTE: not daemon threads: a process that exits mid-build throws the half-done build away (the next start
    removes the lock file it leaves: `build_lock`) and compiles again; exiting waits for the compiler instead."""
    if os.environ.get("FRUGAL_CPU_KERNELS", "1") == "0":
        return []
    from kernels import w4a8_cpu, weight_quant_cpu  # they import this module: imported here, not at the top
    # NOTE: imported here, before any build thread starts: its first import pulls in setuptools, whose distutils
    # shim adds and removes a sys.meta_path entry, and an import running beside that in another thread can miss
    # the path finder and fail with "No module named ..." (a daemon's `import gguf` did).
    import torch.utils.cpp_extension  # noqa: F401

    pending = [e for e in (_paged_attention, _fused_ops, w4a8_cpu._extension, weight_quant_cpu._extension)
               if e._module is None and not e._tried]
    # NOTE: each build is one translation unit, so one compiler process per core; torch's headers make each
    # take tens of seconds, and four of them one after another were most of a first start.
    slots = threading.BoundedSemaphore(max(1, len(os.sched_getaffinity(0))))

    def build(extension: LazyExtension) -> None:
        with slots:
            extension.get()

    threads = [threading.Thread(target=build, args=(e,), name=f"build-{e.name}") for e in pending]
    for thread in threads:
        thread.start()
    return threads
