"""LLM serving throughput under continuous batching: a concurrency sweep (1, 2, 4, 8, 16 clients) through
`/v1/chat/completions` on the dense model — aggregate decode tokens/s, time to first token and inter-token
latency (p50 / p95) per level, the ratio to concurrency 1 and to Hugging Face `generate` in process — plus the
dense model's compressed variants at concurrency 1 and 8, all in one real `crucible up` process on a free port
(streaming over HTTP, every variant deployed side by side, one torch thread like HF's), the memory-bandwidth
ceiling (measured copy bandwidth ÷ weight bytes read per decoded token), and each variant's packed model bytes
and held-out perplexity.

The dense model is Crucible's cached base (`models/llm/base.py`: trained once, a few CPU minutes, if it
is not cached yet; `--quick` uses the seconds-long smoke base); `--model FOLDER` benches a local Hugging
Face folder instead. The variants are made here, one-shot, so the bench needs no other job: Wanda 50%
and SparseGPT 2:4 (weights stay dense in memory: no CPU sparse kernels, so their speed should equal
dense while their packed bytes shrink), RTN 4-bit g32 (de-quantized storage: the same), and the hidden
size cut to 3/4 by channel energy (`pat.slice_hidden`, untuned: the shape PAT tunes into, with real
fewer FLOPs and bytes). Every deployment decodes with the engine's continuous batch (`max_batch_size` 16);
because each decode step runs a fixed number of rows (so a request's output never depends on its neighbours),
the dense model is also deployed with `max_batch_size` 1, to show what that padding costs a lone request.
The inter-token latency is the gap between streamed text deltas (one token each, but for held-back UTF-8).

    .venv/bin/python bench/llm_serving.py            # a few minutes on 2 busy cores
    .venv/bin/python bench/llm_serving.py --quick    # micro sizes, checks that it runs
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `models` when run as a script

PROMPT = [{"role": "user", "content": "Write a Python function that parses a config file."}]
LEVELS = (1, 2, 4, 8, 16)
BATCH = 16  # the deployments' max_batch_size: the sweep's top level fits one batch


@dataclass
class Variant:
    name: str
    folder: Path
    packed_bytes: int
    val_ppl: float


def base_folder(quick: bool) -> Path:
    """Crucible's cached base model (trained on first use), as every compression job starts from it."""
    from models.context import InMemoryRunContext
    from models.llm.base import base_model

    return base_model(InMemoryRunContext(seed=0), smoke=quick)


