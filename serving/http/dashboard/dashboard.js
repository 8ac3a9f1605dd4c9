// The /dashboard page: polls the daemon's /metrics every 2 s, keeps the last 10 minutes of scrapes, and draws
// big numbers, uPlot charts and tables from them. Every rate and quantile is computed here from the change
// between two scrapes (exposition.js), as PromQL's rate() and histogram_quantile() would.
import {
  Snapshot, bucketIncrease, histogramQuantile, increaseBy, parseExposition, rate,
} from "./exposition.js";

// Metric names: the same strings as serving/metrics/names.py.
const M = {
  running: "frugal:num_requests_running",
  waiting: "frugal:num_requests_waiting",
  kvUsage: "frugal:kv_cache_usage_perc",
  prefixQueries: "frugal:prefix_cache_queries_total",
  prefixHits: "frugal:prefix_cache_hits_total",
  promptTokens: "frugal:prompt_tokens_total",
  generationTokens: "frugal:generation_tokens_total",
  ttft: "frugal:time_to_first_token_seconds",
  e2e: "frugal:e2e_request_latency_seconds",
  saturation: "frugal:saturation",
  requests: "frugal:requests_total",
  cost: "frugal:cost_usd_total",
  busySeconds: "frugal:engine_busy_seconds_total",
  idleSeconds: "frugal:engine_idle_seconds_total",
  budgetUsd: "frugal:budget_remaining_usd",
  rateLimited: "frugal:rate_limited_total",
  budgetRefusals: "frugal:budget_refusals_total",
  tasks: "frugal:tasks_total",
  taskCost: "frugal:task_cost_usd_total",
  escalations: "frugal:escalations_total",
  gpuUtil: "frugal:gpu_utilization_perc",
};
// A cache shows up in the hit-rate table once the daemon exports `<prefix><cache>_cache_hits_total` beside
// `..._queries_total` (the prefix cache now; the response caches when their metrics land).
const CACHE_HITS = /^frugal:(\w+)_cache_hits_total$/;

const POLL_MS = 2000;
const HISTORY_MS = 10 * 60 * 1000;  // what the charts show
const TILE_RATE_MS = 10 * 1000;  // throughput: short, so the number follows the load
const TILE_WINDOW_MS = 60 * 1000;  // quantiles and cost/hour: long enough to hold a few requests
const CHART_QUANTILE_MS = 30 * 1000;
const CHART_MIN_SPAN_S = 120;  // a fresh page still gets a readable time axis (not milliseconds)

const history = [];  // Snapshot, oldest first
const series = { t: [], outTok: [], promptTok: [], ttft: [], e2e: [], waiting: [], running: [], kv: [], sat: [] };
const charts = [];

// -- formatting ----------------------------------------------------------------------------------------------
const dash = "—";
function fmtNumber(x, digits = 1) {
  if (x === null || !Number.isFinite(x)) return dash;
  return x.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}
function fmtUsd(x) {
  if (x === null || !Number.isFinite(x)) return dash;
  if (x === 0) return "$0";
  if (Math.abs(x) < 1) return "$" + x.toPrecision(3);  // agent calls cost fractions of a cent
  return "$" + x.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
}
function fmtSeconds(x) {
  if (x === null || !Number.isFinite(x)) return dash;
  return x < 1 ? `${fmtNumber(x * 1000, 0)} ms` : `${fmtNumber(x, 2)} s`;
}
function fmtPercent(x, digits = 1) {
  return x === null || !Number.isFinite(x) ? dash : `${(x * 100).toFixed(digits)}%`;
}
function fmtDuration(s) {
  if (s === null || !Number.isFinite(s)) return dash;
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  if (d > 0) return `${d}d ${h}h`;
  if (h > 0) return `${h}h ${m}m`;
  return m > 0 ? `${m}m ${Math.floor(s % 60)}s` : `${Math.floor(s)}s`;
}
const ratio = (num, den) => (den > 0 ? num / den : null);

