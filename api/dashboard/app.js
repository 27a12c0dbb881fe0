// The dashboard: a hash router over views. Each view module exports mount(el, ctx) and may return
// a cleanup function that stops its pollers when the view is left.
import { ApiError, api } from "./api.js";
import { html, parseHash } from "./ui.js";
import * as jobs from "./jobs.js";
import * as jobPage from "./job.js";
import * as submit from "./submit.js";
import * as catalog from "./catalog.js";
import * as methodPage from "./method.js";
import * as compare from "./compare.js";
import * as models from "./models.js";
import * as playground from "./playground.js";

// Later views (LLM chat and diffusion playgrounds) add one line here once their endpoints exist.
const ROUTES = [
  [/^jobs\/([^/]+)$/, jobPage, "jobs"],
  [/^(jobs)?$/, jobs, "jobs"],
  [/^submit$/, submit, "submit"],
  [/^catalog$/, catalog, "catalog"],
  [/^catalog\/([^/]+)$/, methodPage, "catalog"],
  [/^compare$/, compare, "compare"],
  [/^models$/, models, "models"],
  [/^deployments\/([^/]+)$/, playground, "models"],
];

const view = document.getElementById("view");
let cleanup = null;

async function route() {
  if (cleanup) { try { cleanup(); } catch { /* a view's cleanup never blocks navigation */ } cleanup = null; }
  const { path, query } = parseHash();
  const hit = ROUTES.find(([re]) => re.test(path));
  document.querySelectorAll("[data-nav]").forEach((a) => {
    if (hit && a.dataset.nav === hit[2]) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  });
  if (!hit) {
    view.innerHTML = html`<h1>Not found</h1><p>Nothing at <code>#/${path}</code>. <a href="#/jobs">Go to jobs</a>.</p>`.s;
    return;
  }
  const [re, module] = hit;
  const args = path.match(re).slice(1);
  view.innerHTML = "";
  try {
    cleanup = (await module.mount(view, { args, query })) || null;
  } catch (err) {
    view.innerHTML = html`<h1>Something went wrong</h1><p class="failure">${err.message}</p>`.s;
  }
  const h1 = view.querySelector("h1");
  document.title = h1 ? `${h1.textContent.trim()} · Crucible` : "Crucible";
  if (route.moved) view.focus({ preventScroll: true });
  route.moved = true;
}

async function health() {
  const el = document.getElementById("health");
  try {
    const h = await api("/api/v1/health");
    el.textContent = `${h.database} · ${h.executor} executor · v${h.version}`;
    el.classList.remove("down");
  } catch {
    el.textContent = "API unreachable";
    el.classList.add("down");
  }
}

// Not logged in: a key pasted here (or the link `crucible up` prints) sets the dashboard's cookie.
function showLogin(failed) {
  document.querySelector("nav").hidden = true;
  view.innerHTML = html`<h1>Log in</h1>
    <p>Open the link <code>crucible up</code> printed, or paste an API key
       (the local admin key is in <code>$CRUCIBLE_HOME/admin-key</code>).</p>
    ${failed ? html`<p class="failure" role="alert">That key is unknown or revoked.</p>` : ""}
    <form method="post" action="/login" class="login">
      <label>API key <input name="key" type="password" autocomplete="off" required></label>
      <button>Log in</button>
    </form>`.s;
}

async function start() {
  try {
    const me = await api("/api/v1/whoami");
    const who = document.getElementById("who");
    who.textContent = `${me.project} · ${me.role}`;
    who.title = `key ${me.key_name || me.key_id}`;
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      showLogin(new URLSearchParams(location.search).get("login") === "failed");
      return;
    }
  }
  window.addEventListener("hashchange", route);
  route();
  health();
  setInterval(health, 30000);
}

start();
