// A job's artifacts: images inline (click for full size), JSON and text previewed as tables or
// text, everything downloadable.
import { api } from "./api.js";
import { bytes, fmt, html } from "./ui.js";

const PREVIEW_BYTES = 512 * 1024;

export function renderArtifacts(el, items) {
  if (!items.length) { el.innerHTML = html`<p class="muted">No artifacts yet.</p>`.s; return; }
  const images = items.filter((a) => a.content_type.startsWith("image/"));
  const previews = items.filter((a) => isPreviewable(a));
  const rest = items.filter((a) => !images.includes(a));
  el.innerHTML = html`
    ${images.length ? html`<div class="gallery">${images.map((a) => html`<figure>
        <button type="button" class="thumb" data-src="${a.url}" data-name="${a.name}" aria-label="Open image ${a.name}">
          <img src="${a.url}" alt="${a.name}" loading="lazy"></button>
        <figcaption><span>${a.name}</span><a href="${a.url}" download aria-label="Download ${a.name}">Download</a></figcaption>
      </figure>`)}</div>` : ""}
    <div id="previews">${previews.map((a, i) => html`<details class="preview" ${i < 3 ? "open" : ""} data-url="${a.url}" data-type="${a.content_type}">
      <summary>${a.name} <span class="muted small">${a.kind} · ${bytes(a.size)}</span></summary><div class="body muted small">Loading…</div></details>`)}</div>
    ${rest.length ? html`<div class="table-wrap"><table><caption>All files</caption>
      <thead><tr><th scope="col">Name</th><th scope="col">Kind</th><th scope="col" class="num">Size</th><th scope="col"><span class="visually-hidden">Download</span></th></tr></thead>
      <tbody>${rest.map((a) => html`<tr><td class="mono">${a.name}</td><td>${a.kind}</td><td class="num">${bytes(a.size)}</td>
        <td><a href="${a.url}" download aria-label="Download ${a.name}">Download</a></td></tr>`)}</tbody></table></div>` : ""}`.s;
  el.querySelectorAll("button.thumb").forEach((b) => b.addEventListener("click", () => openImage(b.dataset.src, b.dataset.name)));
  el.querySelectorAll("details.preview").forEach((d) => {
    const load = () => { if (!d.dataset.loaded) { d.dataset.loaded = "1"; fillPreview(d); } };
    if (d.open) load();
    d.addEventListener("toggle", load);
  });
}

const isPreviewable = (a) => a.size <= PREVIEW_BYTES && a.kind !== "checkpoint"
  && (a.content_type.startsWith("application/json") || a.content_type.startsWith("text/"));

async function fillPreview(d) {
  const body = d.querySelector(".body");
  try {
    const r = await fetch(d.dataset.url);
    const text = await r.text();
    body.classList.remove("muted", "small");
    if (d.dataset.type.startsWith("application/json")) {
      let data;
      try { data = JSON.parse(text); } catch { body.innerHTML = html`<pre>${text}</pre>`.s; return; }
      body.innerHTML = jsonView(data).s;
    } else if (d.dataset.type.startsWith("text/csv")) {
      const [head, ...rows] = parseCsv(text);
      body.innerHTML = head ? table(head, rows.slice(0, 500).map((r) => r.map(numeric))).s : "";
    } else {
      body.innerHTML = html`<pre>${text.slice(0, 100000)}</pre>`.s;
    }
  } catch (err) {
    body.textContent = `Could not load: ${err.message}`;
  }
}

/** A table when the JSON is one (rows of objects, columns of equal-length lists, or flat key → value). */
export function jsonView(data) {
  const scalar = (v) => v === null || typeof v !== "object";
  if (Array.isArray(data) && data.length && data.every((r) => r && typeof r === "object" && !Array.isArray(r))) {
    const cols = [...new Set(data.flatMap(Object.keys))];
    return table(cols, data.slice(0, 500).map((r) => cols.map((c) => r[c])));
  }
  if (data && typeof data === "object" && !Array.isArray(data)) {
    const vals = Object.values(data);
    const n = vals.length && Array.isArray(vals[0]) ? vals[0].length : -1;
    if (n > 0 && vals.every((v) => Array.isArray(v) && v.length === n && v.every(scalar))) {
      const cols = Object.keys(data);
      return table(cols, Array.from({ length: Math.min(n, 500) }, (_, i) => cols.map((c) => data[c][i])));
    }
    if (vals.every((v) => scalar(v) || (Array.isArray(v) && v.length <= 12 && v.every(scalar)))) {
      return table(["key", "value"], Object.entries(data).map(([k, v]) => [k, Array.isArray(v) ? v.map(fmt).join(", ") : v]));
    }
  }
  return html`<pre>${JSON.stringify(data, null, 2).slice(0, 100000)}</pre>`;
}

/** RFC 4180 CSV: quoted fields may hold commas, quotes ("") and newlines. */
export function parseCsv(text) {
  const rows = [];
  let row = [], field = "", quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') { field += '"'; i++; } else if (c === '"') quoted = false; else field += c;
    } else if (c === '"') quoted = true;
    else if (c === ",") { row.push(field); field = ""; }
    else if (c === "\n" || c === "\r") {
      if (c === "\r" && text[i + 1] === "\n") i++;
      row.push(field); rows.push(row); row = []; field = "";
    } else field += c;
  }
  if (field || row.length) { row.push(field); rows.push(row); }
  return rows;
}

const numeric = (v) => (v !== "" && !isNaN(Number(v)) ? Number(v) : v);

function table(cols, rows) {
  return html`<div class="table-wrap"><table><thead><tr>${cols.map((c) => html`<th scope="col">${c}</th>`)}</tr></thead>
    <tbody>${rows.map((r) => html`<tr>${r.map((v) => html`<td class="${typeof v === "number" ? "num" : ""}">${fmt(v)}</td>`)}</tr>`)}</tbody></table></div>`;
}

export function openImage(src, name) {
  const dialog = document.getElementById("lightbox");
  document.getElementById("lightbox-img").src = src;
  document.getElementById("lightbox-img").alt = name;
  document.getElementById("lightbox-title").textContent = name;
  document.getElementById("lightbox-download").href = src;
  dialog.showModal();
}

export const listArtifacts = (jobId) => api(`/api/v1/jobs/${jobId}/artifacts`).then((r) => r.items);