// -- window arithmetic over the history ------------------------------------------------------------------------
const latest = () => history[history.length - 1] ?? null;
// The oldest snapshot no older than `ms` before the latest (the latest's predecessor at the least).
function since(ms) {
  if (history.length < 2) return null;
  const now = latest();
  const previous = history[history.length - 2];
  const oldest = history.find((s) => now.timeMs - s.timeMs <= ms + POLL_MS / 2);
  return oldest === now ? previous : oldest;
}
function windowQuantile(q, histogram, ms) {
  const older = since(ms);
  return older === null ? null : histogramQuantile(q, bucketIncrease(older, latest(), histogram));
}

// -- DOM helpers -----------------------------------------------------------------------------------------------
const $ = (id) => document.getElementById(id);
function setTile(id, value, text) {
  const el = $(id);
  el.dataset.value = value === null || !Number.isFinite(value) ? "" : String(value);
  el.textContent = text;
}
function setText(id, text) {
  $(id).textContent = text;
}
// A table from a header row and data rows; a row's first cell is its key (`data-key`, for tests and people).
function renderTable(id, head, rows, empty) {
  const table = $(id);
  table.replaceChildren();
  const thead = table.createTHead().insertRow();
  for (const h of head) thead.appendChild(Object.assign(document.createElement("th"), { textContent: h }));
  const body = table.createTBody();
  if (rows.length === 0) {
    const cell = body.insertRow().insertCell();
    cell.colSpan = head.length;
    cell.className = "empty";
    cell.textContent = empty;
    return;
  }
  for (const row of rows) {
    const tr = body.insertRow();
    tr.dataset.key = row[0];
    row.forEach((value, i) => { tr.insertCell().textContent = i === 0 && value === "" ? "(none)" : value; });
  }
}

// -- the tiles -------------------------------------------------------------------------------------------------
function renderTiles(now) {
  const tokRate = rate(since(TILE_RATE_MS), now, M.generationTokens);
  const reqRate = rate(since(TILE_RATE_MS), now, M.requests);
  setTile("tile-tok-s", tokRate, fmtNumber(tokRate));
  setText("tile-tok-s-sub", `tok/s, last 10 s · ${fmtNumber(reqRate, 2)} req/s`);

  for (const [id, metric] of [["tile-ttft", M.ttft], ["tile-e2e", M.e2e]]) {
    const p95 = windowQuantile(0.95, metric, TILE_WINDOW_MS);
    const allTime = histogramQuantile(0.95, now.buckets(metric));
    setTile(id, p95, fmtSeconds(p95));
    setText(`${id}-sub`, `last 1 min · since start ${fmtSeconds(allTime)}`);
  }

  const waiting = now.sum(M.waiting), running = now.sum(M.running);
  const queue = `${fmtNumber(waiting, 0)} / ${fmtNumber(running, 0)}`;
  setTile("tile-queue", waiting + running, now.has(M.waiting) ? queue : dash);
  const kv = now.max(M.kvUsage);
  setTile("tile-kv", kv, fmtPercent(kv));
  const sat = now.max(M.saturation);
  setTile("tile-saturation", sat, sat === null ? dash : sat.toFixed(2));
  $("tile-saturation-box").dataset.level = sat === null ? "" : sat >= 1 ? "over" : sat >= 0.8 ? "near" : "ok";

  const costRate = rate(since(TILE_WINDOW_MS), now, M.cost);
  const costPerHour = costRate === null ? null : costRate * 3600;
  setTile("tile-cost-h", costPerHour, fmtUsd(costPerHour));
  setText("tile-cost-h-sub", `last 1 min · ${fmtUsd(now.sum(M.cost))} since start`);

  const resolved = now.sum(M.tasks, { outcome: "resolved" });
  const perTask = ratio(now.sum(M.taskCost, { outcome: "resolved" }), resolved);
  setTile("tile-cost-task", perTask, fmtUsd(perTask));
  setText("tile-cost-task-sub", resolved > 0 ? `${fmtNumber(resolved, 0)} resolved task${resolved === 1 ? "" : "s"}`
    : "no resolved tasks yet");

  const older = since(TILE_WINDOW_MS);
  const hitsNow = older === null ? null : ratio(rate(older, now, M.prefixHits), rate(older, now, M.prefixQueries));
  const hitsAll = ratio(now.sum(M.prefixHits), now.sum(M.prefixQueries));
  setTile("tile-prefix", hitsNow ?? hitsAll, fmtPercent(hitsNow ?? hitsAll));
  setText("tile-prefix-sub", hitsNow !== null ? "prompt tokens, last 1 min" : "prompt tokens, since start");

  const escalation = ratio(now.sum(M.escalations), now.sum(M.requests));
  setTile("tile-escalation", escalation, fmtPercent(escalation));
}

