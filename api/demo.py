"""`crucible demo llm|diffusion`: the service's story end to end, through its own HTTP API.

LLM: pre-train the tiny base model if the registry lacks it (`lm-pretrain`) → prune 50% with
SparseGPT and recover with SquareHead distillation (`squarehead`, which reports the one-shot
perplexity too) → compensate the sparse model with EoRA against the base (`eora`) → deploy the
result → one chat completion, with the validation perplexity of every stage on the same windows.

Diffusion: the `apg` reproduction as a job: it trains the shared base model if the cache lacks it,
then renders CFG vs APG grids across guidance scales as the `apg_vs_cfg.png` artifact the dashboard
shows, with the FD / recall / saturation scores of both rules.

Everything goes through the API as a user's script would, so the demo is also a smoke test of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from models.llm.pipeline import EORA_RANK, eora_params, squarehead_params

Call = Callable[..., Any]

DEPLOYMENT = "demo-chat"
IMAGE_DEPLOYMENT = "demo-digits"


def _model_of(call: Call, job_id: str) -> str:
    """The ref a finished job registered (the newest model whose source is that job)."""
    refs = [m["ref"] for m in call("GET", "/api/v1/models")["items"] if m.get("source_job_id") == job_id]
    if not refs:
        raise RuntimeError(f"job {job_id} registered no model")
    return refs[0]


def _run(
    call: Call, follow: Callable[[str], dict[str, Any]], method: str, params: dict[str, Any], mode: str = "run"
) -> dict[str, Any]:
    job = call(
        "POST",
        "/api/v1/jobs",
        json={
            "method": method,
            "dataset": None if mode == "reproduce" else "stdlib-code",
            "params": params,
            "mode": mode,
        },
        timeout=300,
    )  # the server imports the method's module on its first submission
    final = follow(job["id"])
    if final["status"] != "succeeded":
        raise RuntimeError(f"{method} job {job['id']} {final['status']}: {(final.get('failure') or {}).get('message')}")
    return final


def _metrics(job: dict[str, Any]) -> dict[str, float]:
    return (job.get("result") or {}).get("metrics") or {}


def llm_demo(
    call: Call, follow: Callable[[str], dict[str, Any]], say: Callable[[str], None], smoke: bool = False
) -> dict[str, Any]:
    """Run the pipeline; the stage table (stage, model, val ppl) and the chat reply."""
    from models.llm.base import RECIPES, base_model_name  # the cached base's recipe and registry name

    base_name = base_model_name(smoke)
    have = {m["name"]: m["ref"] for m in call("GET", "/api/v1/models")["items"]}
    if base_name in have:
        base, base_ppl = have[base_name], None
        say(f"base model {base} is registered")
    else:
        say(f"pre-training {base_name} (lm-pretrain)")
        params = {**RECIPES[smoke].model_dump(), "model_name": base_name}
        job = _run(call, follow, "lm-pretrain", params)
        base, base_ppl = _model_of(call, job["id"]), _metrics(job).get("final_val_ppl")
    say("pruning 50% with SparseGPT and fine-tuning with SquareHead (squarehead)")
    sq = _run(call, follow, "squarehead", squarehead_params(base, smoke))
    sparse, m_sq = _model_of(call, sq["id"]), _metrics(sq)
    say("compensating the sparse model with EoRA against the base (eora)")
    eo = _run(call, follow, "eora", eora_params(base, sparse, smoke))
    final, m_eo = _model_of(call, eo["id"]), _metrics(eo)
    stages = [
        ("base (dense)", base, m_sq.get("val_ppl_parent", base_ppl)),
        ("pruned 50% (SparseGPT, one-shot)", "—", m_sq.get("val_ppl_oneshot")),
        ("+ SquareHead fine-tuning", sparse, m_sq.get("val_ppl")),
        (f"+ EoRA rank {EORA_RANK[smoke]}", final, m_eo.get("val_ppl")),
    ]
    existing = {d["name"] for d in call("GET", "/api/v1/deployments")["items"]}
    if DEPLOYMENT in existing:
        call("DELETE", f"/api/v1/deployments/{DEPLOYMENT}")
    say(f"deploying {final} as {DEPLOYMENT!r}")
    call("POST", "/api/v1/deployments", json={"name": DEPLOYMENT, "model": final}, timeout=600)
    reply = call(
        "POST",
        "/v1/chat/completions",
        timeout=600,
        json={
            "model": DEPLOYMENT,
            "max_tokens": 48,
            "seed": 0,
            "temperature": 0.7,
            "messages": [{"role": "user", "content": "Write a Python function that adds two numbers."}],
        },
    )
    return {
        "stages": stages,
        "deployment": DEPLOYMENT,
        "reply": reply["choices"][0]["message"]["content"],
        "usage": reply["usage"],
    }


def diffusion_demo(
    call: Call, follow: Callable[[str], dict[str, Any]], say: Callable[[str], None], smoke: bool = False
) -> dict[str, Any]:
    """The `apg` reproduction as a job (trains the base if missing; CFG vs APG grid as an artifact), then the
    base model it used deployed and drawn from with APG guidance through the images API."""
    from models.diffusion.training import FULL_CONFIG, SMOKE_CONFIG, base_model_name

    say("training the diffusion base model if missing, then rendering CFG vs APG across guidance scales (apg)")
    job = _run(call, follow, "apg", {"smoke": smoke}, mode="reproduce")
    arts = call("GET", f"/api/v1/jobs/{job['id']}/artifacts")["items"]
    record = (job.get("result") or {}).get("reproduction") or {}
    base = base_model_name(SMOKE_CONFIG if smoke else FULL_CONFIG)
    refs = [m["ref"] for m in call("GET", "/api/v1/models")["items"] if m["name"] == base]
    if not refs:
        raise RuntimeError(f"the apg job registered no {base!r} model to deploy")
    if IMAGE_DEPLOYMENT in {d["name"] for d in call("GET", "/api/v1/deployments")["items"]}:
        call("DELETE", f"/api/v1/deployments/{IMAGE_DEPLOYMENT}")
    say(f"deploying {refs[0]} as {IMAGE_DEPLOYMENT!r} and drawing 'red bold 3' with APG guidance")
    call("POST", "/api/v1/deployments", json={"name": IMAGE_DEPLOYMENT, "model": refs[0]}, timeout=600)
    drawn = call(
        "POST",
        f"/api/v1/deployments/{IMAGE_DEPLOYMENT}/images",
        json={"prompt": "red bold 3", "guidance": "apg", "scale": 4.0, "n": 4, "seed": 0, "steps": 4 if smoke else 20},
        timeout=600,
    )
    return {
        "job": job["id"],
        "artifacts": {a["name"]: a["url"] for a in arts if a["kind"] in ("image", "plot")},
        "record": {k: record.get(k) for k in ("ours", "baseline", "holds", "note")},
        "model": refs[0],
        "deployment": IMAGE_DEPLOYMENT,
        "images": len(drawn["data"]),
    }
