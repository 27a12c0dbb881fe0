// The method catalog: every method by family, with its paper, task, dataset kinds, whether it has
// a reproduction and the latest reproduction job's verdict.
import { api, methods } from "./api.js";
import { fmt, html, shortId, statusBadge, timeTag } from "./ui.js";

export async function mount(el, { query }) {
  const [all, repro] = await Promise.all([methods(),
    api("/api/v1/jobs?mode=reproduce&limit=500").then((p) => p.items).catch(() => [])]);
  const latest = {};
  for (const j of repro) latest[j.method] ||= j;  // newest first
  const families = {};
  for (const m of all) (families[m.family] ||= []).push(m);
  const names = Object.keys(families).sort();
  const withRepro = all.filter((m) => m.reproduction).length;
  el.innerHTML = html`
    <div class="page-head"><h1 tabindex="-1">Method catalog</h1>
      <input type="search" id="cat-q" placeholder="filter by id, paper or task" aria-label="Filter methods" style="min-width:240px"></div>
    <p class="muted">${all.length} methods in ${names.length} famil${names.length === 1 ? "y" : "ies"}; ${withRepro} with a reproduction of the paper's claim.
      ${names.length > 1 ? html`Jump to: ${names.map((f, i) => html`${i ? " · " : ""}<a href="#/catalog" data-family="${f}">${f}</a>`)}` : ""}</p>
    ${names.map((f) => html`<section class="family" id="fam-${f}" aria-labelledby="h-fam-${f}">
      <h2 id="h-fam-${f}">${f} <span class="muted small">${families[f].length}</span></h2>
      <div class="cards">${families[f].sort((a, b) => a.id.localeCompare(b.id)).map((m) => card(m, latest[m.id]))}</div></section>`)}`.s;

  el.querySelectorAll("[data-family]").forEach((a) => a.addEventListener("click", (e) => {
    e.preventDefault();
    document.getElementById(`fam-${a.dataset.family}`).scrollIntoView({ behavior: "smooth" });
  }));
  el.querySelector("#cat-q").addEventListener("input", (e) => {
    const q = e.target.value.toLowerCase();
    el.querySelectorAll(".card").forEach((c) => { c.hidden = !c.dataset.text.includes(q); });
    el.querySelectorAll(".family").forEach((s) => { s.hidden = !s.querySelector(".card:not([hidden])"); });
  });
  el.addEventListener("click", async (e) => {
    const b = e.target.closest("button[data-reproduce]");
    if (!b) return;
    b.disabled = true;
    try {
      const j = await api("/api/v1/jobs", { method: "POST", body: { method: b.dataset.reproduce, mode: "reproduce" } });
      location.hash = `#/jobs/${j.id}`;
    } catch (err) {
      b.disabled = false;
      b.insertAdjacentHTML("afterend", html`<p class="error small" role="alert">${err.message}</p>`.s);
    }
  });
  if (query.m) document.getElementById(`m-${query.m}`)?.scrollIntoView();
}

function card(m, j) {
  const rec = j && j.result && j.result.reproduction;
  const text = `${m.id} ${m.paper} ${m.task} ${m.family}`.toLowerCase();
  return html`<article class="card" id="m-${m.id}" data-text="${text}" aria-labelledby="t-${m.id}">
    <h3 id="t-${m.id}" class="mono"><a href="#/catalog/${encodeURIComponent(m.id)}" title="How ${m.id} works, its parameters and its latest record">${m.id}</a></h3>
    <div class="paper">${m.paper}</div>
    <div class="chips"><span class="chip">${m.task}</span>${(m.datasets || []).map((k) => html`<span class="chip">${k}</span>`)}
      ${m.reproduction ? html`<span class="chip repro">reproduction</span>` : html`<span class="chip">no reproduction</span>`}</div>
    ${m.summary ? html`<div class="small muted">${m.summary}</div>` : ""}
    ${j ? html`<div class="verdict ${rec ? (rec.holds ? "holds" : "fails") : ""} small">
        ${rec ? html`<strong>${rec.holds ? "Claim holds" : "Claim does not hold"}</strong>: ${rec.metric} ${fmt(rec.ours)} vs ${rec.baseline_name || "baseline"} ${fmt(rec.baseline)}`
              : html`Latest reproduction ${statusBadge(j.status)}`}
        · <a href="#/jobs/${j.id}">job ${shortId(j.id)}</a> ${timeTag(j.finished_at || j.created_at)}</div>`
      : m.reproduction ? html`<div class="verdict small muted">Not reproduced on this server yet.</div>` : ""}
    <div class="actions"><a class="button primary" href="#/submit?method=${encodeURIComponent(m.id)}">Run…</a>
      <a class="button" href="#/catalog/${encodeURIComponent(m.id)}">How it works</a>
      ${m.reproduction ? html`<button data-reproduce="${m.id}">Reproduce claim</button>` : ""}
      <a class="small" href="#/jobs?method=${encodeURIComponent(m.id)}">its jobs</a></div>
  </article>`;
}
