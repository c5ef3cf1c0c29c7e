// The list page: recent streams from `GET {root}/?status=&key=&q=&limit=` (JSON), newest first,
// refreshed every second while one of them is live (every five seconds otherwise).
import { badge, duration, el, getJSON, ms, root, streamUrl, ttft, when } from "./viewer.js";

const FILTERS = ["status", "key", "q", "limit"];
const LIVE_EVERY_MS = 1000;
const IDLE_EVERY_MS = 5000;

const form = document.getElementById("filters");
const rowsBody = document.getElementById("rows");
const summary = document.getElementById("summary");
let timer = null;
let generation = 0; // answers to superseded requests are dropped

/** The filters in the page's URL (what a shared link or a reload keeps). */
function current() {
  const params = new URLSearchParams(location.search);
  const out = new URLSearchParams();
  for (const name of FILTERS) {
    const value = (params.get(name) || "").trim();
    if (value) out.set(name, value);
  }
  return out;
}

function showFilters(params) {
  for (const name of FILTERS) {
    const field = form.elements.namedItem(name);
    field.value = params.get(name) || (name === "limit" ? "50" : "");
  }
}

function apply(params) {
  const query = params.toString();
  history.pushState(null, "", query ? `?${query}` : location.pathname);
  refresh();
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const params = new URLSearchParams();
  for (const name of FILTERS) {
    const value = form.elements.namedItem(name).value.trim();
    if (value && !(name === "limit" && value === "50")) params.set(name, value);
  }
  apply(params);
});
form.elements.namedItem("status").addEventListener("change", () => form.requestSubmit());
form.elements.namedItem("limit").addEventListener("change", () => form.requestSubmit());
document.getElementById("f-clear").addEventListener("click", () => apply(new URLSearchParams()));
window.addEventListener("popstate", () => refresh());
document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });

function message(text, bad = false) {
  rowsBody.replaceChildren(el("tr", {}, el("td", { class: `empty${bad ? " notice bad" : ""}`, colspan: 8 }, text)));
}

function row(stream) {
  const keyLink = stream.key
    ? el("a", { href: `?${new URLSearchParams({ key: stream.key })}`, title: stream.key }, stream.key)
    : "—";
  const endpoint = [stream.method, stream.path].filter(Boolean).join(" ") || "—";
  const live = stream.status === "streaming";
  return el("tr", { "data-stream-id": stream.id, "data-status": stream.status, class: live ? "streaming" : null },
    el("td", { class: "status" }, badge(stream.status)),
    el("td", { class: "stream" },
      el("a", { href: streamUrl(stream.id) }, stream.id),
      el("span", { class: "preview", title: stream.preview || null }, stream.preview || "")),
    el("td", { class: "key" }, keyLink),
    el("td", { class: "endpoint" }, endpoint),
    el("td", { class: "when", title: stream.created_at }, when(stream.created_at)),
    el("td", { class: "num ttft" }, ms(ttft(stream))),
    el("td", { class: "num duration" }, ms(duration(stream)) + (live ? " …" : "")),
    el("td", { class: "num chunks" }, String(stream.chunk_count)));
}

function describe(params, count, live) {
  const parts = [`${count} stream${count === 1 ? "" : "s"}`];
  if (params.get("status")) parts.push(`status ${params.get("status")}`);
  if (params.get("key")) parts.push(`key “${params.get("key")}”`);
  if (params.get("q")) parts.push(`matching “${params.get("q")}” (among the newest 1000)`);
  const time = new Date().toLocaleTimeString();
  parts.push(live ? `${live} live: refreshing every second (updated ${time})` : `updated ${time}`);
  return parts.join(" · ");
}

async function refresh() {
  clearTimeout(timer);
  const mine = ++generation;
  const params = current();
  showFilters(params);
  let streams;
  try {
    streams = await getJSON(`${root}/?${params}`);
  } catch (error) {
    if (mine !== generation) return;
    message(`Could not load the streams: ${error.message}`, true);
    summary.textContent = "";
    if (error.status !== 403 && error.status !== 400) schedule(IDLE_EVERY_MS);
    return;
  }
  if (mine !== generation) return;
  const live = streams.filter((s) => s.status === "streaming").length;
  if (streams.length) rowsBody.replaceChildren(...streams.map(row));
  else message(params.toString() ? "No stream matches these filters." : "No streams recorded yet.");
  summary.textContent = describe(params, streams.length, live);
  document.body.dataset.live = String(live);
  schedule(live ? LIVE_EVERY_MS : IDLE_EVERY_MS);
}

function schedule(delay) {
  clearTimeout(timer);
  timer = setTimeout(() => (document.hidden ? schedule(delay) : refresh()), delay);
}

refresh();
