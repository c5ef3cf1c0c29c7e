// The stream page: the record (`GET {root}/{id}` as JSON), its chunks with their times
// (`GET {root}/{id}/chunks`), the token timeline drawn as inline SVG; a live stream is joined
// through `GET {root}/{id}/events?format=sse&after=<last seq>` and grows as it streams.
import { badge, duration, el, getJSON, ms, streamUrl, svg, ttft, when } from "./viewer.js";

const id = document.body.dataset.streamId || "";
const base = streamUrl(id);
const $ = (selector) => document.querySelector(selector);
const textBox = $("#text");
const liveNote = $("#live-note");

const state = {
  record: null,
  chunks: [], // {seq, data, event, at_ms}: every chunk, text or not
  textEvent: null, // the event name of the text chunks (null: unnamed events)
  lastSeq: 0,
  anchor: null, // {serverMs, localMs}: the stream's clock (ms since it began) against performance.now()
  source: null,
  frame: 0,
};

// -- loading -------------------------------------------------------------------------------------
async function fetchChunks(after = 0) {
  const chunks = [];
  let page;
  do {
    page = await getJSON(`${base}/chunks?${new URLSearchParams({ after: String(after) })}`);
    chunks.push(...page.chunks);
    if (page.chunks.length) after = page.chunks[page.chunks.length - 1].seq;
  } while (page.more);
  return { page, chunks };
}

async function load() {
  let record, loaded;
  try {
    record = await getJSON(base);
    loaded = await fetchChunks(0);
  } catch (error) {
    badge(error.status === 404 ? "not found" : "error", $("#status"));
    document.body.dataset.status = error.status === 404 ? "missing" : "error";
    liveNote.textContent = error.status === 404 ? "No stream has this id." : `Could not load the stream: ${error.message}`;
    liveNote.className = "notice bad";
    return;
  }
  state.record = record;
  state.chunks = loaded.chunks;
  state.textEvent = loaded.page.text_event;
  state.lastSeq = loaded.chunks.length ? loaded.chunks[loaded.chunks.length - 1].seq : 0;
  state.anchor = { serverMs: loaded.page.elapsed_ms, localMs: performance.now() };
  render(true);
  if (record.status === "streaming") follow();
}

// -- live: the join endpoint, in plain SSE whatever format the stream was produced in ---------------
function nowMs() {
  const { serverMs, localMs } = state.anchor;
  return serverMs + (performance.now() - localMs);
}

function follow() {
  const query = new URLSearchParams({ format: "sse", after: String(state.lastSeq) });
  const source = new EventSource(`${base}/events?${query}`);
  state.source = source;
  document.body.classList.add("live");
  liveNote.textContent = "Live: joined the stream, new tokens appear as they are generated.";
  source.addEventListener(state.textEvent || "message", (event) => take(event));
  source.addEventListener("open", () => { liveNote.textContent = "Live: joined the stream."; });
  source.addEventListener("done", () => end("the stream ended"));
  source.addEventListener("shutdown", () => end("the server shut down"));
  source.addEventListener("error", (event) => {
    if (event.data !== undefined) end("the stream failed"); // the stream's own `error` event
    else if (source.readyState === EventSource.CLOSED) end("the connection closed");
    else liveNote.textContent = "Connection lost: reconnecting…";
  });
}

function take(event) {
  const seq = Number(String(event.lastEventId).split(":").pop());
  if (!(seq > state.lastSeq)) return; // already shown
  const last = state.chunks[state.chunks.length - 1];
  const at = Math.max(nowMs(), last ? last.at_ms : 0); // the arrival time: replaced by the recorded one at the end
  state.lastSeq = seq;
  state.chunks.push({ seq, data: event.data, event: state.textEvent, at_ms: at });
  textBox.append(document.createTextNode(event.data));
  if (!state.frame) state.frame = requestAnimationFrame(() => { state.frame = 0; render(false); });
}

