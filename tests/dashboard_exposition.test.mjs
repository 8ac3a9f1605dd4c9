// node --test: the dashboard's exposition parser and its PromQL arithmetic (run by tests/test_dashboard.py).
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  Snapshot, bucketIncrease, histogramQuantile, increase, increaseBy, parseExposition, rate,
} from "../serving/http/dashboard/exposition.js";

const SCRAPE = `# HELP frugal:cost_usd_total What requests cost.
# TYPE frugal:cost_usd_total counter
frugal:cost_usd_total{tenant="default",workflow="",model_name="m"} 0.25
frugal:cost_usd_total{tenant="a\\\\b",workflow="say \\"hi\\"\\nnow",model_name="m"} 1.5e-3
frugal:cost_usd_total{ tenant = "acme" , workflow="w",model_name="m", } 2 1700000000000
# TYPE frugal:e2e_request_latency_seconds histogram
frugal:e2e_request_latency_seconds_bucket{le="0.1",model_name="m"} 1.0
frugal:e2e_request_latency_seconds_bucket{le="1.0",model_name="m"} 3.0
frugal:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 4.0
frugal:e2e_request_latency_seconds_sum{model_name="m"} 5.5
frugal:e2e_request_latency_seconds_count{model_name="m"} 4.0
frugal:num_requests_waiting 3
frugal:saturation{model_name="m"} NaN
frugal:kv_cache_usage_perc{model_name="m"} -Inf
`;

test("samples: names with colons, labels with escapes, spaces and a trailing comma, values and timestamps", () => {
  const { samples, types } = parseExposition(SCRAPE);
  assert.equal(samples.length, 11);
  assert.deepEqual(samples[0], { name: "frugal:cost_usd_total", labels: { tenant: "default", workflow: "", model_name: "m" }, value: 0.25 });
  assert.deepEqual(samples[1].labels, { tenant: "a\\b", workflow: 'say "hi"\nnow', model_name: "m" });
  assert.equal(samples[1].value, 0.0015);
  assert.deepEqual(samples[2].labels, { tenant: "acme", workflow: "w", model_name: "m" });
  assert.equal(samples[2].value, 2);  // the timestamp is not the value
  assert.equal(samples[5].labels.le, "+Inf");
  assert.deepEqual(samples[8], { name: "frugal:num_requests_waiting", labels: {}, value: 3 });
  assert.ok(Number.isNaN(samples[9].value));
  assert.equal(samples[10].value, -Infinity);
  assert.deepEqual(types, { "frugal:cost_usd_total": "counter", "frugal:e2e_request_latency_seconds": "histogram" });
});

test("a malformed line is an error naming its line, not a half-read scrape", () => {
  assert.throws(() => parseExposition('ok 1\nfrugal:x{a="unterminated} 1\n'), /line 2: unterminated value of label a/);
  assert.throws(() => parseExposition("frugal:x one\n"), /line 1: bad sample value "one"/);
  assert.throws(() => parseExposition("frugal:x\n"), /line 1: bad sample value ""/);
  assert.throws(() => parseExposition('frugal:x{a"b"} 1\n'), /line 1: expected ="value" after label a/);
  assert.throws(() => parseExposition("{} 1\n"), /line 1: bad metric name/);
});

test("sums, sums by label, buckets summed over models", () => {
  const s = new Snapshot(SCRAPE + 'frugal:e2e_request_latency_seconds_bucket{le="1.0",model_name="n"} 2\n', 0);
  assert.equal(s.sum("frugal:cost_usd_total"), 2.2515);
  assert.equal(s.sum("frugal:cost_usd_total", { tenant: "acme" }), 2);
  assert.equal(s.sum("frugal:absent_total"), 0);
  assert.deepEqual([...s.sumBy("frugal:cost_usd_total", "workflow").keys()], ["", 'say "hi"\nnow', "w"]);
  assert.deepEqual(s.buckets("frugal:e2e_request_latency_seconds"), [[0.1, 1], [1, 5], [Infinity, 4]]);
  assert.equal(s.max("frugal:absent"), null);
});

test("rates between polls; a counter that drops restarted from zero", () => {
  const a = new Snapshot('frugal:generation_tokens_total{model_name="m"} 100\n', 1000);
  const b = new Snapshot('frugal:generation_tokens_total{model_name="m"} 300\n', 3000);
  const restarted = new Snapshot('frugal:generation_tokens_total{model_name="m"} 40\n', 5000);
  assert.equal(rate(a, b, "frugal:generation_tokens_total"), 100);
  assert.equal(rate(b, restarted, "frugal:generation_tokens_total"), 20);
  assert.equal(rate(null, b, "frugal:generation_tokens_total"), null);
  assert.equal(rate(b, b, "frugal:generation_tokens_total"), null);
  assert.equal(increase(5, 7), 2);
  const c = new Snapshot('frugal:requests_total{model_name="m"} 3\nfrugal:requests_total{model_name="n"} 1\n', 0);
  const d = new Snapshot('frugal:requests_total{model_name="m"} 5\nfrugal:requests_total{model_name="n"} 1\n'
    + 'frugal:requests_total{model_name="new"} 2\n', 2000);
  assert.deepEqual([...increaseBy(c, d, "frugal:requests_total", "model_name")], [["m", 2], ["n", 0], ["new", 2]]);
});

test("histogram_quantile as Prometheus computes it", () => {
  // Ten observations: 2 <= 0.1, 6 in (0.1, 0.5], 1 in (0.5, 1], 1 above 1.
  const buckets = [[0.1, 2], [0.5, 8], [1, 9], [Infinity, 10]];
  assert.equal(histogramQuantile(0.5, buckets), 0.1 + (0.4 * 3) / 6);
  assert.equal(histogramQuantile(0.1, buckets), 0.05);  // the lowest bucket starts at 0
  assert.equal(histogramQuantile(0.9, buckets), 1);
  assert.equal(histogramQuantile(0.95, buckets), 1);  // in +Inf: the highest finite bound
  assert.equal(histogramQuantile(0.95, [[0.1, 0], [Infinity, 0]]), null);
  assert.equal(histogramQuantile(0.95, []), null);
});

test("quantiles of what was observed between two polls", () => {
  const h = (lo, hi, inf) => new Snapshot(`x_bucket{le="0.1"} ${lo}\nx_bucket{le="1"} ${hi}\nx_bucket{le="+Inf"} ${inf}\n`, 0);
  const before = h(100, 100, 100);  // a hundred fast requests long ago
  const after = h(100, 110, 110);  // then ten slow ones
  assert.deepEqual(bucketIncrease(before, after, "x"), [[0.1, 0], [1, 10], [Infinity, 10]]);
  assert.equal(histogramQuantile(0.5, bucketIncrease(before, after, "x")), 0.55);
  assert.ok(histogramQuantile(0.5, after.buckets("x")) < 0.1);  // the lifetime quantile hides them
});
