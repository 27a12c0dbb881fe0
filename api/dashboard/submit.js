// The submit form, generated from the method's params JSON schema; the API validates, and its
// problem body's errors[].pointer puts each message next to its field.
import { ApiError, api, datasets, job as getJob, methods } from "./api.js";
import { html, raw } from "./ui.js";

export async function mount(el, { query }) {
  const [all, dsets, from] = await Promise.all([methods(), datasets(),
    query.from ? getJob(query.from).catch(() => null) : null]);
  if (!all.length) {
    el.innerHTML = html`<h1 tabindex="-1">New job</h1><p class="empty">No methods are registered on this server.</p>`.s;
    return;
  }
  const byFamily = groupBy(all, (m) => m.family);
  const initial = all.find((m) => m.id === (from?.method || query.method)) || all[0];
  el.innerHTML = html`
    <div class="crumbs"><a href="#/jobs">Jobs</a> / new</div>
    <h1 tabindex="-1">New job</h1>
    <form id="submit-form" class="panel" novalidate aria-describedby="form-note">
      <div id="summary" tabindex="-1"></div>
      <div class="form-grid">
        <div class="field" data-pointer="/method"><label for="f-method">Method</label>
          <select id="f-method" name="method" aria-describedby="hint-method err-method">
            ${Object.entries(byFamily).map(([fam, ms]) => html`<optgroup label="${fam}">
              ${ms.map((m) => html`<option value="${m.id}" ${m.id === initial.id ? "selected" : ""}>${m.id}</option>`)}</optgroup>`)}
          </select><p class="error" id="err-method" hidden></p><p class="hint" id="hint-method"></p></div>
        <div class="field" data-pointer="/dataset"><label for="f-dataset">Dataset</label>
          <select id="f-dataset" name="dataset" aria-describedby="hint-dataset err-dataset"></select>
          <p class="error" id="err-dataset" hidden></p><p class="hint" id="hint-dataset"></p></div>
        <div class="field" data-pointer="/mode"><span id="l-mode" style="font-weight:600;font-size:14px">What to run</span>
          <div class="radio-row" role="radiogroup" aria-labelledby="l-mode">
            <label><input type="radio" name="mode" value="run" checked> Train / run the method</label>
            <label><input type="radio" name="mode" value="reproduce" id="mode-repro"> Reproduce the paper's claim</label></div>
          <p class="error" id="err-mode" hidden></p></div>
      </div>
      <fieldset id="params" data-pointer="/params" style="margin-top:16px"><legend>Parameters</legend><div class="form-grid" id="param-fields"></div>
        <p class="error" id="err-params" hidden></p></fieldset>
      <details><summary>Advanced: seed, priority, retries, resources</summary><div class="form-grid" style="margin-top:10px">
        ${numberField("seed", "Seed", from?.seed ?? 0, "random seed of the run", { min: 0 })}
        ${numberField("priority", "Priority", from?.priority ?? 0, "0–9, higher runs first", { min: 0, max: 9 })}
        ${numberField("max_attempts", "Max attempts", "", "retry budget; empty = server default", { min: 1, max: 20 })}
        ${numberField("resources/cpus", "CPUs", from?.resources?.cpus ?? 1, "CPU cores the job needs", { min: 0, step: "any" })}
        ${numberField("resources/gpus", "GPUs", from?.resources?.gpus ?? 0, "runs on CUDA when > 0 and a GPU is present", { min: 0, step: "any" })}
      </div></details>
      <div class="actions" style="margin-top:16px"><button class="primary" type="submit" id="submit-btn">Submit job</button>
        <span id="form-note" class="muted small">The server checks every value; problems appear next to the field.</span></div>
    </form>`.s;
  const $ = (q) => el.querySelector(q);
  const form = $("#submit-form");

  function selectMethod(m, prefill) {
    $("#hint-method").textContent = `${m.paper || ""}${m.task ? ` · ${m.task}` : ""}`;
    const kinds = m.datasets || [];
    const ds = $("#f-dataset");
    ds.innerHTML = "";
    if (!kinds.length) {
      ds.add(new Option("— none needed —", ""));
      ds.disabled = true;
      $("#hint-dataset").textContent = "This method makes its own data.";
    } else {
      ds.disabled = false;
      const fits = dsets.filter((d) => kinds.includes(d.kind));
      for (const d of fits) ds.add(new Option(`${d.name} (${d.kind})`, d.name, false, d.name === prefill?.dataset));
      if (!fits.length) ds.add(new Option("— no dataset of a fitting kind —", ""));
      $("#hint-dataset").textContent = `Datasets of kind ${kinds.join(" or ")}.`;
    }
    $("#mode-repro").disabled = !m.reproduction;
    $("#mode-repro").parentElement.title = m.reproduction ? "" : "this method declares no reproduction";
    form.elements.mode.value = prefill?.mode === "reproduce" && m.reproduction ? "reproduce" : "run";
    renderParams(m, prefill?.params || {});
    toggleMode();
  }

  function renderParams(m, values) {
    const schema = m.params || {};
    const required = new Set(schema.required || []);
    const props = Object.entries(schema.properties || {});
    $("#param-fields").innerHTML = props.length
      ? props.map(([name, p]) => paramField(name, resolve(schema, p), required.has(name), values[name])).join("")
      : html`<p class="muted">This method takes no parameters.</p>`.s;
  }

  function toggleMode() {
    const repro = form.elements.mode.value === "reproduce";
    $("#params").disabled = repro;
    $("#params").hidden = repro;
  }

  $("#f-method").addEventListener("change", (e) => { clearErrors(); selectMethod(all.find((m) => m.id === e.target.value)); });
  form.addEventListener("change", (e) => { if (e.target.name === "mode") toggleMode(); });
  form.addEventListener("input", (e) => clearField(e.target.closest(".field")));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    clearErrors();
    const m = all.find((x) => x.id === $("#f-method").value);
    const { spec, errors } = collect(form, m);
    if (errors.length) return showErrors(errors);
    const btn = $("#submit-btn");
    btn.disabled = true;
    btn.textContent = "Submitting…";
    try {
      const j = await api("/api/v1/jobs", { method: "POST", body: spec });
      location.hash = `#/jobs/${j.id}`;
    } catch (err) {
      btn.disabled = false;
      btn.textContent = "Submit job";
      showErrors(err instanceof ApiError && err.errors.length ? err.errors : [{ pointer: "", message: err.message }]);
    }
  });

  function showErrors(errors) {
    const loose = [];
    let first = null;
    for (const { pointer, message } of errors) {
      const field = fieldFor(pointer);
      if (!field) { loose.push(`${pointer || "request"}: ${message}`); continue; }
      field.classList.add("invalid");
      const err = field.querySelector(":scope > .error");
      err.textContent = message;
      err.hidden = false;
      const input = field.querySelector("input:not([type=radio]), select, textarea");
      if (input) input.setAttribute("aria-invalid", "true");
      first ||= input;
    }
    const n = errors.length;
    $("#summary").innerHTML = html`<div class="error-summary" role="alert"><strong>The job was not submitted: ${n} problem${n > 1 ? "s" : ""}.</strong>
      ${loose.length ? html`<ul>${loose.map((t) => html`<li>${t}</li>`)}</ul>` : html` See the marked field${n > 1 ? "s" : ""}.`}</div>`.s;
    (first || $("#summary")).focus();
  }

  function fieldFor(pointer) {
    const parts = (pointer || "").split("/");
    while (parts.length > 1) {  // /params/shots/2 → the field of /params/shots
      const f = el.querySelector(`[data-pointer="${CSS.escape(parts.join("/"))}"]`);
      if (f) return f;
      parts.pop();
    }
    return null;
  }

  function clearField(field) {
    if (!field || !field.classList.contains("invalid")) return;
    field.classList.remove("invalid");
    field.querySelector(":scope > .error").hidden = true;
    field.querySelector("[aria-invalid]")?.removeAttribute("aria-invalid");
  }
  function clearErrors() { el.querySelectorAll(".invalid").forEach(clearField); $("#summary").innerHTML = ""; }

  selectMethod(initial, from);
}

