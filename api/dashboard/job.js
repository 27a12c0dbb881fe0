// A job's page: summary, live metric charts (only new points fetched, polling with back-off), the
// log tail by offset, artifacts, and the cancel / re-run buttons.
import { ApiError, api } from "./api.js";
import { listArtifacts, renderArtifacts } from "./artifacts.js";
import { lineChart, purge } from "./charts.js";
import { Poller, TERMINAL, fmt, html, jobDuration, jobTitle, progressBar, seconds, shortId, statusBadge, timeTag } from "./ui.js";

const MAX_CHARTS = 24;
const LOG_KEEP = 200_000;

export async function mount(el, { args: [id] }) {
  const base = `/api/v1/jobs/${encodeURIComponent(id)}`;
  const s = { job: null, etag: null, series: new Map(), lastStep: null, logOffset: 0, log: "",
              artifactsAt: 0, finalDone: false, charts: new Map(), chartFilter: "" };
  el.innerHTML = html`<div id="head"></div><div id="banner" role="status"></div>
    <section class="panel" aria-labelledby="h-metrics"><div class="page-head"><h2 id="h-metrics">Metrics</h2>
      <input id="chart-filter" type="search" placeholder="filter metrics" aria-label="Filter metric charts" hidden></div>
      <div id="tiles" class="tiles"></div><div id="charts" class="charts"><p class="muted">Loading…</p></div><div id="final"></div></section>
    <section class="panel" aria-labelledby="h-arts"><h2 id="h-arts">Artifacts</h2><div id="artifacts"><p class="muted">Loading…</p></div></section>
    <section class="panel" aria-labelledby="h-log"><div class="page-head"><h2 id="h-log">Log</h2>
      <label class="check small"><input type="checkbox" id="follow" checked> Follow</label></div>
      <pre id="log" class="log" tabindex="0" aria-label="Job log">…</pre></section>
    <section class="panel" aria-labelledby="h-spec"><h2 id="h-spec">Parameters</h2><div id="spec"></div></section>`.s;
  const $ = (q) => el.querySelector(q);

  async function fetchJob() {
    const r = await fetch(base, { headers: s.etag ? { "If-None-Match": s.etag } : {}, cache: "no-store" });
    if (r.status === 304) return false;
    const body = await r.json().catch(() => null);
    if (!r.ok) throw new ApiError(r.status, body);
    s.etag = r.headers.get("ETag");
    s.job = body;
    renderHead();
    return true;
  }

  async function fetchMetrics(full) {
    const since = full || s.lastStep === null ? "" : `&since_step=${s.lastStep}`;
    const m = await api(`${base}/metrics?max_points=2000${since}`);
    if (full) s.series = new Map();
    let grew = false;
    for (const p of m.items) {
      let ser = s.series.get(p.name);
      if (!ser) s.series.set(p.name, ser = { x: [], y: [] });
      if (ser.x.length && p.step <= ser.x[ser.x.length - 1]) continue;
      ser.x.push(p.step); ser.y.push(p.value); grew = true;
      s.lastStep = Math.max(s.lastStep ?? -1, p.step);
    }
    if (grew || full || !s.series.size) await drawCharts();
    return grew;
  }

  async function fetchLog() {
    let grew = false;
    for (let i = 0; i < 8; i++) {  // catch up in 1 MiB pieces, then wait for the next poll
      const l = await api(`${base}/logs?offset=${s.logOffset}&limit=1048576`);
      if (!l.text) break;
      s.log = (s.log + l.text).slice(-LOG_KEEP);
      s.logOffset = l.next_offset;
      grew = true;
      if (l.eof) break;
    }
    if (grew || !s.log) {
      const pre = $("#log");
      pre.textContent = s.log || (s.job && TERMINAL.includes(s.job.status) ? "(no output)" : "(no output yet)");
      if ($("#follow").checked) pre.scrollTop = pre.scrollHeight;
    }
    return grew;
  }

  async function fetchArtifacts() {
    s.artifactsAt = Date.now();
    const items = await listArtifacts(id);
    const key = JSON.stringify(items.map((a) => [a.name, a.sha256]));
    if (key !== s.artifactsKey) { s.artifactsKey = key; renderArtifacts($("#artifacts"), items); }
  }

  async function drawCharts() {
    const box = $("#charts");
    const all = [...s.series.keys()].sort();
    const names = all.filter((n) => s.series.get(n).x.length > 1);  // one point is a number, not a curve
    const singles = all.filter((n) => !names.includes(n));
    $("#tiles").innerHTML = singles.map((n) => html`<div class="tile"><div class="k">${n}</div>
      <div class="v">${fmt(s.series.get(n).y[0])}</div><div class="k">step ${s.series.get(n).x[0]}</div></div>`).join("");
    $("#chart-filter").hidden = names.length <= 6;
    if (!names.length) {
      box.innerHTML = all.length ? "" : html`<p class="muted">${s.job && TERMINAL.includes(s.job.status) ? "This job logged no metrics." : "No metrics yet; charts appear with the first logged steps."}</p>`.s;
      return;
    }
    box.querySelector("p")?.remove();
    const shown = names.filter((n) => n.toLowerCase().includes(s.chartFilter)).slice(0, MAX_CHARTS);
    for (const [n, div] of s.charts) if (!shown.includes(n)) { purge(div); div.remove(); s.charts.delete(n); }
    for (const n of shown) {
      let div = s.charts.get(n);
      if (!div) {
        div = document.createElement("div");
        div.className = "chart";
        div.setAttribute("role", "img");
        div.dataset.metric = n;
        box.append(div);
        s.charts.set(n, div);
      }
      const ser = s.series.get(n);
      await lineChart(div, [{ name: n, x: ser.x, y: ser.y }], { title: n });
    }
    const hidden = names.length - shown.length;
    let note = box.nextElementSibling?.classList.contains("more") ? box.nextElementSibling : null;
    if (hidden > 0) {
      if (!note) { note = document.createElement("p"); note.className = "more muted small"; box.after(note); }
      note.textContent = `${hidden} more metric${hidden > 1 ? "s" : ""}; narrow with the filter.`;
    } else note?.remove();
  }

  function renderHead() {
    const j = s.job;
    const focused = document.activeElement && el.contains(document.activeElement) ? document.activeElement.id : null;
    const live = !TERMINAL.includes(j.status);
    $("#head").innerHTML = html`
      <div class="crumbs"><a href="#/jobs">Jobs</a> / <span class="mono">${shortId(j.id)}</span></div>
      <div class="page-head"><h1 tabindex="-1">${jobTitle(j)} ${statusBadge(j.status)}</h1>
        <div class="actions">
          ${live ? html`<button class="danger" id="cancel" ${j.status === "cancelling" ? "disabled" : ""}>${j.status === "cancelling" ? "Cancelling…" : "Cancel"}</button>` : ""}
          ${!live ? html`<button id="rerun" title="A new job with the same spec, starting from this job's last checkpoint">Re-run</button>` : ""}
          ${!live ? html`<button class="danger" id="delete" title="Delete the job with its metrics, log and artifacts">Delete</button>` : ""}
          <a class="button" href="#/submit?from=${j.id}">Edit &amp; run again</a>
          <a class="button" href="#/compare?jobs=${j.id}">Compare…</a></div></div>
      <div class="panel">
        <div class="progress-line">${progressBar(j.progress, "job progress", j.status)}
          <span>${j.progress.total ? `${j.progress.done} / ${j.progress.total}` : ""} ${j.progress.message}</span></div>
        <dl class="summary" style="margin-top:12px">
          <div><dt>Job id</dt><dd class="mono">${j.id}</dd></div>
          <div><dt>Method</dt><dd><a href="#/catalog?m=${j.method}">${j.method}</a></dd></div>
          <div><dt>Dataset</dt><dd>${j.dataset || "—"}</dd></div>
          <div><dt>Created</dt><dd>${timeTag(j.created_at)}</dd></div>
          <div><dt>Duration</dt><dd>${seconds(jobDuration(j))}</dd></div>
          <div><dt>Attempt</dt><dd>${j.attempt} of ${j.max_attempts}</dd></div>
          <div><dt>Seed</dt><dd>${j.seed}</dd></div>
          ${j.parent_id ? html`<div><dt>Resumed from</dt><dd><a href="#/jobs/${j.parent_id}" class="mono">${shortId(j.parent_id)}</a></dd></div>` : ""}
        </dl>
        ${j.failure && j.failure.message ? html`<h3>Failure${j.failure.code ? ` (${j.failure.code})` : ""}</h3><pre class="failure" role="alert">${j.failure.message}</pre>` : ""}
      </div>`.s;
    $("#cancel")?.addEventListener("click", cancel);
    $("#rerun")?.addEventListener("click", rerun);
    $("#delete")?.addEventListener("click", remove);
    const rows = Object.entries(j.params || {});
    $("#spec").innerHTML = html`<dl class="summary">
      ${rows.map(([k, v]) => html`<div><dt>${k}</dt><dd class="mono">${fmt(v)}</dd></div>`)}
      <div><dt>resources</dt><dd class="mono">${Object.entries(j.resources || {}).map(([k, v]) => `${k} ${v}`).join(", ")}</dd></div>
      ${Object.keys(j.tags || {}).length ? html`<div><dt>tags</dt><dd class="mono">${JSON.stringify(j.tags)}</dd></div>` : ""}
      </dl>`.s;
    renderFinal();
    if (focused) document.getElementById(focused)?.focus();
  }

  function renderFinal() {
    const r = s.job.result || {};
    const rep = r.reproduction;
    const metrics = Object.entries(r.metrics || {});
    $("#final").innerHTML = html`
      ${rep ? html`<div class="verdict ${rep.holds ? "holds" : "fails"}" style="margin-top:12px"><strong>Reproduction: the claim ${rep.holds ? "holds" : "does not hold"}.</strong>
        ${rep.claim} — ${rep.metric}: ours ${fmt(rep.ours)} vs ${rep.baseline_name || "baseline"} ${fmt(rep.baseline)} (${rep.direction} is better).</div>` : ""}
      ${metrics.length ? html`<h3 style="margin-top:14px">Final values</h3><dl class="summary">
        ${metrics.map(([k, v]) => html`<div><dt>${k}</dt><dd class="mono">${fmt(v)}</dd></div>`)}</dl>` : ""}`.s;
  }

  async function cancel(e) {
    e.target.disabled = true;
    try { await api(`${base}/cancel`, { method: "POST" }); } catch (err) { banner(err.message); }
    poller.kick();
  }

  async function rerun(e) {
    e.target.disabled = true;
    try {
      const j = await api(`${base}/retry`, { method: "POST" });
      location.hash = `#/jobs/${j.id}`;
    } catch (err) { banner(err.message); e.target.disabled = false; }
  }

  async function remove(e) {
    if (!confirm(`Delete job ${shortId(id)} with its metrics, log and artifacts? Registered models stay.`)) return;
    e.target.disabled = true;
    try {
      await api(base, { method: "DELETE" });
      location.hash = "#/jobs";
    } catch (err) { banner(err.message); e.target.disabled = false; }
  }

  const banner = (msg) => { $("#banner").innerHTML = msg ? html`<div class="banner">${msg}</div>`.s : ""; };

  async function tick() {
    const changed = await fetchJob();
    banner("");
    const terminal = TERMINAL.includes(s.job.status);
    const [newPoints, newLog] = await Promise.all([fetchMetrics(terminal && !s.finalDone), fetchLog()]);
    if (terminal || changed && Date.now() - s.artifactsAt > 5000) await fetchArtifacts();
    if (terminal) {
      s.finalDone = true;
      return "stop";  // a finished job changes no more; its final metrics were fetched whole
    }
    return changed || newPoints || newLog;
  }

  $("#chart-filter").addEventListener("input", (e) => { s.chartFilter = e.target.value.toLowerCase(); drawCharts(); });
  const poller = new Poller(tick, { min: 1000, max: 10000 });
  poller.onError = (err) => {
    if (err.status === 404 && !s.job) {
      el.innerHTML = html`<h1 tabindex="-1">No such job</h1><p>${err.message}</p><p><a href="#/jobs">All jobs</a></p>`.s;
      poller.stop();
    } else banner(`Connection trouble (${err.message}); retrying…`);
  };
  await poller.run();
  if (s.job && !s.artifactsAt) await fetchArtifacts().catch(() => {});
  return () => { poller.stop(); s.charts.forEach(purge); };
}
