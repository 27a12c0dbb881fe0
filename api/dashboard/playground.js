// A deployment's playground: a streaming chat for language models (/v1/chat/completions with
// stream: true, read as server-sent events) or an image form for diffusion models
// (/api/v1/deployments/{name}/images). The same endpoints a script would call.
import { ApiError, api } from "./api.js";
import { html } from "./ui.js";

export async function mount(el, { args }) {
  const name = decodeURIComponent(args[0]);
  const d = await api(`/api/v1/deployments/${encodeURIComponent(name)}`);
  el.innerHTML = html`<h1 tabindex="-1">Playground · <span class="mono">${d.name}</span></h1>
    <p class="muted">${d.kind} · <span class="mono">${d.model}</span> · <a href="#/models">all deployments</a></p>
    <section class="panel" id="pg"></section>`.s;
  const box = el.querySelector("#pg");
  if (d.kind === "llm") chat(box, d); else images(box, d);
}

function showError(el, message) {
  el.textContent = message;
  el.hidden = !message;
}

function chat(box, d) {
  const history = [];
  box.innerHTML = html`<h2>Chat</h2><div id="log" aria-live="polite"></div>
    <form id="f"><label>Message <textarea id="msg" rows="3" required></textarea></label>
      <label>Temperature <input id="temp" type="number" step="0.1" min="0" max="2" value="0.7"></label>
      <label>Max tokens <input id="max" type="number" min="1" max="${d.engine.max_tokens_cap}" value="${d.engine.default_max_tokens}"></label>
      <label>Seed <input id="seed" type="number" min="0" placeholder="random"></label>
      <button type="submit">Send</button> <button type="button" id="stop" disabled>Stop</button></form>
    <p class="failure" id="err" role="alert" hidden></p>`.s;
  const log = box.querySelector("#log"), err = box.querySelector("#err"), stop = box.querySelector("#stop");
  let controller = null;
  stop.onclick = () => controller && controller.abort();  // closing the stream stops generation on the server
  box.querySelector("#f").onsubmit = async (e) => {
    e.preventDefault();
    showError(err, "");
    const text = box.querySelector("#msg").value;
    history.push({ role: "user", content: text });
    log.insertAdjacentHTML("beforeend", html`<p><strong>you</strong> ${text}</p>`.s);
    const reply = document.createElement("p");
    reply.innerHTML = html`<strong>${d.name}</strong> <span class="mono"></span>`.s;
    log.appendChild(reply);
    const out = reply.querySelector("span");
    const seed = box.querySelector("#seed").value;
    const body = { model: d.name, messages: history, stream: true, temperature: Number(box.querySelector("#temp").value),
                   max_tokens: Number(box.querySelector("#max").value), ...(seed ? { seed: Number(seed) } : {}) };
    controller = new AbortController();
    stop.disabled = false;
    try {
      const r = await fetch("/v1/chat/completions", { method: "POST", signal: controller.signal,
        headers: { "content-type": "application/json", "X-Crucible-Client": "dashboard" }, body: JSON.stringify(body) });
      if (!r.ok) throw new ApiError(r.status, await r.json().catch(() => null));
      const reader = r.body.getReader(), decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        const events = buffer.split("\n\n");
        buffer = events.pop();
        for (const ev of events) {
          const data = ev.replace(/^data: /, "");
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          for (const c of chunk.choices || []) out.textContent += (c.delta && c.delta.content) || "";
        }
      }
      history.push({ role: "assistant", content: out.textContent });
    } catch (e) {
      if (e.name !== "AbortError") showError(err, e.message);
    } finally {
      stop.disabled = true;
      controller = null;
    }
  };
}

function images(box, d) {
  box.innerHTML = html`<h2>Images</h2>
    <form id="f"><label>Prompt <input id="prompt" value="red bold 3"></label>
      <label>Negative prompt <input id="neg" placeholder="none"></label>
      <label>Guidance <select id="g"><option>cfg</option><option>apg</option><option>none</option></select></label>
      <label>Scale <input id="scale" type="number" step="0.5" min="0" max="100" value="4"></label>
      <label>APG eta <input id="eta" type="number" step="0.1" min="0" max="1" value="0"></label>
      <label>APG momentum <input id="mom" type="number" step="0.1" min="-0.9" max="0.9" value="-0.5"></label>
      <label>Steps <input id="steps" type="number" min="1" max="${d.engine.max_steps}" value="${Math.min(20, d.engine.max_steps)}"></label>
      <label>Images <input id="n" type="number" min="1" max="${d.engine.max_n}" value="${Math.min(4, d.engine.max_n)}"></label>
      <label>Seed <input id="seed" type="number" min="0" value="0"></label>
      <button type="submit">Draw</button></form>
    <p class="failure" id="err" role="alert" hidden></p><div id="out"></div>`.s;
  const v = (id) => box.querySelector(`#${id}`).value;
  box.querySelector("#f").onsubmit = async (e) => {
    e.preventDefault();
    showError(box.querySelector("#err"), "");
    const body = { prompt: v("prompt") || null, guidance: v("g"), scale: Number(v("scale")), steps: Number(v("steps")),
                   n: Number(v("n")), seed: Number(v("seed")), ...(v("neg") ? { negative_prompt: v("neg") } : {}),
                   ...(v("g") === "apg" ? { eta: Number(v("eta")), momentum: Number(v("mom")) } : {}) };
    try {
      const r = await api(`/api/v1/deployments/${encodeURIComponent(d.name)}/images`, { method: "POST", body });
      box.querySelector("#out").innerHTML = html`<p class="muted">${r.guidance}, ${r.sampler}, ${r.steps} steps, ${r.seconds} s</p>
        ${r.data.map((img) => html`<figure style="display:inline-block;margin:4px"><img alt="seed ${img.seed}" width="96" height="96"
          style="image-rendering:pixelated" src="data:image/png;base64,${img.b64_json}"><figcaption class="small">seed ${img.seed}</figcaption></figure>`)}`.s;
    } catch (err) {
      showError(box.querySelector("#err"), err.message);
    }
  };
}
