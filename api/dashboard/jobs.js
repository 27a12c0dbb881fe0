// Jobs list: filters and search on the server, cursor pagination, refresh with back-off.
import { api, datasets, methods, query } from "./api.js";
import { Poller, setQuery, html, jobDuration, progressBar, seconds, shortId, statusBadge, timeTag } from "./ui.js";

const PAGE = 50;
const STATUS_FILTERS = [["", "any status"], ["queued,starting,running,cancelling", "active"], ["running", "running"],
  ["queued", "queued"], ["succeeded", "succeeded"], ["failed", "failed"], ["cancelled", "cancelled"]];

export async function mount(el, { query: q }) {
  const state = { q: q.q || "", status: q.status || "", method: q.method || "", dataset: q.dataset || "",
                  cursors: [], cursor: q.cursor || "", selected: new Set(), last: "" };
  el.innerHTML = html`
    <div class="page-head"><h1 tabindex="-1">Jobs</h1>
      <div class="actions"><button id="compare-btn" disabled>Compare selected</button>
        <a class="button primary" href="#/submit">New job</a></div></div>
    <form class="filters" role="search" aria-label="Filter jobs" id="filters">
      <div><label for="f-q">Search</label>
        <input id="f-q" type="search" placeholder="job id, method or dataset" value="${state.q}" autocomplete="off"></div>
      <div><label for="f-status">Status</label><select id="f-status">
        ${STATUS_FILTERS.map(([v, t]) => html`<option value="${v}" ${v === state.status ? "selected" : ""}>${t}</option>`)}</select></div>
      <div><label for="f-method">Method</label><select id="f-method"><option value="">any method</option></select></div>
      <div><label for="f-dataset">Dataset</label><select id="f-dataset"><option value="">any dataset</option></select></div>
    </form>
    <div class="panel" style="padding:0">
      <div class="table-wrap"><table aria-describedby="jobs-count">
        <thead><tr><th scope="col"><span class="visually-hidden">Select</span></th><th scope="col">Job</th>
          <th scope="col" class="wide-only">Dataset</th><th scope="col">Status</th><th scope="col">Progress</th>
          <th scope="col" class="wide-only num">Duration</th><th scope="col" class="wide-only">Created</th></tr></thead>
        <tbody id="rows"><tr><td colspan="7" class="muted">Loading…</td></tr></tbody></table></div>
    </div>
    <div class="pager"><span id="jobs-count" class="muted small" role="status"></span>
      <div class="actions"><button id="newer" disabled>← Newer</button><button id="older" disabled>Older →</button></div></div>`.s;

  const $ = (s) => el.querySelector(s);
  fillSelect($("#f-method"), methods().then((ms) => ms.map((m) => m.id).sort()), state.method);
  fillSelect($("#f-dataset"), datasets().then((ds) => ds.map((d) => d.name).sort()), state.dataset);

  async function load() {
    const page = await api(`/api/v1/jobs${query({ limit: PAGE, status: state.status, method: state.method,
      dataset: state.dataset, q: state.q.trim(), cursor: state.cursor })}`);
    const key = JSON.stringify(page);
    if (key === state.last) return false;
    state.last = key;
    render(page);
    return true;
  }

  function render(page) {
    const rows = $("#rows");
    const focused = rows.contains(document.activeElement) ? document.activeElement : null;  // kept across refreshes
    const refocus = focused && (focused.type === "checkbox" ? `input[value="${focused.value}"]`
      : focused.getAttribute("href") ? `a[href="${focused.getAttribute("href")}"]` : null);
    const filtered = state.q || state.status || state.method || state.dataset;
    if (!page.items.length) {
      rows.innerHTML = html`<tr><td colspan="7" class="empty">${filtered ? "No job matches these filters."
        : html`No jobs yet. <a href="#/submit">Submit your first job</a> or pick a method in the <a href="#/catalog">catalog</a>.`}</td></tr>`.s;
    } else {
      rows.innerHTML = page.items.map((j) => html`<tr data-id="${j.id}">
        <td><input type="checkbox" aria-label="Select job ${shortId(j.id)} for comparison" value="${j.id}" ${state.selected.has(j.id) ? "checked" : ""}></td>
        <td><a class="job-link" href="#/jobs/${j.id}">${j.method}</a>${j.mode === "reproduce" ? html` <span class="chip">reproduction</span>` : ""}
          <div class="id">${shortId(j.id)}${j.dataset ? html`<span class="narrow-only"> · ${j.dataset}</span>` : ""}</div></td>
        <td class="wide-only">${j.dataset || html`<span class="muted">—</span>`}</td>
        <td>${statusBadge(j.status)}</td>
        <td><div class="progress-cell">${progressBar(j.progress, `progress of job ${shortId(j.id)}`, j.status)}
          <span>${j.progress.total ? `${j.progress.done}/${j.progress.total}` : j.progress.message || ""}</span></div></td>
        <td class="wide-only num">${seconds(jobDuration(j))}</td>
        <td class="wide-only">${timeTag(j.created_at)}</td></tr>`).join("");
    }
    if (refocus) rows.querySelector(refocus)?.focus();
    const first = state.cursors.length * PAGE;
    $("#jobs-count").textContent = page.items.length
      ? `Jobs ${first + 1}–${first + page.items.length}${page.next_cursor ? "" : " (end)"}` : "";
    $("#newer").disabled = !state.cursors.length;
    $("#older").disabled = !page.next_cursor;
    state.next = page.next_cursor;
  }

  const poller = new Poller(load, { min: 2000, max: 15000 });
  const reload = () => {
    state.last = "";
    setQuery({ q: state.q, status: state.status, method: state.method, dataset: state.dataset });
    poller.kick();
  };
  let typing;
  $("#f-q").addEventListener("input", (e) => {
    clearTimeout(typing);
    typing = setTimeout(() => { state.q = e.target.value; state.cursor = ""; state.cursors = []; reload(); }, 250);
  });
  for (const [id, key] of [["#f-status", "status"], ["#f-method", "method"], ["#f-dataset", "dataset"]]) {
    $(id).addEventListener("change", (e) => { state[key] = e.target.value; state.cursor = ""; state.cursors = []; reload(); });
  }
  $("#filters").addEventListener("submit", (e) => e.preventDefault());
  $("#older").addEventListener("click", () => { state.cursors.push(state.cursor); state.cursor = state.next; reload(); });
  $("#newer").addEventListener("click", () => { state.cursor = state.cursors.pop() || ""; reload(); });
  $("#rows").addEventListener("change", (e) => {
    if (e.target.type !== "checkbox") return;
    e.target.checked ? state.selected.add(e.target.value) : state.selected.delete(e.target.value);
    $("#compare-btn").disabled = state.selected.size < 2;
    $("#compare-btn").textContent = `Compare selected${state.selected.size ? ` (${state.selected.size})` : ""}`;
  });
  $("#compare-btn").addEventListener("click", () => { location.hash = `#/compare?jobs=${[...state.selected].join(",")}`; });

  poller.onError = (err) => { $("#jobs-count").textContent = `Could not load jobs: ${err.message}`; };
  poller.start();
  return () => { clearTimeout(typing); poller.stop(); };
}

async function fillSelect(select, namesPromise, current) {
  try {
    const names = await namesPromise;
    for (const n of names) select.add(new Option(n, n, false, n === current));
  } catch { /* the filter stays at "any" */ }
}
