// One method's page: the documentation generated from its code (paper, mechanism and equations,
// parameters with defaults and bounds, latest reproduction record), rendered by the server from
// Markdown with raw HTML escaped, plus the actions of its catalog card.
import { api } from "./api.js";
import { html } from "./ui.js";

export async function mount(el, { args }) {
  const id = decodeURIComponent(args[0]);
  const page = await api(`/api/v1/methods/${encodeURIComponent(id)}/page`);
  el.innerHTML = html`
    <p class="small"><a href="#/catalog?m=${id}">← Method catalog</a></p>
    <div class="actions"><a class="button primary" href="#/submit?method=${encodeURIComponent(id)}">Run…</a>
      <a class="small" href="#/jobs?method=${encodeURIComponent(id)}">its jobs</a></div>
    <article class="method-page" id="method-page"></article>`.s;
  // the server rendered this from the method's own docstring and records, with raw HTML escaped
  el.querySelector("#method-page").innerHTML = page.html;
  const h1 = el.querySelector("#method-page h1");
  if (h1) h1.setAttribute("tabindex", "-1");
}
