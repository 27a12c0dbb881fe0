// Registered models with their lineage: dataset → job (method) → model version, and the project's
// deployments, each linking to its playground (playground.js).
import { ApiError, api } from "./api.js";
import { bytes, html, shortId, statusBadge, timeTag } from "./ui.js";

export async function mount(el) {
  const items = (await api("/api/v1/models")).items;
  const jobIds = [...new Set(items.map((m) => m.source_job_id).filter(Boolean))];
  const jobs = new Map();
  await Promise.all(jobIds.slice(0, 200).map((id) => api(`/api/v1/jobs/${id}`).then((j) => jobs.set(id, j)).catch(() => {})));
  const byName = {};
  for (const m of items) (byName[m.name] ||= []).push(m);

  el.innerHTML = html`<h1 tabindex="-1">Models</h1>
    ${items.length ? "" : html`<p class="panel empty">No registered models yet. A job registers one with <code>ctx.register_model(name, path)</code>.</p>`}
    ${Object.entries(byName).map(([name, versions]) => html`<section class="panel" aria-labelledby="mdl-${name}">
      <h2 id="mdl-${name}" class="mono">${name} <span class="muted small">${versions.length} version${versions.length > 1 ? "s" : ""}</span></h2>
      <div class="table-wrap"><table><thead><tr><th scope="col">Version</th><th scope="col">Lineage</th>
        <th scope="col" class="wide-only">Files</th><th scope="col" class="wide-only">Config</th><th scope="col" class="wide-only">Registered</th></tr></thead>
        <tbody>${versions.map((m) => row(m, jobs.get(m.source_job_id)))}</tbody></table></div></section>`)}
    <section class="panel" aria-labelledby="h-deploy"><h2 id="h-deploy">Deployments</h2><div id="deployments" class="muted">Checking…</div></section>`.s;
  deployments(el.querySelector("#deployments"));
}

function row(m, j) {
  const files = Object.values(m.files || {});
  const size = files.reduce((s, f) => s + (f.size || 0), 0);
  return html`<tr><td class="mono">${m.ref}</td>
    <td><div class="lineage">
      ${origin(m, j)}
      ${j ? html`
        <span class="node">job <a href="#/jobs/${j.id}">${j.method} · ${shortId(j.id)}</a> ${statusBadge(j.status)}</span>
        ${j.parent_id ? html`<span class="muted small">(resumed from <a href="#/jobs/${j.parent_id}">${shortId(j.parent_id)}</a>)</span>` : ""}
        <span class="arrow" aria-hidden="true">→</span>`
      : m.source_job_id ? html`<span class="node">job <span class="mono">${shortId(m.source_job_id)}</span> (deleted)</span><span class="arrow" aria-hidden="true">→</span>`
      : html`<span class="node">imported</span><span class="arrow" aria-hidden="true">→</span>`}
      <span class="node"><strong>${m.ref}</strong></span></div></td>
    <td class="wide-only">${files.length} file${files.length === 1 ? "" : "s"} · ${bytes(size)}</td>
    <td class="wide-only small">${configCell(m.config)}</td>
    <td class="wide-only">${timeTag(m.created_at)}</td></tr>`;
}

// What a version came from: its parent model (compression, fine-tuning) and the data it was trained on. The
// model's own lineage (its config) says it best: a base trained inside another job (a reproduction's cached
// base) names its dataset there, while the job that registered it may have had none.
function origin(m, j) {
  const c = m.config || {};
  const parent = c.parent || c.parent_model || c.base_model;
  const dataset = c.dataset || j?.dataset;
  const nodes = [];
  if (parent) nodes.push(html`<span class="node">parent <strong class="mono">${String(parent).split("/").pop()}</strong></span>`);
  if (dataset) nodes.push(html`<span class="node">dataset <strong>${dataset}</strong></span>`);
  if (!nodes.length) return "";
  return html`${nodes.map((n) => html`${n}<span class="arrow" aria-hidden="true">→</span>`)}`;
}

// The headline of a version's config (method, data, seed, its quality) with the whole of it one click away,
// instead of raw JSON cut at a fixed width.
const HEADLINE = ["method", "dataset", "seed", "val_ppl", "val_loss", "parameters", "sparsity", "rank", "steps"];
function configCell(config) {
  const c = config || {};
  const shown = HEADLINE.filter((k) => c[k] !== undefined && c[k] !== null && typeof c[k] !== "object");
  const fmt = (v) => (typeof v === "number" && !Number.isInteger(v) ? v.toPrecision(4) : String(v));
  const head = shown.map((k) => html`<span class="kv"><span class="muted">${k}</span> ${fmt(c[k])}</span>`);
  if (!Object.keys(c).length) return html`<span class="muted">—</span>`;
  return html`<details class="config"><summary>${head.length ? head : "config"}</summary>
    <pre class="mono small">${JSON.stringify(c, null, 1)}</pre></details>`;
}

async function deployments(box) {
  try {
    const d = await api("/api/v1/deployments");
    const list = d.items || [];
    box.classList.remove("muted");
    box.innerHTML = list.length ? html`<ul>${list.map((x) => html`<li><a class="mono" href="#/deployments/${encodeURIComponent(x.name)}">${x.name}</a> · ${x.kind} · <span class="mono">${x.model}</span> — playground</li>`)}</ul>`.s
      : html`<p class="muted">No deployments.</p>`.s;
  } catch (err) {
    box.textContent = err instanceof ApiError && err.status === 404
      ? "This server has no deployments API yet; deploying models, the LLM chat and the diffusion playgrounds appear here once it does."
      : `Could not load deployments: ${err.message}`;
  }
}