async function end(why) {
  if (!state.source) return;
  state.source.close();
  state.source = null;
  liveNote.textContent = `Live: ${why}; reading the record…`;
  // The record, once its end is stored (at once here; another process writes it within moments).
  for (let attempt = 0; attempt < 20; attempt++) {
    try {
      const record = await getJSON(base);
      state.record = record;
      if (record.status !== "streaming") break;
    } catch (error) {
      liveNote.textContent = `Could not read the record: ${error.message}`;
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
  try {
    const { page, chunks } = await fetchChunks(0); // the recorded times, instead of arrival times
    state.chunks = chunks;
    state.textEvent = page.text_event;
    state.lastSeq = chunks.length ? chunks[chunks.length - 1].seq : 0;
  } catch (error) {
    liveNote.textContent = `Could not read the chunks: ${error.message}`;
  }
  document.body.classList.remove("live");
  liveNote.textContent = state.record.status === "streaming" ? `Live: ${why}.` : "";
  render(true);
}

// -- rendering -------------------------------------------------------------------------------------
function textChunks() {
  return state.chunks.filter((c) => c.event === state.textEvent);
}

function render(full) {
  const record = state.record;
  const live = Boolean(state.source);
  document.body.dataset.status = record.status;
  badge(record.status, $("#status"));
  document.title = `${record.status} · stream ${record.id}`;
  const chunks = textChunks();
  if (full) textBox.textContent = live ? chunks.map((c) => c.data).join("") : record.content;
  const error = $("#error");
  error.textContent = record.error || "";
  error.classList.toggle("shown", Boolean(record.error));

  const chars = chunks.reduce((n, c) => n + c.data.length, 0);
  const first = ttft(record) ?? (state.chunks.length ? state.chunks[0].at_ms : null);
  const took = live ? nowMs() : duration(record);
  $("#text-stats").textContent = `${chars} characters in ${chunks.length} text chunks`;
  const events = {};
  for (const c of state.chunks) events[c.event ?? "message"] = (events[c.event ?? "message"] || 0) + 1;
  const fields = [
    ["Status", badge(record.status)],
    ["Stream id", el("code", {}, record.id)],
    ["Key", record.key ?? "—"],
    ["Endpoint", [record.method, record.path].filter(Boolean).join(" ") || "—"],
    ["Format", record.format ?? "—"],
    ["Started", when(record.created_at)],
    ["Ended", live ? "still streaming" : when(record.completed_at)],
    ["TTFT", ms(first)],
    ["Duration", ms(took) + (live ? " …" : "")],
    ["Chunks", String(Math.max(record.chunk_count, state.lastSeq))],
    ["Events", Object.entries(events).map(([name, n]) => `${name}: ${n}`).join(", ") || "—"],
  ];
  $("#meta").replaceChildren(...fields.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)]));
  $("#metadata").textContent = JSON.stringify(record.metadata, null, 2);
  plots(chunks, first, live ? nowMs() : duration(record));
}

// -- the token timeline, as inline SVG --------------------------------------------------------------
const W = 900, H = 250, M = { left: 56, right: 16, top: 14, bottom: 30 };

function niceStep(max, ticks = 5) {
  const raw = Math.max(max, 1e-9) / ticks;
  const power = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
}

function scale(domain, from, to) {
  return (v) => from + (to - from) * (domain ? v / domain : 0);
}

function axes(chart, xMax, yMax, { w = W, h = H, xLabel = ms, yLabel = (v) => String(v), yTicks = 4 } = {}) {
  const x = scale(xMax, M.left, w - M.right);
  const y = scale(yMax, h - M.bottom, M.top);
  const ys = niceStep(yMax, yTicks);
  for (let v = 0; v <= yMax + 1e-9; v += ys) {
    chart.append(svg("line", { class: v ? "grid" : "axis", x1: M.left, x2: w - M.right, y1: y(v), y2: y(v) }),
                 svg("text", { x: M.left - 6, y: y(v) + 4, "text-anchor": "end" }, yLabel(v)));
  }
  const xs = niceStep(xMax, w > 600 ? 8 : 4);
  for (let v = 0; v <= xMax + 1e-9; v += xs) {
    chart.append(svg("line", { class: "axis", x1: x(v), x2: x(v), y1: h - M.bottom, y2: h - M.bottom + 4 }),
                 svg("text", { x: x(v), y: h - M.bottom + 16, "text-anchor": "middle" }, xLabel(v)));
  }
  return { x, y };
}

function quantile(sorted, q) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