// -- the header ------------------------------------------------------------------------------------------------
function renderHeader(now) {
  const models = new Set();
  const instances = new Set();
  for (const samples of now.byName.values()) {
    for (const s of samples) {
      if (s.labels.model_name) models.add(s.labels.model_name);
      if (s.labels.instance) instances.add(s.labels.instance);
    }
  }
  setText("models", models.size ? [...models].sort().join(", ") : dash);
  setText("replicas", String(Math.max(1, instances.size)));  // one daemon is one replica
  // Engine busy + idle time is the engine's lifetime, read off the daemon's own clock.
  const uptime = now.has(M.busySeconds) ? now.sum(M.busySeconds) + now.sum(M.idleSeconds) : null;
  setText("uptime", fmtDuration(uptime));
  setText("requests-total", fmtNumber(now.sum(M.requests), 0));
  const gpu = now.max(M.gpuUtil);
  $("gpu-fact").hidden = gpu === null;
  if (gpu !== null) setText("gpu", `${fmtPercent(gpu, 0)} busy`);
}

// -- the tables ------------------------------------------------------------------------------------------------
const byValue = (a, b) => b[1] - a[1] || String(a[0]).localeCompare(String(b[0]));

function costRows(now, label) {
  const total = now.sum(M.cost);
  const older = since(TILE_WINDOW_MS);
  const recent = increaseBy(older, now, M.cost, label);
  const elapsedH = older === null ? null : (now.timeMs - older.timeMs) / 3.6e6;
  return [...now.sumBy(M.cost, label).entries()].sort(byValue).map(([key, usd]) => [
    key, fmtUsd(usd), fmtPercent(ratio(usd, total), 0),
    elapsedH === null ? dash : fmtUsd((recent.get(key) ?? 0) / elapsedH)]);
}

function renderTables(now) {
  const costHead = (what) => [what, "cost", "share", "per hour now"];
  renderTable("cost-tenant", costHead("tenant"), costRows(now, "tenant"), "no spend yet");
  renderTable("cost-workflow", costHead("workflow"), costRows(now, "workflow"), "no spend yet");
  renderTable("cost-model", costHead("model"), costRows(now, "model_name"), "no spend yet");

  const taskCost = now.sumBy(M.taskCost, "outcome");
  renderTable("cost-outcome", ["outcome", "tasks", "cost", "cost/task"],
    [...now.sumBy(M.tasks, "outcome").entries()].sort(byValue).map(([outcome, count]) => {
      const usd = taskCost.get(outcome) ?? 0;
      return [outcome, fmtNumber(count, 0), fmtUsd(usd), fmtUsd(ratio(usd, count))];
    }),
    "no task outcomes reported (POST /v1/outcomes)");

  const requests = now.sum(M.requests);
  const escalations = now.sumBy(M.escalations, "model_name");
  renderTable("route-mix", ["model", "requests", "share", "escalated"],
    [...now.sumBy(M.requests, "model_name").entries()].sort(byValue).map(([model, count]) => [
      model, fmtNumber(count, 0), fmtPercent(ratio(count, requests), 0),
      fmtPercent(ratio(escalations.get(model) ?? 0, count), 1)]),
    "no requests yet");

  const caches = [];
  for (const name of now.byName.keys()) {
    const match = CACHE_HITS.exec(name);
    const queries = match && name.replace(/_hits_total$/, "_queries_total");
    if (match === null || !now.has(queries)) continue;
    const older = since(TILE_WINDOW_MS);
    const hits = now.sum(name), lookups = now.sum(queries);
    caches.push([match[1], fmtNumber(hits, 0), fmtNumber(lookups, 0), fmtPercent(ratio(hits, lookups)),
      older === null ? dash : fmtPercent(ratio(rate(older, now, name), rate(older, now, queries)))]);
  }
  renderTable("cache-hits", ["cache", "hits", "lookups", "hit rate", "last 1 min"], caches, "no cache metrics yet");

  const tenants = new Set([...now.sumBy(M.requests, "tenant").keys(), ...now.sumBy(M.rateLimited, "tenant").keys(),
    ...now.sumBy(M.budgetRefusals, "tenant").keys()]);
  const limited = now.sumBy(M.rateLimited, "tenant"), overBudget = now.sumBy(M.budgetRefusals, "tenant");
  const refused = now.sumBy(M.requests, "tenant", { status: "refused" });
  const failed = now.sumBy(M.requests, "tenant", { status: "failed" });
  renderTable("refusals", ["tenant", "rate limit", "budget", "refused", "failed"],
    [...tenants].sort().map((t) => [t, fmtNumber(limited.get(t) ?? 0, 0), fmtNumber(overBudget.get(t) ?? 0, 0),
      fmtNumber(refused.get(t) ?? 0, 0), fmtNumber(failed.get(t) ?? 0, 0)]),
    "no requests yet");

  renderTable("budgets", ["scope / id", "remaining"],
    now.samples(M.budgetUsd).map((s) => [`${s.labels.scope} / ${s.labels.id}`, fmtUsd(s.value)])
      .sort((a, b) => a[0].localeCompare(b[0])),
    "no USD budgets configured");
}

