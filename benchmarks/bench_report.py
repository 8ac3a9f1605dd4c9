"""`frugal bench`'s figures: the phases it ran, summed up per stack and load, as report.md and plots."""
from __future__ import annotations

import math
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bench_args import PEER_NAMES
from benchmarks.metrics import percentile
from benchmarks.serving_clients import RequestResult

PERCENTILES = (50, 95, 99)


@dataclass(frozen=True, slots=True)
class Point:
    """One load level: closed loop at `concurrency`, or open loop at `rate` requests a second."""

    concurrency: int | None = None
    rate: float | None = None

    @property
    def label(self) -> str:
        return f"concurrency {self.concurrency}" if self.concurrency is not None else f"{self.rate:g} req/s"

    @property
    def x(self) -> float:
        return float(self.concurrency if self.concurrency is not None else self.rate)


@dataclass(slots=True)
class Phase:
    """One stack at one point in one repeat."""

    peer: str
    repeat: int
    point: Point
    results: list[RequestResult]
    duration_s: float
    peak_rss_bytes: int

    @property
    def output_tokens(self) -> int:
        return sum(r.num_output_tokens for r in self.results if r.error is None)

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s > 0 else 0.0


def _pcts(values: list[float]) -> dict[str, float | None]:
    return {f"p{q}": (percentile(values, q) * 1000 if values else None) for q in PERCENTILES}


def summarise(phases: list[Phase], price_per_hour: float) -> list[dict]:
    """One row per stack and point, over its repeats: median tok/s, pooled latency percentiles, peak memory."""
    rows = []
    keys = sorted({(p.peer, p.point) for p in phases}, key=lambda k: (k[1].x, _order(k[0])))
    for peer, point in keys:
        mine = [p for p in phases if p.peer == peer and p.point == point]
        results = [r for p in mine for r in p.results]
        done = [r for r in results if r.error is None]
        tok_s = statistics.median(p.output_tok_s for p in mine)
        ttft = [r.ttft_s for r in done if not math.isnan(r.ttft_s)]
        tpot = [t for r in done if (t := r.tpot_s) is not None]
        rows.append({
            "peer": peer, "point": point.label, "concurrency": point.concurrency, "rate": point.rate,
            "repeats": len(mine), "output_tok_s": tok_s, "output_tok_s_each": [p.output_tok_s for p in mine],
            "requests": len(results), "failed": len(results) - len(done),
            "exact_length": sum(r.ok for r in results),
            "ttft_ms": _pcts(ttft), "tpot_ms": _pcts(tpot),
            "decode_tok_s": 1 / statistics.median(tpot) if tpot else None,  # one stream's speed after the first
            "peak_rss_mib": max(p.peak_rss_bytes for p in mine) / 2**20,
            "usd_per_million_output_tokens": (price_per_hour / (tok_s * 3600) * 1e6) if tok_s > 0 else None,
        })
    for row in rows:
        base = next(r for r in rows if r["peer"] == "frugal" and r["point"] == row["point"])
        row["frugal_ratio"] = base["output_tok_s"] / row["output_tok_s"] if row["output_tok_s"] else None
    return rows


def _order(peer: str) -> int:
    return ("frugal", *PEER_NAMES).index(peer)


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    lines = [f"# frugal bench {report['mode']}", "",
             f"- workload: {report['workload']}, {report['num_requests']} requests, seed {report['seed']}, "
             f"mean prompt {report['mean_prompt_len']:.0f} tokens, mean output {report['mean_output_len']:.0f}",
             f"- machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
             f"{report['threads']} threads per server; repeats {report['repeats']} (A B A B)",
             f"- price: {report['price_per_device_hour']:g} USD per device hour", ""]
    for name, why in report["absent"].items():
        lines.append(f"- **{name}: absent** ({why})")
    for name, why in report["failed_peers"].items():
        lines.append(f"- **{name}: failed** ({why.splitlines()[0]})")
    if report["absent"] or report["failed_peers"]:
        lines.append("")
    lines += ["| stack | load | output tok/s | frugal ratio | TTFT p50 / p95 / p99 ms | TPOT p50 / p95 / p99 ms "
              "| decode tok/s | peak MiB | USD / M tokens | failed |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in report["rows"]:
        ttft, tpot = row["ttft_ms"], row["tpot_ms"]
        lines.append(
            f"| {row['peer']} | {row['point']} | {row['output_tok_s']:.1f} | "
            f"{'-' if row['peer'] == 'frugal' else _fmt(row['frugal_ratio'], '.2f') + 'x'} | "
            f"{_fmt(ttft['p50'], '.0f')} / {_fmt(ttft['p95'], '.0f')} / {_fmt(ttft['p99'], '.0f')} | "
            f"{_fmt(tpot['p50'])} / {_fmt(tpot['p95'])} / {_fmt(tpot['p99'])} | {_fmt(row['decode_tok_s'])} | "
            f"{row['peak_rss_mib']:.0f} | {_fmt(row['usd_per_million_output_tokens'], '.3f')} | "
            f"{row['failed']} of {row['requests']} |")
    lines += ["", "frugal ratio: frugal's output tok/s over the stack's at the same load (above 1: frugal is faster). "
              "Output tok/s is the median over repeats; latency percentiles pool every repeat's requests."]
    if report["plots"]:
        lines += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in report["plots"]]
    else:
        lines += ["", f"(no plots: {report['plots_skipped']})"]
    return "\n".join(lines) + "\n"


def plots(out: Path, phases: list[Phase], rows: list[dict], mode: str) -> list[str]:
    """throughput.png and latency_cdf.png; raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    peers = sorted({r["peer"] for r in rows}, key=_order)
    fig, ax = plt.subplots(figsize=(6, 4))
    for peer in peers:
        mine = [r for r in rows if r["peer"] == peer]
        xs = [r["concurrency"] if r["concurrency"] is not None else r["rate"] for r in mine]
        ax.plot(xs, [r["output_tok_s"] for r in mine], marker="o", label=peer)
    ax.set_xlabel("requests a second" if mode == "latency" else "concurrent requests")
    ax.set_ylabel("output tok/s")
    ax.set_title(f"frugal bench {mode}: throughput")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    plt.close(fig)
    written.append(str(out / "throughput.png"))

    heaviest = max(p.point.x for p in phases)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for peer in peers:
        done = [r for p in phases if p.peer == peer and p.point.x == heaviest for r in p.results if r.error is None]
        for ax, values in ((axes[0], [r.ttft_s * 1000 for r in done if not math.isnan(r.ttft_s)]),
                           (axes[1], [t * 1000 for r in done if (t := r.tpot_s) is not None])):
            if values:
                values = sorted(values)
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=peer)
    for ax, name in zip(axes, ("TTFT (ms)", "TPOT (ms)")):
        ax.set_xlabel(name)
        ax.set_ylabel("share of requests")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"frugal bench {mode}: latency at the heaviest load")
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=120)
    plt.close(fig)
    written.append(str(out / "latency_cdf.png"))
    return written


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
