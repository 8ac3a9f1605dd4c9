"""The CPU extensions build wherever a compiler is, each CPU feature set gets a build of its own, and a failed
build says why."""
import fcntl
import logging
import os
import threading
import time

import pytest

import kernels.cpu_ops as cpu_ops
from kernels.cpu_ops import LazyExtension, build_name, parse_target_flags, resolved_arch
from kernels.weight_quant_cpu import _extension as weight_quant
from cpu_builds import CPU_FLAGS, can_build, require

needs_compiler = pytest.mark.skipif(not can_build(), reason="no C++ compiler, or FRUGAL_CPU_KERNELS=0")
GCC_LINE = (" /usr/lib/gcc/x86_64-linux-gnu/12/cc1plus -E -quiet -v -imultiarch x86_64-linux-gnu /dev/null "
            "-march=skylake -mmmx -mavx2 -mno-avx512f --param l1-cache-size=32 -mtune=skylake -dumpbase null")
CLANG_LINE = (' "/usr/lib/llvm-16/bin/clang" "-cc1" "-triple" "x86_64-pc-linux-gnu" "-E" "-target-cpu" "znver3" '
              '"-target-feature" "+avx2" "-target-feature" "-avx512f" "-tune-cpu" "znver3" "-x" "c++" "/dev/null"')


@needs_compiler
@pytest.mark.parametrize("extension", [cpu_ops._paged_attention, cpu_ops._fused_ops, weight_quant],
                         ids=lambda e: e.name)
def test_each_extension_builds(extension):
    assert extension.get() is not None, extension.error
    assert extension.error is None


def test_target_flags_from_the_compiler_drivers_line():
    assert parse_target_flags(f"Using built-in specs.\n{GCC_LINE}\nignoring nonexistent directory \"/x\"\n") == (
        "-march=skylake", "-mmmx", "-mavx2", "-mno-avx512f", "-mtune=skylake")
    assert parse_target_flags(f"clang version 16\n{CLANG_LINE}\n") == (
        "-target-cpu=znver3", "-target-feature=+avx2", "-target-feature=-avx512f", "-tune-cpu=znver3")
    assert parse_target_flags("Using built-in specs.\n") == ()


def test_name_follows_the_target_flags_only():
    portable = build_name("ext", ["-O3", "-march=x86-64", "-fopenmp"])
    assert portable.startswith("ext_") and portable == build_name("ext", ["-O2", "-march=x86-64"])
    assert portable != build_name("ext", ["-O3", "-march=x86-64-v3"])
    assert portable != build_name("ext", ["-O3", "-march=x86-64", "-mno-sse4.2"])
    assert resolved_arch(["-O3", "-march=x86-64", "-mno-sse4.2"]) == ("-march=x86-64", "-mno-sse4.2")  # no probe


def test_probe_runs_once_per_process(monkeypatch):
    calls = []

    def run(args, **kwargs):
        calls.append(args)
        return _Ran(GCC_LINE)

    monkeypatch.setattr(cpu_ops.subprocess, "run", run)
    monkeypatch.setattr("torch.utils.cpp_extension.get_cxx_compiler", lambda: "fake-c++")
    try:
        first = build_name("ext", ["-march=native"])
        assert build_name("ext", ["-march=native"]) == first and len(calls) == 1
        assert calls[0][:2] == ["fake-c++", "-march=native"]
        assert resolved_arch(["-march=native"]) == ("-march=skylake", "-mmmx", "-mavx2", "-mno-avx512f",
                                                    "-mtune=skylake")
        monkeypatch.setattr(cpu_ops.subprocess, "run", lambda *a, **k: _Ran("Using built-in specs."))
        with pytest.raises(RuntimeError, match="cannot tell what -march=native -mno-avx2 selects"):
            resolved_arch(["-march=native", "-mno-avx2"])  # refused: a build could not be told apart
        monkeypatch.setattr(cpu_ops.subprocess, "run", _no_compiler)
        assert resolved_arch(["-march=native", "-mno-sse4a"]) == ("-march=native", "-mno-sse4a")  # build fails too
    finally:
        cpu_ops._probe.cache_clear()  # the fake compiler's answers must not outlive this test


def _no_compiler(args, **kwargs):
    raise FileNotFoundError(args[0])


class _Ran:
    returncode = 0

    def __init__(self, stderr):
        self.stderr = stderr


@needs_compiler
@pytest.mark.skipif(not {"avx2", "fma"} <= CPU_FLAGS, reason="needs an x86 host with AVX2 (/proc/cpuinfo)")
def test_native_resolves_to_the_hosts_features():
    native = resolved_arch(["-O3", "-march=native"])
    assert "-march=native" not in native and native == resolved_arch(["-march=native"])
    for feature in ("avx2", "fma", "avx512f", "avx512bw"):  # in the resolved flags exactly when the host has it
        enabled = f"-m{feature}" in native or f"-target-feature=+{feature}" in native
        assert enabled == (feature in CPU_FLAGS), feature


