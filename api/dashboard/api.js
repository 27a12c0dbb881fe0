// The HTTP API, as the dashboard uses it. Errors arrive as RFC 9457 problem bodies.

export class ApiError extends Error {
  constructor(status, body) {
    super((body && (body.detail || body.title)) || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
    this.errors = (body && body.errors) || [];
  }
}

export async function api(path, { method = "GET", body, headers = {} } = {}) {
  // The header tells the server this write comes from the dashboard itself (its CSRF check for the
  // cookie the login link set); scripts authenticate with `Authorization: Bearer` instead.
  const init = { method, headers: { accept: "application/json", "X-Crucible-Client": "dashboard", ...headers },
                 cache: "no-store" };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  if (r.status === 204) return null;
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { detail: text.slice(0, 300) }; }
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

export const query = (params) => {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : "";
};

let methodsCache = null;
export function methods() {
  methodsCache ||= api("/api/v1/methods").then((r) => r.items).catch((e) => { methodsCache = null; throw e; });
  return methodsCache;
}
export const datasets = () => api("/api/v1/datasets").then((r) => r.items);
export const job = (id) => api(`/api/v1/jobs/${encodeURIComponent(id)}`);