// -- one field per schema property ---------------------------------------------------------

function resolve(schema, p) {
  if (p.$ref) p = { ...schema.$defs?.[p.$ref.split("/").pop()], ...p };
  const alts = p.anyOf || p.oneOf;
  if (alts) {
    const concrete = alts.filter((a) => a.type !== "null");
    if (concrete.length === 1) return { ...resolve(schema, concrete[0]), ...p, anyOf: undefined, nullable: alts.length > concrete.length };
  }
  if (p.allOf?.length === 1) return { ...resolve(schema, p.allOf[0]), ...p, allOf: undefined };
  return p;
}

function rangeText(p) {
  const bits = [];
  if (p.minimum !== undefined) bits.push(`≥ ${p.minimum}`);
  if (p.exclusiveMinimum !== undefined) bits.push(`> ${p.exclusiveMinimum}`);
  if (p.maximum !== undefined) bits.push(`≤ ${p.maximum}`);
  if (p.exclusiveMaximum !== undefined) bits.push(`< ${p.exclusiveMaximum}`);
  return bits.join(", ");
}

function paramField(name, p, required, value) {
  const id = `p-${name}`;
  const v = value !== undefined ? value : p.default;
  const label = p.title || name;
  const kind = p.enum ? "enum" : p.type === "array" ? "array" : p.type || "json";
  const facts = [kind === "integer" ? "integer" : kind === "number" ? "number" : "", rangeText(p),
    p.default !== undefined && p.default !== null ? `default ${Array.isArray(p.default) ? p.default.join(", ") : p.default}` : "",
    kind === "array" ? "comma-separated" : "", p.nullable ? "optional" : required ? "required" : ""].filter(Boolean).join(" · ");
  const describe = `hint-${id} err-${id}`;
  let control;
  if (kind === "boolean") {
    control = html`<label class="check" for="${id}" style="font-weight:500"><input type="checkbox" id="${id}" name="${name}" data-kind="boolean" ${v ? "checked" : ""} aria-describedby="${describe}"> ${label}</label>`;
  } else if (kind === "enum") {
    control = html`<select id="${id}" name="${name}" data-kind="enum" aria-describedby="${describe}">
      ${p.nullable ? html`<option value="">— none —</option>` : ""}
      ${p.enum.map((o) => html`<option value="${JSON.stringify(o)}" ${o === v ? "selected" : ""}>${o}</option>`)}</select>`;
  } else if (kind === "integer" || kind === "number") {
    const attrs = [p.minimum !== undefined ? `min="${p.minimum}"` : "", p.maximum !== undefined ? `max="${p.maximum}"` : ""].join(" ");
    control = html`<input type="number" id="${id}" name="${name}" data-kind="${kind}" step="${kind === "integer" ? 1 : "any"}" ${raw(attrs)}
      value="${v ?? ""}" inputmode="${kind === "integer" ? "numeric" : "decimal"}" aria-describedby="${describe}">`;
  } else if (kind === "array") {
    control = html`<input type="text" id="${id}" name="${name}" data-kind="array" data-items="${p.items?.type || "string"}"
      value="${Array.isArray(v) ? v.join(", ") : ""}" aria-describedby="${describe}">`;
  } else if (kind === "string") {
    control = html`<input type="text" id="${id}" name="${name}" data-kind="string" value="${v ?? ""}" aria-describedby="${describe}">`;
  } else {
    control = html`<textarea id="${id}" name="${name}" data-kind="json" rows="3" aria-describedby="${describe}">${v !== undefined ? JSON.stringify(v) : ""}</textarea>`;
  }
  return html`<div class="field" data-pointer="/params/${name}" data-param="${name}" data-required="${required && !p.nullable ? 1 : ""}">
    ${kind === "boolean" ? "" : html`<label for="${id}">${label}</label>`}
    ${control}
    <p class="error" id="err-${id}" hidden></p>
    <p class="hint" id="hint-${id}">${p.description ? `${p.description}. ` : ""}<span class="small">${facts}</span></p></div>`.s;
}

