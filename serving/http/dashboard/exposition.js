// The Prometheus text exposition format (version 0.0.4), parsed in the browser, and the PromQL arithmetic the
// dashboard needs on it: sums by label, counter rates between two polls, histogram quantiles.
// Pure functions with no DOM, so `node --test` checks them (tests/dashboard_exposition.test.mjs).

// One line: a metric name, optional {labels}, a value, an optional timestamp (ignored).
const SAMPLE_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*/;

function parseValue(text) {
  // Go's ParseFloat spellings that Prometheus clients write.
  if (text === "+Inf" || text === "Inf") return Infinity;
  if (text === "-Inf") return -Infinity;
  if (text === "NaN") return NaN;
  const value = Number(text);
  if (text === "" || Number.isNaN(value)) throw new Error(`bad sample value ${JSON.stringify(text)}`);
  return value;
}

// The label set from `{` to its `}`: returns [labels, index after the closing brace].
function parseLabels(line, start) {
  const labels = {};
  let i = start + 1;
  for (;;) {
    while (line[i] === " ") i++;
    if (line[i] === "}") return [labels, i + 1];
    const name = LABEL_NAME.exec(line.slice(i));
    if (name === null) throw new Error(`bad label name at column ${i + 1}`);
    i += name[0].length;
    while (line[i] === " ") i++;
    if (line[i] !== "=") throw new Error(`expected ="value" after label ${name[0]}`);
    i += 1;
    while (line[i] === " ") i++;
    if (line[i] !== '"') throw new Error(`expected ="value" after label ${name[0]}`);
    i += 1;
    let value = "";
    for (;;) {
      const c = line[i];
      if (c === undefined) throw new Error(`unterminated value of label ${name[0]}`);
      if (c === '"') break;
      if (c === "\\") {
        // The format escapes exactly three characters in label values: backslash, double quote, newline.
        const next = line[i + 1];
        value += next === "n" ? "\n" : next === '"' ? '"' : next === "\\" ? "\\" : "\\" + (next ?? "");
        i += 2;
      } else {
        value += c;
        i += 1;
      }
    }
    labels[name[0]] = value;
    i += 1;
    while (line[i] === " ") i++;
    if (line[i] === ",") i += 1;
    else if (line[i] !== "}") throw new Error(`expected , or } after label ${name[0]}`);
  }
}

// The whole exposition text -> {samples: [{name, labels, value}], types: {family: "counter" | ...}}.
// A malformed line throws with its line number: a scrape that half-parses would show wrong numbers.
export function parseExposition(text) {
  const samples = [];
  const types = {};
  const lines = text.split("\n");
  for (let n = 0; n < lines.length; n++) {
    const line = lines[n].trim();
    if (line === "") continue;
    if (line.startsWith("#")) {
      const type = /^#\s*TYPE\s+(\S+)\s+(\S+)/.exec(line);
      if (type !== null) types[type[1]] = type[2];
      continue;
    }
    try {
      const name = SAMPLE_NAME.exec(line);
      if (name === null) throw new Error("bad metric name");
      let labels = {};
      let i = name[0].length;
      if (line[i] === "{") [labels, i] = parseLabels(line, i);
      const rest = line.slice(i).trim().split(/\s+/);
      if (rest.length < 1 || rest.length > 2) throw new Error("expected a value and an optional timestamp");
      samples.push({ name: name[0], labels, value: parseValue(rest[0]) });
    } catch (e) {
      throw new Error(`/metrics line ${n + 1}: ${e.message}`);
    }
  }
  return { samples, types };
}

// A parsed scrape, indexed by sample name, with the time (ms) it was taken.
export class Snapshot {
  constructor(text, timeMs) {
    this.timeMs = timeMs;
    this.byName = new Map();
    const { samples, types } = parseExposition(text);
    this.types = types;
    for (const sample of samples) {
      if (!this.byName.has(sample.name)) this.byName.set(sample.name, []);
      this.byName.get(sample.name).push(sample);
    }
  }

  has(name) {
    return this.byName.has(name);
  }

  samples(name) {
    return this.byName.get(name) ?? [];
  }

  // sum(name{filter}): 0 where nothing matches (a counter no request has touched yet).
  sum(name, filter = {}) {
    let total = 0;
    for (const s of this.samples(name)) if (matches(s.labels, filter)) total += s.value;
    return total;
  }

  max(name) {
    let best = null;
    for (const s of this.samples(name)) if (best === null || s.value > best) best = s.value;
    return best;
  }

  // sum by (label) (name): Map label value -> sum.
  sumBy(name, label, filter = {}) {
    const out = new Map();
    for (const s of this.samples(name)) {
      if (!matches(s.labels, filter)) continue;
      const key = s.labels[label] ?? "";
      out.set(key, (out.get(key) ?? 0) + s.value);
    }
    return out;
  }

  // The histogram's cumulative buckets summed over every other label: [[le, count], ...] sorted by le.
  buckets(histogram) {
    const byLe = new Map();
    for (const s of this.samples(`${histogram}_bucket`)) {
      const le = parseValue(s.labels.le);
      byLe.set(le, (byLe.get(le) ?? 0) + s.value);
    }
    return [...byLe.entries()].sort((a, b) => a[0] - b[0]);
  }
}

function matches(labels, filter) {
  for (const [k, v] of Object.entries(filter)) if (labels[k] !== v) return false;
  return true;
}

// increase() of a counter between two values; a drop means the daemon restarted, so count from zero (PromQL's rule).
export function increase(before, after) {
  return after >= before ? after - before : after;
}

// Per-second rate of sum(name{filter}) from `older` to `newer`; null without two distinct polls.
export function rate(older, newer, name, filter = {}) {
  if (older === null || newer === null || newer.timeMs <= older.timeMs) return null;
  return increase(older.sum(name, filter), newer.sum(name, filter)) / ((newer.timeMs - older.timeMs) / 1000);
}

// Per-label increase of a counter between two polls (a label new in `newer` counts from zero).
export function increaseBy(older, newer, name, label, filter = {}) {
  const after = newer.sumBy(name, label, filter);
  const before = older === null ? new Map() : older.sumBy(name, label, filter);
  const out = new Map();
  for (const [key, value] of after) out.set(key, increase(before.get(key) ?? 0, value));
  return out;
}

// The buckets observed between two polls (`older` null: since the daemon started).
export function bucketIncrease(older, newer, histogram) {
  const before = new Map(older === null ? [] : older.buckets(histogram));
  return newer.buckets(histogram).map(([le, count]) => [le, increase(before.get(le) ?? 0, count)]);
}

// histogram_quantile(q, buckets) with Prometheus's interpolation: linear inside the bucket that holds the rank,
// the lowest bucket starting at 0, and the highest finite bound when the rank falls in +Inf. null: no observations.
export function histogramQuantile(q, buckets) {
  if (buckets.length === 0) return null;
  const total = buckets[buckets.length - 1][1];
  if (!(total > 0)) return null;
  const rank = q * total;
  let prevLe = 0;
  let prevCount = 0;
  for (const [le, count] of buckets) {
    if (count >= rank) {
      if (le === Infinity) return prevLe;
      if (count === prevCount) return le;
      const lower = prevLe === 0 && le <= 0 ? le : prevLe;
      return lower + ((le - lower) * (rank - prevCount)) / (count - prevCount);
    }
    prevLe = le;
    prevCount = count;
  }
  return prevLe;
}
