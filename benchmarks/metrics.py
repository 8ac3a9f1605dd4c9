"""Benchmark figures: percentiles, a peak-RSS sampler, one result row per phase, and the comparison table."""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import numpy as np
import psutil

_MIB = 1 << 20


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), interpolated linearly between ranks; NaN when there are no values."""
    if not values:
        return math.nan
    return float(np.percentile(values, q))


class PeakRSS:
    """Samples this process's resident set size every `interval_s` while the block runs; keeps the peak. With
    `pid`, another process's instead; with `children`, the memory of it and every process under it (a server
    whose engine runs in a child, as vLLM's), summed as PSS.

    NOTE: a process tree is summed by proportional set size, not RSS: forked workers share the parent's pages
    (torch's libraries, a model mapped once), and summing their RSS counts those pages once per process, which
    made a tree of a few workers look several times its real size.

    Use one per phase: `with PeakRSS() as mem: ...`, then `mem.peak_bytes` (absolute) and `mem.delta_bytes`
    (peak minus the RSS on entry). NOTE: a sampler, not a hook on the allocator: a spike shorter than the
    interval can be missed, which is why the interval is short and the phases are seconds long.
    """

    def __init__(self, interval_s: float = 0.02, pid: int | None = None, children: bool = False):
        self.interval_s = interval_s
        self.start_bytes = 0  # RSS when the block was entered
        self.peak_bytes = 0  # highest RSS seen, including the samples on entry and exit
        self._process = psutil.Process(pid)
        self._children = children
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def delta_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes

    def _rss(self) -> int:
        if not self._children:
            return self._process.memory_info().rss
        total = 0
        try:
            processes = [self._process, *self._process.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0  # the process ended: nothing resident
        for process in processes:
            try:
                total += process.memory_full_info().pss
            except psutil.NoSuchProcess:
                pass  # a child that ended between the listing and the read
        return total

    def _sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self._rss())

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakRSS:
        self.start_bytes = self.peak_bytes = self._rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@dataclass(slots=True)
class CpuSnapshot:
    """CPU seconds used so far by the whole machine and by this process, to tell how much others took."""

    wall_s: float  # time.monotonic()
    machine_busy_s: float  # non-idle CPU seconds over all CPUs since boot
    self_s: float  # CPU seconds of this process (user + system, children included)

    @classmethod
    def take(cls) -> CpuSnapshot:
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        own = psutil.Process().cpu_times()
        return cls(time.monotonic(), busy, own.user + own.system + own.children_user + own.children_system)

    def others_share(self, later: CpuSnapshot) -> float:
        """Fraction of the machine's CPU capacity that other processes used between the two snapshots."""
        capacity = (later.wall_s - self.wall_s) * (psutil.cpu_count() or 1)
        others = (later.machine_busy_s - self.machine_busy_s) - (later.self_s - self.self_s)
        return max(others, 0.0) / capacity if capacity > 0 else 0.0


@dataclass(slots=True)
class PhaseResult:
    """One phase's figures, computed from per-request timings measured in that phase."""

    name: str  # what ran, e.g. "frugal" or "transformers (batch 16)"
    num_requests: int  # requests completed
    num_prompt_tokens: int  # prompt tokens over all requests
    num_output_tokens: int  # useful output tokens (each request's target length, never padding)
    duration_s: float  # wall time from the first arrival to the last completion
    ttft_s: list[float]  # per request: time to first token, from its arrival
    tpot_s: list[float]  # per request: mean time per output token after the first
    peak_rss_bytes: int = 0  # highest process RSS during the phase
    peak_rss_delta_bytes: int = 0  # that peak minus the RSS when the phase started

    @property
    def output_tok_s(self) -> float:
        return self.num_output_tokens / self.duration_s

    @property
    def total_tok_s(self) -> float:
        return (self.num_prompt_tokens + self.num_output_tokens) / self.duration_s

    def figures(self) -> dict[str, float]:
        """The table rows, in order: label -> value. Memory is in MiB, times in milliseconds."""
        return {
            "requests": self.num_requests,
            "duration (s)": self.duration_s,
            "output tok/s": self.output_tok_s,
            "total tok/s": self.total_tok_s,
            "TTFT p50 (ms)": 1e3 * percentile(self.ttft_s, 50),
            "TTFT p95 (ms)": 1e3 * percentile(self.ttft_s, 95),
            "TPOT p50 (ms)": 1e3 * percentile(self.tpot_s, 50),
            "TPOT p95 (ms)": 1e3 * percentile(self.tpot_s, 95),
            "peak RSS (MiB)": self.peak_rss_bytes / _MIB,
            "peak RSS delta (MiB)": self.peak_rss_delta_bytes / _MIB,
        }


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "-"
    return f"{value:,.1f}" if abs(value) < 1e4 else f"{value:,.0f}"


def format_comparison(title: str, result: PhaseResult, baseline: PhaseResult | None = None) -> str:
    """A table of `result` beside `baseline`, one figure a row, with the ratio result / baseline.

    Without a baseline (it was skipped) the table has the result's column only.
    """
    results = [result] if baseline is None else [result, baseline]
    columns = [r.figures() for r in results]
    width = max(len(label) for label in columns[0])
    col = max(14, *(len(r.name) for r in results))
    header = "".join(f"  {r.name:>{col}}" for r in results) + ("  " + f"{'ratio':>7}" if baseline else "")
    lines = [title, f"{'':<{width}}{header}"]
    for label in columns[0]:
        values = [c[label] for c in columns]
        line = f"{label:<{width}}" + "".join(f"  {_fmt(v):>{col}}" for v in values)
        if baseline is not None:
            value, base = values
            ratio = value / base if base and not math.isnan(base) and not math.isnan(value) else math.nan
            line += f"  {'-' if math.isnan(ratio) else f'{ratio:.2f}x':>7}"
        lines.append(line)
    return "\n".join(lines)