// -- the charts ------------------------------------------------------------------------------------------------
function pushPoint(now) {
  const prev = history.length >= 2 ? history[history.length - 2] : null;
  const older = since(CHART_QUANTILE_MS);
  series.t.push(now.timeMs / 1000);
  series.outTok.push(rate(prev, now, M.generationTokens));
  series.promptTok.push(rate(prev, now, M.promptTokens));
  series.ttft.push(older === null ? null : histogramQuantile(0.95, bucketIncrease(older, now, M.ttft)));
  series.e2e.push(older === null ? null : histogramQuantile(0.95, bucketIncrease(older, now, M.e2e)));
  series.waiting.push(now.has(M.waiting) ? now.sum(M.waiting) : null);
  series.running.push(now.has(M.running) ? now.sum(M.running) : null);
  series.kv.push(now.max(M.kvUsage) === null ? null : now.max(M.kvUsage) * 100);
  series.sat.push(now.max(M.saturation));
  const cutoff = now.timeMs / 1000 - HISTORY_MS / 1000;
  while (series.t.length > 0 && series.t[0] < cutoff) for (const s of Object.values(series)) s.shift();
}

// The legend shows the value under the cursor, and the latest one while the cursor is elsewhere.
function legendValue(fmt) {
  return (u, v, seriesIdx, idx) => {
    const column = u.data[seriesIdx];
    const value = idx === null ? column[column.length - 1] : v;
    return value === null || value === undefined ? dash : fmt(value);
  };
}

function yScale(axis) {
  return axis.range ? { range: axis.range } : { range: (u, lo, hi) => [0, Math.max((hi ?? 0) * 1.1, axis.min ?? 1)] };
}

function makeChart(id, lines, axes, data) {
  const el = $(id);
  const grid = { stroke: "#eef0f3" };
  const opts = {
    width: el.clientWidth || 600, height: 200,
    series: [{ label: "time", value: (u, v) => (v === null ? "now" : new Date(v * 1000).toLocaleTimeString()) },
      ...lines.map((l) => ({ label: l.label, stroke: l.color, width: 2, scale: l.scale ?? "y", fill: l.fill,
        value: legendValue(l.fmt) }))],
    axes: [{ stroke: "#6b7280", grid },
      ...axes.map((a) => ({ scale: a.scale, side: a.side ?? 3, stroke: "#6b7280", size: 60,
        grid: { ...grid, show: a.side !== 1 }, values: (u, ticks) => ticks.map(a.fmt) }))],
    scales: { x: { time: true, range: (u, lo, hi) => [Math.min(lo ?? hi, (hi ?? 0) - CHART_MIN_SPAN_S), hi] },
      ...Object.fromEntries(axes.map((a) => [a.scale, yScale(a)])) },
    cursor: { drag: { x: false, y: false } },
  };
  const chart = new uPlot(opts, data(), el);
  charts.push({ chart, el, data });
}

