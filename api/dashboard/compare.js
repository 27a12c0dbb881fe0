// Compare: the metric curves of several jobs overlaid (a method against its baseline), their
// final values side by side and the parameters in which they differ.
import { api } from "./api.js";
import { lineChart, purge } from "./charts.js";
import { fmt, html, setQuery, shortId, statusBadge } from "./ui.js";

export async function mount(el, { query }) {
  const chosen = new Set((query.jobs || "").split(",").filter(Boolean));
  const picked = new Set((query.metrics || "").split(",").filter(Boolean));
  const recent = (await api("/api/v1/jobs?limit=100")).items;
  const jobs = new Map();
  const series = new Map();  // job id → Map(metric → {x, y})
  const charts = [];

  el.innerHTML = html`<h1 tabindex="-1">Compare jobs</h1>
    <div class="two-col">
      <div class="panel"><h2>Jobs</h2>
        <div class="picker" id="picker" role="group" aria-label="Jobs to compare"></div>
        <form id="add" class="actions" style="margin-top:8px"><label for="add-id" class="small">Add by id</label>
          <input id="add-id" class="mono" placeholder="job id" style="flex:1;min-width:120px"><button>Add</button></form>
        <h2 style="margin-top:14px">Metrics</h2><div class="metric-picks" id="metric-picks" role="group" aria-label="Metrics to plot"></div></div>
      <div><div id="charts" class="charts"></div><div id="tables"></div></div>
    </div>`.s;
  const $ = (q) => el.querySelector(q);

  function renderPicker() {
    const rows = [...new Map([...[...chosen].map((id) => [id, jobs.get(id) || { id, method: "?", status: "" }]),
      ...recent.map((j) => [j.id, j])]).values()];
    $("#picker").innerHTML = rows.map((j) => html`<label><input type="checkbox" value="${j.id}" ${chosen.has(j.id) ? "checked" : ""}>
      <span>${j.method}${j.dataset ? ` · ${j.dataset}` : ""} <span class="id">${shortId(j.id)}</span></span> ${j.status ? statusBadge(j.status) : ""}</label>`).join("")
      || html`<p class="muted">No jobs yet.</p>`.s;
  }

  async function load(id) {
    if (series.has(id)) return;
    const [j, m] = await Promise.all([api(`/api/v1/jobs/${id}`), api(`/api/v1/jobs/${id}/metrics?max_points=2000`)]);
    jobs.set(id, j);
    const per = new Map();
    for (const p of m.items) {
      if (!per.has(p.name)) per.set(p.name, { x: [], y: [] });
      per.get(p.name).x.push(p.step);
      per.get(p.name).y.push(p.value);
    }
    series.set(id, per);
  }

  // A legend names what differs between the jobs: method, dataset, then the parameters that differ.
  let differing = [];
  const label = (j) => {
    const bits = [j.method];
    if (new Set([...chosen].map((id) => jobs.get(id)?.dataset)).size > 1) bits.push(j.dataset || "no dataset");
    for (const k of differing.slice(0, 3)) bits.push(`${k}=${fmt(j.params?.[k])}`);
    bits.push(shortId(j.id));
    return bits.join(" · ");
  };

  async function render() {
    setQuery({ jobs: [...chosen].join(","), metrics: [...picked].join(",") });
    const ids = [...chosen].filter((id) => series.has(id));
    const names = [...new Set(ids.flatMap((id) => [...series.get(id).keys()]))].sort();
    const common = names.filter((n) => ids.every((id) => series.get(id).has(n)));
    const curve = (n) => ids.some((id) => (series.get(id).get(n)?.x.length || 0) > 1);
    const keys = [...new Set(ids.flatMap((id) => Object.keys(jobs.get(id).params || {})))].sort();
    differing = keys.filter((k) => new Set(ids.map((id) => JSON.stringify(jobs.get(id).params?.[k]))).size > 1);
    if (!picked.size || ![...picked].some((n) => names.includes(n))) {
      picked.clear();
      const pool = common.length ? common : names;
      [...pool.filter(curve), ...pool.filter((n) => !curve(n))].slice(0, 4).forEach((n) => picked.add(n));
    }
    $("#metric-picks").innerHTML = names.map((n) => html`<label><input type="checkbox" value="${n}" ${picked.has(n) ? "checked" : ""}> ${n}</label>`).join("")
      || html`<span class="muted small">Pick jobs that logged metrics.</span>`.s;
    charts.splice(0).forEach(purge);
    const box = $("#charts");
    box.innerHTML = ids.length ? "" : html`<p class="panel empty">Tick two or more jobs (say, a method and its baseline) to overlay their curves.</p>`.s;
    for (const n of names.filter((x) => picked.has(x))) {
      const div = document.createElement("div");
      div.className = "chart";
      div.setAttribute("role", "img");
      box.append(div);
      charts.push(div);
      const traces = ids.filter((id) => series.get(id).has(n)).map((id) => ({ name: label(jobs.get(id)), ...series.get(id).get(n) }));
      await lineChart(div, traces, { title: n });
    }
    renderTables(ids);
  }

  function renderTables(ids) {
    if (!ids.length) { $("#tables").innerHTML = ""; return; }
    const js = ids.map((id) => jobs.get(id));
    const finals = [...new Set(js.flatMap((j) => Object.keys(j.result?.metrics || {})))].sort();
    const differs = differing;
    const head = html`<thead><tr><th scope="col"></th>${js.map((j) => html`<th scope="col"><a href="#/jobs/${j.id}">${label(j)}</a></th>`)}</tr></thead>`;
    $("#tables").innerHTML = html`
      ${finals.length ? html`<div class="panel table-wrap plain-head" style="margin-top:12px"><table><caption>Final values</caption>${head}<tbody>
        ${finals.map((k) => html`<tr><th scope="row">${k}</th>${js.map((j) => html`<td class="num">${fmt(j.result?.metrics?.[k])}</td>`)}</tr>`)}</tbody></table></div>` : ""}
      <div class="panel table-wrap plain-head"><table><caption>${differs.length ? "Parameters that differ" : "The jobs share all parameters"}</caption>${head}<tbody>
        <tr><th scope="row">dataset</th>${js.map((j) => html`<td>${j.dataset || "—"}</td>`)}</tr>
        ${differs.map((k) => html`<tr><th scope="row">${k}</th>${js.map((j) => html`<td class="mono">${fmt(j.params?.[k])}</td>`)}</tr>`)}</tbody></table></div>`.s;
  }

  async function refresh() {
    try {
      await Promise.all([...chosen].map(load));
    } catch (err) {
      $("#charts").innerHTML = html`<p class="banner">${err.message}</p>`.s;
    }
    renderPicker();
    await render();
  }

  $("#picker").addEventListener("change", (e) => {
    e.target.checked ? chosen.add(e.target.value) : chosen.delete(e.target.value);
    refresh();
  });
  $("#metric-picks").addEventListener("change", (e) => {
    e.target.checked ? picked.add(e.target.value) : picked.delete(e.target.value);
    render();
  });
  $("#add").addEventListener("submit", (e) => {
    e.preventDefault();
    const id = $("#add-id").value.trim().toUpperCase();
    const hit = recent.find((j) => j.id === id || shortId(j.id) === id.toLowerCase());
    if (id) { chosen.add(hit ? hit.id : id); $("#add-id").value = ""; refresh(); }
  });
  await refresh();
  return () => charts.forEach(purge);
}
