// Small rendering kit: an escaping html`` template, status badges, progress bars, durations.

class Raw { constructor(s) { this.s = s; } toString() { return this.s; } }
export const raw = (s) => new Raw(s);
export const esc = (v) => String(v ?? "").replace(/[&<>"']/g,
  (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

function part(v) {
  if (v instanceof Raw) return v.s;
  if (Array.isArray(v)) return v.map(part).join("");
  if (v === null || v === undefined || v === false) return "";
  return esc(v);
}

/** Interpolations are escaped unless wrapped in raw() or produced by html`` itself. */
export function html(strings, ...values) {
  let out = strings[0];
  values.forEach((v, i) => { out += part(v) + strings[i + 1]; });
  return new Raw(out);
}

export const TERMINAL = ["succeeded", "failed", "cancelled"];
export const ACTIVE = ["queued", "starting", "running", "cancelling"];
export const shortId = (id) => (id || "").slice(-8).toLowerCase();

export const statusBadge = (s) => html`<span class="status s-${s}">${s}</span>`;

export function progressBar(p, label, status = "") {
  const known = p && p.fraction !== null && p.fraction !== undefined;
  const pct = known ? Math.round(100 * p.fraction) : 0;
  const text = known ? `${pct}%` : "unknown";
  return html`<div class="bar ${known ? "" : "indeterminate"} ${status ? `st-${status}` : ""}" role="progressbar" aria-label="${label || "progress"}"
    aria-valuemin="0" aria-valuemax="100" ${raw(known ? `aria-valuenow="${pct}"` : "")} aria-valuetext="${text}">
    <span style="width:${pct}%"></span></div>`;
}

export function seconds(s) {
  if (s === null || s === undefined || !isFinite(s)) return "—";
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

export function jobDuration(job) {
  if (!job.started_at) return null;
  const end = job.finished_at ? Date.parse(job.finished_at) : Date.now();
  return (end - Date.parse(job.started_at)) / 1000;
}

export function ago(iso) {
  if (!iso) return "—";
  const s = (Date.now() - Date.parse(iso)) / 1000;
  if (s < 45) return "just now";
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(iso).toLocaleDateString();
}

export const timeTag = (iso) => iso ? html`<time datetime="${iso}" title="${new Date(iso).toLocaleString()}">${ago(iso)}</time>` : "—";

export function bytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB"];
  let i = -1;
  do { n /= 1024; i++; } while (n >= 1024 && i < units.length - 1);
  return `${n.toFixed(n < 10 ? 1 : 0)} ${units[i]}`;
}

export function fmt(v) {
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : Math.abs(v) >= 1e4 || Math.abs(v) < 1e-3 && v !== 0 ? v.toExponential(3) : v.toPrecision(4).replace(/\.?0+$/, "");
  if (v === null || v === undefined) return "—";
  return typeof v === "object" ? JSON.stringify(v) : String(v);
}

export function jobTitle(job) {
  return `${job.method}${job.mode === "reproduce" ? " (reproduction)" : ""}${job.dataset ? ` on ${job.dataset}` : ""}`;
}

/** Repeats `task` with back-off: quick while it reports change, slower (to `max`) while nothing changes. */
export class Poller {
  constructor(task, { min = 1000, max = 10000, factor = 1.6 } = {}) {
    Object.assign(this, { task, min, max, factor, delay: min, timer: null, stopped: false, failures: 0 });
    this.onVisible = () => { if (!document.hidden && !this.stopped) this.kick(); };
    document.addEventListener("visibilitychange", this.onVisible);
  }
  start() { this.run(); return this; }
  /** Run now (after the one in flight, if any) and poll quickly again: something just changed. */
  kick() {
    clearTimeout(this.timer);
    this.delay = this.min;
    if (this.running) this.pending = true; else this.run();
  }
  async run() {
    if (this.stopped || this.running) return;
    this.running = true;
    let again = true;
    try {
      const changed = await this.task();
      if (changed === "stop") again = false;
      this.failures = 0;
      this.delay = changed ? this.min : Math.min(this.max, this.delay * this.factor);
    } catch (err) {
      this.failures++;
      this.delay = Math.min(this.max * 1.5, this.delay * 2);
      // a poll still in flight when its view was left fails against a page that is gone: say nothing
      if (!this.stopped) this.onError?.(err);
    } finally {
      this.running = false;
    }
    if (this.pending && again) { this.pending = false; return this.run(); }
    if (again && !this.stopped && !document.hidden) this.timer = setTimeout(() => this.run(), this.delay);
  }
  stop() { this.stopped = true; clearTimeout(this.timer); document.removeEventListener("visibilitychange", this.onVisible); }
}

// -- the hash route: #/path?query -------------------------------------------------------
export function parseHash() {
  const h = location.hash.replace(/^#\/?/, "");
  const [path, qs = ""] = h.split("?");
  return { path: decodeURIComponent(path), query: Object.fromEntries(new URLSearchParams(qs)) };
}

/** Rewrite the current hash's query (filters, selections) without adding a history entry. */
export function setQuery(query) {
  const { path } = parseHash();
  const qs = new URLSearchParams(Object.entries(query).filter(([, v]) => v !== "" && v != null)).toString();
  history.replaceState(null, "", `#/${path}${qs ? `?${qs}` : ""}`);
}
