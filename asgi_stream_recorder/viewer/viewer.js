// What both viewer pages share: building elements, reading the JSON endpoints, formatting.
// Data only ever reaches the page as text (textContent, attribute values): never as HTML.

/** The streams app's root URL (its mount path, URL-encoded by the server). */
export const root = document.body.dataset.root || "";

/** The page URL of a stream, and its JSON endpoints under it. */
export const streamUrl = (id) => `${root}/${encodeURIComponent(id)}`;

/** An element with attributes (set as values, never parsed) and children (strings become text). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined && value !== false) node.setAttribute(name, String(value));
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

const SVG = "http://www.w3.org/2000/svg";

/** An SVG element, the same way. */
export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

export class HttpError extends Error {
  constructor(status, text) {
    super(status === 403 ? "not allowed (the streams app's authorize hook refused)" : `HTTP ${status}: ${text}`);
    this.status = status;
  }
}

/** GET a JSON endpoint of the streams app (the same URLs as the pages, asking for JSON). */
export async function getJSON(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store",
                                      credentials: "same-origin" });
  if (!response.ok) throw new HttpError(response.status, (await response.text()).slice(0, 200));
  return response.json();
}

/** A status badge: ``<span class="badge completed">completed</span>``. */
export function badge(status, node = el("span")) {
  node.className = `badge ${/^[a-z]+$/.test(status) ? status : ""}`;
  node.textContent = status;
  return node;
}

/** Milliseconds for people: ``312 ms``, ``4.25 s``, ``2 min 5 s``. */
export function ms(value) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "—";
  if (value < 1000) return `${Math.round(value)} ms`;
  if (value < 60_000) return `${(value / 1000).toFixed(value < 10_000 ? 2 : 1)} s`;
  const minutes = Math.floor(value / 60_000);
  return `${minutes} min ${Math.round((value - minutes * 60_000) / 1000)} s`;
}

/** A timestamp in the reader's time zone: ``2024-05-01 14:03:22``. */
export function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} `
    + `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** How long a stream ran: its recorded duration, else (while it runs) the time since it began. */
export function duration(record) {
  const recorded = record.metadata && record.metadata.duration_ms;
  if (typeof recorded === "number") return recorded;
  if (record.completed_at) return Date.parse(record.completed_at) - Date.parse(record.created_at);
  return Math.max(0, Date.now() - Date.parse(record.created_at));
}

/** The time to the first token, when the record has it. */
export function ttft(record) {
  const value = record.metadata && record.metadata.ttft_ms;
  return typeof value === "number" ? value : null;
}
