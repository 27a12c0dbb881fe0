"""LLM serving throughput: tokens/s and time to first token through `/v1/chat/completions` (a real
`crucible up` process on a free port, streaming over HTTP) at batch 1 and under concurrency, against
Hugging Face `generate` on the same model in the same run (both one torch thread), and the memory-bandwidth ceiling
(measured copy bandwidth ÷ weight bytes read per decoded token).

Throughput does not depend on the weights, so the model is the base recipe's architecture
(`tiny`, vocabulary 4096) freshly initialised with a BPE tokenizer trained on a slice of the corpus:
the bench trains no model. `--model FOLDER` benches a local Hugging Face folder instead (e.g. a
compressed variant a job registered). Decoding is one sequence at a time per model (the engine's
lock), so concurrency shows queueing (TTFT grows) rather than batching gains.

    .venv/bin/python bench/llm_serving.py            # ~1-2 min on 2 busy cores
    .venv/bin/python bench/llm_serving.py --quick    # micro sizes, checks that it runs
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import statistics
import sys
import subprocess
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `models` when run as a script

PROMPT = [{"role": "user", "content": "Write a Python function that parses a config file."}]


def build_folder(dest: Path, size: str) -> Path:
    from models.datasets import load_builtin
    from models.llm.folder import save_folder
    from models.llm.model import build_model, llama_config
    from models.llm.tokenizer import train_tokenizer

    texts = list(load_builtin("stdlib-code").train["text"][:120])
    tok = train_tokenizer(texts, vocab_size=4096 if size != "micro" else 512)
    config = llama_config(size, len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return save_folder(build_model(config, seed=0), tok, dest)


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


def hf_generate(folder: Path, tokens: int, repeats: int) -> dict[str, float]:
    from models.llm.folder import load_folder

    lm = load_folder(folder)
    ids = lm.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    rates = []
    for r in range(repeats + 1):
        torch.manual_seed(r)
        t = time.perf_counter()
        out = lm.model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True,
                                temperature=1.0, pad_token_id=lm.tokenizer.pad_token_id)
        if r:  # the first round warms up
            rates.append((out.shape[1] - ids["input_ids"].shape[1]) / (time.perf_counter() - t))
    params = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    return {"tokens_per_s": statistics.median(rates), "weight_bytes": params}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(folder: Path, home: Path) -> tuple[str, str, subprocess.Popen]:
    """A real `crucible up` process (one torch thread, like HF below) with `folder` deployed as `bench`.

    The server runs in its own process so the benchmark's HTTP clients do not share its GIL."""
    port = free_port()
    env = {**os.environ, "CRUCIBLE_HOME": str(home), "CRUCIBLE_DEMO_JOB": "false", "OMP_NUM_THREADS": "1",
           "CRUCIBLE_RATE_LIMIT_INFERENCE_PER_MINUTE": "100000"}
    proc = subprocess.Popen([sys.executable, "-m", "api.cli", "up", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in folder.rglob("*"):
            if p.is_file():
                zf.write(p, p.relative_to(folder).as_posix())
    assert http.post("/api/v1/models", data={"name": "bench"}, files={"file": ("m.zip", buf.getvalue())}).status_code == 201
    r = http.post("/api/v1/deployments", json={"name": "bench", "model": "bench", "engine": {"max_tokens_cap": 4096}})
    assert r.status_code == 201, r.text
    return url, key, proc


def one_stream(url: str, key: str, tokens: int, seed: int) -> tuple[float, float, int]:
    """(time to first token, total seconds, completion tokens) of one streamed chat completion."""
    body = {"model": "bench", "messages": PROMPT, "max_tokens": tokens, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, done = time.perf_counter(), None, 0
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if first is None and any(c["delta"].get("content") for c in event["choices"]):
                    first = time.perf_counter() - start
                if event.get("usage"):
                    done = event["usage"]["completion_tokens"]
    return first or float("nan"), time.perf_counter() - start, done


def load_test(url: str, key: str, tokens: int, concurrency: int, per_client: int) -> dict[str, float]:
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        runs = list(pool.map(lambda i: one_stream(url, key, tokens, i), range(concurrency * per_client)))
    wall = time.perf_counter() - started
    return {"concurrency": concurrency, "requests": len(runs), "tokens_per_s": sum(r[2] for r in runs) / wall,
            "ttft_median_s": statistics.median(r[0] for r in runs),
            "mean_tokens": statistics.fmean(r[2] for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None, help="a local HF folder (default: a fresh tiny Llama)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.tokens, args.repeats, args.concurrency = 8, 1, 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or build_folder(Path(tmp) / "model", "micro" if args.quick else "tiny")
        hf = hf_generate(folder, args.tokens, args.repeats)
        (Path(tmp) / "home").mkdir()
        url, key, server = serve(folder, Path(tmp) / "home")
        one_stream(url, key, args.tokens, 0)  # warm-up
        rows = [load_test(url, key, args.tokens, 1, args.repeats),
                load_test(url, key, args.tokens, args.concurrency, args.repeats)]
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    bw = copy_bandwidth(64 if args.quick else 256)
    ceiling = bw / hf["weight_bytes"]
    print(f"model {folder.name if args.model else 'fresh tiny Llama'}: {hf['weight_bytes'] / 1e6:.1f} MB of weights; "
          f"copy bandwidth {bw / 1e9:.1f} GB/s → ceiling {ceiling:.0f} tokens/s (weights read once per token)")
    print(f"HF generate (batch 1, in process): {hf['tokens_per_s']:.1f} tokens/s")
    print(f"{'path':<34}{'tokens/s':>10}{'vs HF':>8}{'TTFT med':>10}{'% ceiling':>11}")
    for row in rows:
        print(f"/v1/chat/completions c={row['concurrency']:<14}{row['tokens_per_s']:>10.1f}"
              f"{row['tokens_per_s'] / hf['tokens_per_s']:>8.2f}{row['ttft_median_s'] * 1e3:>8.0f}ms"
              f"{100 * row['tokens_per_s'] / ceiling:>10.2f}%")


if __name__ == "__main__":
    main()