/** A top-level number of the spec; `path` is its JSON pointer without the leading slash. */
function numberField(path, label, value, hint, { min, max, step = 1 } = {}) {
  const id = path.replace("/", "-");
  return html`<div class="field" data-pointer="/${path}"><label for="f-${id}">${label}</label>
    <input type="number" id="f-${id}" name="${path}" data-spec="${path}" step="${step}" ${raw(min !== undefined ? `min="${min}"` : "")} ${raw(max !== undefined ? `max="${max}"` : "")}
      value="${value}" aria-describedby="hint-${id} err-${id}">
    <p class="error" id="err-${id}" hidden></p><p class="hint" id="hint-${id}">${hint}</p></div>`;
}

/** The job spec from the form; values the browser cannot even parse are reported here, the rest by the API. */
function collect(form, method) {
  const errors = [];
  const spec = { method: method.id, mode: form.elements.mode.value, params: {} };
  const ds = form.elements.dataset.value;
  if (ds) spec.dataset = ds;
  for (const input of form.querySelectorAll("[data-spec]")) {
    const [key, sub] = input.dataset.spec.split("/");
    if (input.validity.badInput) errors.push({ pointer: `/${input.dataset.spec}`, message: "enter a number" });
    else if (input.value !== "" && sub) (spec[key] ||= {})[sub] = Number(input.value);
    else if (input.value !== "") spec[key] = Number(input.value);
  }
  if (spec.mode === "reproduce") return { spec, errors };
  for (const field of form.querySelectorAll("[data-param]")) {
    const name = field.dataset.param;
    const input = field.querySelector("[data-kind]");
    const kind = input.dataset.kind;
    const pointer = `/params/${name}`;
    if (kind === "boolean") { spec.params[name] = input.checked; continue; }
    if (input.validity.badInput) { errors.push({ pointer, message: "enter a number" }); continue; }
    const text = input.value.trim();
    if (text === "") continue;  // the server fills the default, or says the field is required
    if (kind === "integer" || kind === "number") spec.params[name] = Number(text);
    else if (kind === "enum") spec.params[name] = JSON.parse(text);
    else if (kind === "array") {
      const items = text.split(",").map((t) => t.trim()).filter((t) => t !== "");
      const numeric = ["integer", "number"].includes(input.dataset.items);
      spec.params[name] = numeric ? items.map((t) => (isNaN(Number(t)) ? t : Number(t))) : items;
    } else if (kind === "json") {
      try { spec.params[name] = JSON.parse(text); } catch { errors.push({ pointer, message: "not valid JSON" }); }
    } else spec.params[name] = text;
  }
  return { spec, errors };
}

function groupBy(items, key) {
  const out = {};
  for (const it of items) (out[key(it)] ||= []).push(it);
  return out;
}