function plots(chunks, first, end) {
  const lastAt = chunks.length ? chunks[chunks.length - 1].at_ms : 0;
  const xMax = Math.max(end || 0, lastAt, first || 0, 1) * 1.02;
  const total = chunks.reduce((n, c) => n + c.data.length, 0);

  // 1. cumulative characters over time: a step line from (0, 0), each chunk a step up.
  const chart = svg("svg", { class: "plot", id: "timeline-svg", viewBox: `0 0 ${W} ${H}`, role: "img",
                             "data-points": chunks.length, "data-chars": total,
                             "aria-label": `${total} characters in ${chunks.length} chunks over ${ms(end)}` });
  chart.append(svg("title", {}, "Cumulative characters over time"));
  const { x, y } = axes(chart, xMax, Math.max(total, 1));
  let d = `M ${x(0)} ${y(0)}`;
  let sum = 0;
  for (const c of chunks) {
    d += ` H ${x(c.at_ms).toFixed(1)}`;
    sum += c.data.length;
    d += ` V ${y(sum).toFixed(1)}`;
  }
  d += ` H ${x(Math.max(end || 0, lastAt)).toFixed(1)}`;
  chart.append(svg("path", { class: "area", d: `${d} V ${y(0)} Z` }), svg("path", { class: "line", d }));
  if (first !== null && chunks.length) {
    const fx = x(first);
    const labelLeft = fx > W * 0.7;
    chart.append(
      svg("line", { class: "first", id: "first-token", x1: fx, x2: fx, y1: M.top, y2: H - M.bottom }),
      svg("circle", { class: "first-dot", cx: x(chunks[0].at_ms), cy: y(chunks[0].data.length), r: 4 }),
      svg("text", { class: "first-label", x: fx + (labelLeft ? -6 : 6), y: M.top + 12,
                    "text-anchor": labelLeft ? "end" : "start" }, `first token · ${ms(first)}`));
  }
  $("#timeline").replaceChildren(chart);

  // 2. the gaps between text chunks, over the same time axis (a strip) and as a histogram.
  const gaps = chunks.slice(1).map((c, i) => ({ at: c.at_ms, gap: c.at_ms - chunks[i].at_ms }));
  const sorted = gaps.map((g) => g.gap).sort((a, b) => a - b);
  const median = quantile(sorted, 0.5), p95 = quantile(sorted, 0.95), max = sorted.length ? sorted[sorted.length - 1] : 0;
  const slow = Math.max(4 * (median || 0), 1);
  const sh = 150;
  const strip = svg("svg", { class: "plot", id: "gaps-svg", viewBox: `0 0 ${W} ${sh}`, role: "img",
                             "data-gaps": gaps.length, "aria-label": "Inter-token gaps over time" });
  const gapMax = Math.max(max, 1);
  const s = axes(strip, xMax, gapMax, { h: sh, yTicks: 3, yLabel: ms });
  const barWidth = Math.max(1.5, Math.min(6, (W - M.left - M.right) / Math.max(gaps.length, 1) * 0.6));
  for (const g of gaps) {
    strip.append(svg("rect", { class: g.gap >= slow ? "gap slow" : "gap", x: s.x(g.at) - barWidth / 2,
                               y: s.y(g.gap), width: barWidth, height: Math.max(0.5, s.y(0) - s.y(g.gap)) },
                     svg("title", {}, `${ms(g.gap)} before the chunk at ${ms(g.at)}`)));
  }
  $("#gaps").replaceChildren(strip);

  const hw = 440, bins = 16;
  const counts = new Array(bins).fill(0);
  for (const g of sorted) counts[Math.min(bins - 1, Math.floor((g / gapMax) * bins))] += 1;
  const histogram = svg("svg", { class: "plot", id: "histogram-svg", viewBox: `0 0 ${hw} ${sh}`, role: "img",
                                 "aria-label": "How many gaps of each length" });
  const hs = axes(histogram, gapMax, Math.max(...counts, 1), { w: hw, h: sh, yTicks: 3 });
  counts.forEach((n, i) => {
    if (!n) return;
    const x0 = hs.x((i / bins) * gapMax), x1 = hs.x(((i + 1) / bins) * gapMax);
    histogram.append(svg("rect", { class: "bin", x: x0 + 0.5, y: hs.y(n), width: Math.max(0.5, x1 - x0 - 1),
                                   height: hs.y(0) - hs.y(n) }, svg("title", {}, `${n} gaps`)));
  });
  $("#histogram").replaceChildren(histogram);

  const rate = chunks.length > 1 && lastAt > chunks[0].at_ms
    ? `${((total - chunks[0].data.length) / ((lastAt - chunks[0].at_ms) / 1000)).toFixed(0)} chars/s` : "—";
  const stat = (name, value) => el("span", {}, `${name} `, el("b", {}, value));
  $("#plot-stats").replaceChildren(stat("first token", ms(first)), stat("median gap", ms(median)),
                                   stat("p95 gap", ms(p95)), stat("longest gap", ms(max || null)),
                                   stat("rate after the first token", rate));
}

load();