function setUpCharts() {
  const s = series;
  const count = (v) => fmtNumber(v, 0);
  const perSecond = (v) => fmtNumber(v, 1);
  const percent = (v) => `${v.toFixed(1)}%`;
  makeChart("chart-throughput", [
    { label: "output tok/s", color: "#2563eb", fill: "rgba(37,99,235,0.08)", fmt: perSecond },
    { label: "prompt tok/s", color: "#9ca3af", fmt: perSecond },
  ], [{ scale: "y", fmt: perSecond }], () => [s.t, s.outTok, s.promptTok]);
  makeChart("chart-latency", [
    { label: "TTFT p95", color: "#7c3aed", fmt: fmtSeconds },
    { label: "e2e p95", color: "#db2777", fmt: fmtSeconds },
  ], [{ scale: "y", fmt: fmtSeconds, min: 0.1 }], () => [s.t, s.ttft, s.e2e]);
  makeChart("chart-queue", [
    { label: "waiting", color: "#ea580c", fill: "rgba(234,88,12,0.08)", fmt: count },
    { label: "running", color: "#059669", fmt: count },
  ], [{ scale: "y", fmt: count, min: 4 }], () => [s.t, s.waiting, s.running]);
  makeChart("chart-load", [
    { label: "KV usage %", color: "#0891b2", fill: "rgba(8,145,178,0.08)", fmt: percent },
    { label: "saturation", color: "#dc2626", scale: "sat", fmt: (v) => v.toFixed(2) },
  ], [
    { scale: "y", fmt: (v) => `${v}%`, range: [0, 100] },
    { scale: "sat", side: 1, fmt: (v) => v.toFixed(1), min: 1.2 },  // 1.0 = at target load: always in view
  ], () => [s.t, s.kv, s.sat]);
  new ResizeObserver(() => {
    for (const { chart, el } of charts) chart.setSize({ width: el.clientWidth, height: 200 });
  }).observe(document.querySelector(".charts"));
}

// -- the poll loop ---------------------------------------------------------------------------------------------
function setStatus(state, text) {
  const el = $("status");
  el.dataset.state = state;
  setText("status-text", text);
}

async function poll() {
  let now;
  try {
    const response = await fetch("/metrics", { cache: "no-store" });
    if (!response.ok) throw new Error(`/metrics answered HTTP ${response.status}`);
    const text = await response.text();
    try {
      now = new Snapshot(text, Date.now());
    } catch (e) {
      console.error(e);  // a scrape this parser cannot read is a bug on one side or the other: say so loudly
      throw e;
    }
  } catch (e) {
    // Keep the last good numbers on screen; say why they stopped moving.
    setStatus("error", `${e.message} · retrying every ${POLL_MS / 1000} s`);
    setTimeout(poll, POLL_MS);
    return;
  }
  // NOTE: a bug in the drawing below is not caught, so that it reaches the console (and the browser test).
  setTimeout(poll, POLL_MS);
  history.push(now);
  while (now.timeMs - history[0].timeMs > HISTORY_MS + TILE_WINDOW_MS) history.shift();
  pushPoint(now);
  renderHeader(now);
  renderTiles(now);
  renderTables(now);
  for (const { chart, data } of charts) chart.setData(data());
  const el = $("status");
  el.dataset.polls = String(Number(el.dataset.polls) + 1);
  setStatus("live", `live · ${new Date(now.timeMs).toLocaleTimeString()}`);
}

// The parser, for the browser test that checks it against prometheus_client's on the same scrape.
window.frugalDashboard = { parseExposition };
setUpCharts();
poll();