@needs_compiler
@pytest.mark.skipif("avx512f" not in CPU_FLAGS, reason="needs a host with AVX-512 (/proc/cpuinfo)")
def test_avx2_build_is_not_the_native_build():
    native = build_name("frugal_cpu_kernels", ["-march=native"])
    assert build_name("frugal_cpu_kernels", ["-march=native", "-mno-avx512f"]) != native
    assert build_name("frugal_cpu_kernels", ["-O3", "-march=native", "-fopenmp"]) == native


@needs_compiler
def test_failed_build_is_a_warning_with_the_compiler_error(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    source = tmp_path / "broken.cpp"
    source.write_text("int answer() { return undeclared_name; }\n")
    broken = LazyExtension("frugal_broken", [str(source)], ["-O1", "-march=x86-64"], fallback="the torch path")
    with caplog.at_level(logging.WARNING, logger="kernels.cpu_ops"):
        assert broken.get() is None and broken.get() is None
    assert "Error building extension 'frugal_broken_" in broken.error and "undeclared_name" in broken.error
    assert "-DTORCH_EXTENSION_NAME" not in broken.error  # the compiler's error, not the command lines
    [record] = caplog.records
    assert "frugal_broken" in record.message and "fallback (the torch path)" in record.message
    assert broken.error in record.message
    with pytest.raises(pytest.fail.Exception, match="frugal_broken did not build: Error building"):
        require(broken)


def _get_in_background(extension: LazyExtension) -> threading.Thread:
    thread = threading.Thread(target=extension.get, daemon=True)  # daemon: a hang fails the test, not the run
    thread.start()
    return thread


@needs_compiler
def test_a_build_cut_short_does_not_block_later_starts(tmp_path, monkeypatch, caplog):
    """torch's lock file, left by a builder that was killed, is removed instead of waited on for ever."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    source = tmp_path / "broken.cpp"
    source.write_text("int answer() { return undeclared_name; }\n")  # fails fast: no torch headers to parse
    broken = LazyExtension("frugal_cut_short", [str(source)], ["-O1", "-march=x86-64"])
    build_dir = broken.build_directory()
    assert build_dir.startswith(str(tmp_path / "cache"))
    os.makedirs(build_dir)
    open(os.path.join(build_dir, "lock"), "w").close()  # what a killed build leaves behind
    with caplog.at_level(logging.WARNING, logger="kernels.cpu_ops"):
        thread = _get_in_background(broken)
        thread.join(timeout=120)
    assert not thread.is_alive(), "the load waited on a stale lock file"
    assert "undeclared_name" in broken.error  # it went on to build (and failed on the source, as it must)
    assert any("did not finish" in r.message for r in caplog.records)
    assert not os.path.exists(os.path.join(build_dir, "lock"))


@needs_compiler
def test_a_live_build_in_another_process_is_waited_for(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    source = tmp_path / "broken.cpp"
    source.write_text("int answer() { return undeclared_name; }\n")
    broken = LazyExtension("frugal_live_build", [str(source)], ["-O1", "-march=x86-64"])
    build_dir = broken.build_directory()
    os.makedirs(build_dir)
    with open(os.path.join(build_dir, "frugal.lock"), "a") as held:  # another builder, alive
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        open(os.path.join(build_dir, "lock"), "w").close()  # its torch lock: not stale, must stay
        thread = _get_in_background(broken)
        time.sleep(1.0)
        assert thread.is_alive() and broken.error is None  # waiting, not building beside it
        assert os.path.exists(os.path.join(build_dir, "lock"))
        os.remove(os.path.join(build_dir, "lock"))  # the builder finishes
    thread.join(timeout=120)
    assert not thread.is_alive() and "undeclared_name" in broken.error


def test_disabled_kernels_are_not_an_error(monkeypatch):
    monkeypatch.setenv("FRUGAL_CPU_KERNELS", "0")
    disabled = LazyExtension("frugal_disabled", ["missing.cpp"], ["-march=native"])
    assert disabled.get() is None and disabled.error is None and not can_build()


def test_cpu_arch_replaces_native(monkeypatch):
    flags = ["-O3", "-march=native", "-fopenmp"]
    monkeypatch.delenv("FRUGAL_CPU_ARCH", raising=False)
    assert cpu_ops.target_cflags(flags) == flags
    monkeypatch.setenv("FRUGAL_CPU_ARCH", "-march=native -mno-avx512f")
    assert cpu_ops.target_cflags(flags) == ["-O3", "-march=native", "-mno-avx512f", "-fopenmp"]
    assert cpu_ops.target_cflags(["-O3", "-march=x86-64"]) == ["-O3", "-march=x86-64"]  # explicit targets stay