def make_variants(folder: Path, dest: Path, quick: bool) -> list[Variant]:
    """The dense model and four one-shot compressions of it, each saved as an HF folder."""
    import copy

    from models.datasets import load_builtin
    from models.llm.compression.oneshot import prune_model, quantize_model
    from models.llm.compression.pruning import SparsityPattern
    from models.llm.compression.storage import LinearFormat, packed_bytes
    from models.llm.data import split_windows
    from models.llm.evaluation import perplexity
    from models.llm.folder import load_folder, save_folder
    from models.methods.llm_compression.pat import channel_energy, slice_hidden

    lm = load_folder(folder)
    ds = load_builtin("stdlib-code")
    seq = min(128, lm.model.config.max_position_embeddings)
    calibration = split_windows(lm.tokenizer, ds.train["text"], seq, 4 if quick else 16)
    val = split_windows(lm.tokenizer, ds.val["text"], seq, 4 if quick else 32)

    def variant(name: str, model: torch.nn.Module, formats: dict) -> Variant:
        with torch.no_grad():
            ppl = perplexity(model, val)
        out = save_folder(model, lm.tokenizer, dest / name)
        return Variant(name, out, packed_bytes(model, formats), ppl)

    rows = [variant("dense", lm.model, {})]
    for name, pattern, how in (("wanda-50%", "0.5", "wanda"), ("sparsegpt-2:4", "2:4", "sparsegpt")):
        model = copy.deepcopy(lm.model)
        sparsity = SparsityPattern.parse(pattern)
        masks = prune_model(model, calibration, sparsity, how)
        rows.append(variant(name, model, {k: LinearFormat(pattern=sparsity) for k in masks}))
    model = copy.deepcopy(lm.model)
    rows.append(variant("rtn-4bit-g32", model, quantize_model(model, 4, 32)))
    with torch.no_grad():
        energy = channel_energy(lm.model, calibration)
    hidden = lm.model.config.hidden_size
    kept = torch.sort(torch.topk(energy, hidden * 3 // 4).indices).values
    with torch.no_grad():
        rows.append(variant(f"hidden-{len(kept)}of{hidden}", slice_hidden(lm.model, kept), {}))
    return rows


def copy_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write counted once each)."""
    src = torch.empty(mb * 2**20 // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / min(times)


def hf_generate(folders: list[Path], tokens: int, repeats: int) -> list[dict[str, float]]:
    """Hugging Face `generate` in this process, the reference the server's decoding is held against: the
    variants' rounds interleaved, so a change in the shared machine's load hits them alike."""
    from models.llm.folder import load_folder

    lms = [load_folder(f) for f in folders]
    rates: list[list[float]] = [[] for _ in lms]
    for r in range(repeats + 1):
        for lm, out_rates in zip(lms, rates):
            ids = lm.tokenizer.apply_chat_template(
                PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            torch.manual_seed(r)
            t = time.perf_counter()
            out = lm.model.generate(
                **ids,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=True,
                temperature=1.0,
                pad_token_id=lm.tokenizer.pad_token_id,
            )
            if r:  # the first round warms up
                out_rates.append((out.shape[1] - ids["input_ids"].shape[1]) / (time.perf_counter() - t))
    return [
        {
            "tokens_per_s": statistics.median(rs),
            "weight_bytes": sum(p.numel() * p.element_size() for p in lm.model.parameters()),
        }
        for lm, rs in zip(lms, rates)
    ]


@dataclass
class Stream:
    """One streamed chat completion: time to first token, total seconds, completion tokens, gaps between deltas."""

    ttft: float
    seconds: float
    tokens: int
    gaps: list[float]
    error: str | None = None


def quantiles(values: list[float]) -> dict[str, float]:
    """p50 and p95 (nearest rank), in seconds, of the values that exist (a reply that ended at once, on an
    end-of-text token, has no first token to time)."""
    ordered = sorted(v for v in values if v == v) or [float("nan")]
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.5), "p95": pick(0.95)}


def summary(runs: list[Stream], concurrency: int, wall: float | None = None) -> dict[str, object]:
    """A level's figures: aggregate tokens/s over the wall time (median per-request rate when `wall` is None)."""
    rate = (
        sum(r.tokens for r in runs) / wall
        if wall is not None
        else statistics.median(r.tokens / r.seconds for r in runs)
    )
    return {
        "concurrency": concurrency,
        "requests": len(runs),
        "tokens_per_s": rate,
        "ttft_s": quantiles([r.ttft for r in runs]),
        "itl_s": quantiles([g for r in runs for g in r.gaps]),
        "mean_tokens": statistics.fmean(r.tokens for r in runs),
        "failed": sorted({r.error for r in runs if r.error}),  # refused or broken streams, if any
        "empty": sum(1 for r in runs if not r.tokens and not r.error),  # sampled an end-of-text token first
    }


def interleaved_streams(url: str, key: str, names: list[str], tokens: int, repeats: int) -> list[dict[str, object]]:
    """Batch-1 streamed requests, one per deployment per round, rounds interleaved like `hf_generate`'s."""
    runs: list[list[Stream]] = [[] for _ in names]
    for r in range(repeats):
        for name, out in zip(names, runs):
            out.append(one_stream(url, key, name, tokens, r))
    return [summary(rs, 1) for rs in runs]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(variants: list[Variant], home: Path) -> tuple[str, str, subprocess.Popen]:
    """A real `crucible up` process (one torch thread, like HF below) with every variant imported and
    deployed under its own name (and the dense one again as `UNPADDED`, a batch of one row).

    The server runs in its own process so the benchmark's HTTP clients do not share its GIL."""
    port = free_port()
    env = {
        **os.environ,
        "CRUCIBLE_HOME": str(home),
        "CRUCIBLE_DEMO_JOB": "false",
        "OMP_NUM_THREADS": "1",
        "CRUCIBLE_RATE_LIMIT_INFERENCE_PER_MINUTE": "100000",
        "CRUCIBLE_RATE_LIMIT_INFERENCE_PER_MINUTE_PER_PROJECT": "100000",
        "CRUCIBLE_MAX_INFLIGHT_PER_DEPLOYMENT": str(4 * BATCH),  # the sweep's 16 clients all in flight
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "up", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    probe = httpx.Client(base_url=url, timeout=5)
    while True:
        if proc.poll() is not None:
            raise RuntimeError("crucible up exited during start-up")
        try:
            if probe.get("/api/v1/health").status_code == 200 and (home / "admin-key").is_file():
                break
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    key = (home / "admin-key").read_text().strip()
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600)
    for v in variants:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for p in v.folder.rglob("*"):
                if p.is_file():
                    zf.write(p, p.relative_to(v.folder).as_posix())
        name = deployment_name(v)
        r = http.post("/api/v1/models", data={"name": name}, files={"file": ("m.zip", buf.getvalue())})
        assert r.status_code == 201, r.text
        engine = {"max_batch_size": BATCH, "max_queue": 256}
        r = http.post("/api/v1/deployments", json={"name": name, "model": name, "engine": engine})
        assert r.status_code == 201, r.text
    engine = {"max_batch_size": 1}
    r = http.post(
        "/api/v1/deployments", json={"name": UNPADDED, "model": deployment_name(variants[0]), "engine": engine}
    )
    assert r.status_code == 201, r.text
    return url, key, proc


UNPADDED = "bench-dense-batch-1"


def deployment_name(v: Variant) -> str:
    return "bench-" + "".join(c if c.isalnum() else "-" for c in v.name)


def one_stream(url: str, key: str, model: str, tokens: int, seed: int) -> Stream:
    """One streamed chat completion, timed at every text delta."""
    body = {
        "model": model,
        "messages": PROMPT,
        "max_tokens": tokens,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, done, stamps, error = time.perf_counter(), 0, [], None
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                error = f"{r.status_code}: {r.read().decode()[:300]}"
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]["message"]
                    continue
                if any(c["delta"].get("content") for c in event["choices"]):
                    stamps.append(time.perf_counter())
                if event.get("usage"):
                    done = event["usage"]["completion_tokens"]
    first = stamps[0] - start if stamps else float("nan")
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return Stream(first, time.perf_counter() - start, done, gaps, error)


def load_test(url: str, key: str, model: str, tokens: int, concurrency: int, per_client: int) -> dict[str, object]:
    """`concurrency` clients, each sending `per_client` streamed requests back to back."""
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        runs = list(pool.map(lambda i: one_stream(url, key, model, tokens, i), range(concurrency * per_client)))
    return summary(runs, concurrency, time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None, help="a local HF folder (default: Crucible's cached base)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="requests per client at each level")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    levels = (1, 2) if args.quick else LEVELS
    if args.quick:
        args.tokens, args.repeats = 8, 1
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        variants = make_variants(args.model or base_folder(args.quick), Path(tmp) / "variants", args.quick)
        (Path(tmp) / "home").mkdir()
        url, key, server = serve(variants, Path(tmp) / "home")
        try:
            names = [deployment_name(v) for v in variants]
            for name in [*names, UNPADDED]:
                one_stream(url, key, name, args.tokens, 0)  # warm-up: loads the deployment
            hf = hf_generate([v.folder for v in variants], args.tokens, args.repeats)
            single = interleaved_streams(url, key, [*names, UNPADDED], args.tokens, max(args.repeats, 3))
            sweep = [load_test(url, key, names[0], args.tokens, c, args.repeats) for c in levels]
            results = [
                {
                    "variant": v.name,
                    "packed_bytes": v.packed_bytes,
                    "val_ppl": v.val_ppl,
                    "weight_bytes": h["weight_bytes"],
                    "hf_tokens_per_s": h["tokens_per_s"],
                    "served": [one, load_test(url, key, name, args.tokens, levels[-1] // 2, args.repeats)],
                }
                for v, name, h, one in zip(variants, names, hf, single)
            ]
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)
    bw = copy_bandwidth(64 if args.quick else 256)
    hf_dense, base = results[0]["hf_tokens_per_s"], sweep[0]["tokens_per_s"]
    for level in sweep:
        level["vs_concurrency_1"] = level["tokens_per_s"] / base
        level["vs_hf_generate"] = level["tokens_per_s"] / hf_dense
    report(args, bw, sweep, results, single[-1])
    out = REPO / "bench" / "results" / ("llm-serving-quick.json" if args.quick else "llm-serving.json")
    out.write_text(
        json.dumps(
            {
                "machine": platform.platform(),
                "cpus": os.cpu_count(),
                "load_average_before": load_before,  # 1, 5, 15 min: other work on the machine during the run
                "load_average_after": os.getloadavg(),
                "tokens": args.tokens,
                "copy_bandwidth": bw,
                "max_batch_size": BATCH,
                "hf_generate_tokens_per_s": hf_dense,
                "sweep": sweep,
                "unpadded_batch_1": single[-1],
                "variants": results,
            },
            indent=2,
        )
    )


def report(args: argparse.Namespace, bw: float, sweep: list[dict], results: list[dict], unpadded: dict) -> None:
    """The side-by-side tables: the dense sweep, then the variants."""
    print(
        f"model {args.model or 'Crucible base'}; copy bandwidth {bw / 1e9:.1f} GB/s; {args.tokens} tokens per request"
    )
    print(f"HF generate (batch 1, in process): {results[0]['hf_tokens_per_s']:.1f} tok/s")
    print(f"{'clients':>8}{'tok/s':>9}{'vs c=1':>8}{'vs HF':>7}{'TTFT p50':>10}{'p95':>8}{'ITL p50':>9}{'p95':>8}")
    for s in [*sweep, {**unpadded, "concurrency": "1*"}]:
        ratio = f"{s['vs_concurrency_1']:>8.2f}{s['vs_hf_generate']:>7.2f}" if "vs_hf_generate" in s else " " * 15
        print(
            f"{s['concurrency']:>8}{s['tokens_per_s']:>9.1f}{ratio}"
            f"{s['ttft_s']['p50'] * 1e3:>8.0f}ms{s['ttft_s']['p95'] * 1e3:>6.0f}ms"
            f"{s['itl_s']['p50'] * 1e3:>7.1f}ms{s['itl_s']['p95'] * 1e3:>6.1f}ms"
        )
    print(f"(1*: the same model deployed with max_batch_size 1, no padding rows; the rest max_batch_size {BATCH})")
    many = results[0]["served"][1]["concurrency"]
    print(
        f"{'variant':<18}{'packed MB':>10}{'val ppl':>9}{'HF tok/s':>10}{'c=1 tok/s':>11}{'vs HF':>7}"
        f"{'vs dense':>9}{f'c={many} tok/s':>12}{'% ceiling':>10}"
    )
    dense = results[0]["served"][0]["tokens_per_s"]
    for r in results:
        one, batched = r["served"]
        ceiling = bw / r["weight_bytes"]
        print(
            f"{r['variant']:<18}{r['packed_bytes'] / 1e6:>10.2f}{r['val_ppl']:>9.1f}{r['hf_tokens_per_s']:>10.1f}"
            f"{one['tokens_per_s']:>11.1f}{one['tokens_per_s'] / r['hf_tokens_per_s']:>7.2f}"
            f"{one['tokens_per_s'] / dense:>9.2f}{batched['tokens_per_s']:>12.1f}"
            f"{100 * one['tokens_per_s'] / ceiling:>9.2f}%"
        )


if __name__ == "__main__":
    main()
