"""The GPU path end to end (issue 3), each leg against the same work on CPU in the same run.

    .venv/bin/python bench/gpu_path.py              # on a machine with a CUDA GPU (a few minutes)
    .venv/bin/python bench/gpu_path.py --dry-run    # both legs on CPU: checks the script anywhere

Everything goes through the embedded service (FastAPI app, local executor, SQLite, local objects) in a
temporary home, as a user would drive it:

1. Training: `diffusion-pretrain` submitted twice, with `resources: {"gpus": 1}` and `{"gpus": 0}`.
   Reports the device each job's log names, training steps/s (from its logged metric times), the
   final loss and the end-to-end seconds; the ratio is GPU ÷ CPU steps/s.
2. Sampling: the model the GPU job registered, deployed twice (`engine.device` cuda and cpu) and asked
   for the same CFG images (same seeds). Reports seconds per request, the speed ratio, and the largest
   pixel difference between the two devices' images (noise is drawn on CPU generators, so the same
   seed starts from the same noise on both; the difference is float arithmetic only).

Results go to bench/results/gpu-path.json. Nothing asserts a time.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def wait(client: Any, job_id: str, timeout_s: float = 1800) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} did not finish in {timeout_s} s")


def training_leg(client: Any, params: dict[str, Any], gpus: int) -> dict[str, Any]:
    started = time.perf_counter()
    r = client.post(
        "/api/v1/jobs",
        json={
            "method": "diffusion-pretrain",
            "dataset": "digits",
            "params": params,
            "resources": {"cpus": 1, "gpus": gpus},
        },
    )
    assert r.status_code == 201, r.text
    job = wait(client, r.json()["id"])
    took = time.perf_counter() - started
    log = client.get(f"/api/v1/jobs/{job['id']}/logs", params={"offset": 0}).json().get("text", "")
    named = [line for line in log.splitlines() if line.startswith("[crucible] run diffusion-pretrain on ")]
    device = named[0].rsplit(" on ", 1)[-1] if named else "?"
    points = [m for m in client.get(f"/api/v1/jobs/{job['id']}/metrics").json()["items"] if m["name"] == "loss"]
    steps_per_s = (
        (points[-1]["step"] - points[0]["step"]) / (points[-1]["time"] - points[0]["time"])
        if len(points) > 1 and points[-1]["time"] > points[0]["time"]
        else float("nan")
    )
    return {
        "job": job["id"],
        "status": job["status"],
        "device": device,
        "seconds": took,
        "steps_per_s": steps_per_s,
        "final_loss": points[-1]["value"] if points else None,
    }


def registered_model(client: Any, job_id: str) -> str:
    models = client.get("/api/v1/models").json()["items"]
    mine = [m for m in models if m.get("source_job_id") == job_id]
    return f"{mine[0]['name']}@{mine[0]['version']}"


def sampling_leg(client: Any, model: str, leg: str, device: str, body: dict[str, Any], rounds: int) -> dict[str, Any]:
    name = f"gpu-path-{leg}"
    r = client.post("/api/v1/deployments", json={"name": name, "model": model, "engine": {"device": device}})
    assert r.status_code == 201, r.text
    client.post(f"/api/v1/deployments/{name}/images", json={**body, "n": 1})  # load and warm
    seconds, images = [], None
    for _ in range(rounds):
        t = time.perf_counter()
        out = client.post(f"/api/v1/deployments/{name}/images", json=body)
        seconds.append(time.perf_counter() - t)
        assert out.status_code == 200, out.text
        images = [d["b64_json"] for d in out.json()["data"]]
    return {"seconds": statistics.median(seconds), "images": images}


def max_pixel_difference(a: list[str], b: list[str]) -> int:
    import numpy as np
    from PIL import Image

    def pixels(b64: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)

    return int(max(np.abs(pixels(x) - pixels(y)).max() for x, y in zip(a, b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="run both legs on CPU (no GPU needed)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per job")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--images", type=int, default=16, help="images per sampling request")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch
    from fastapi.testclient import TestClient

    from api.app import create_app
    from tests.conftest import make_key, make_settings
    from workers.db import upgrade

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here; run with --dry-run to check the script on CPU")
    gpu = "cpu" if args.dry_run else "cuda"
    with tempfile.TemporaryDirectory() as home:
        settings = make_settings(Path(home), max_concurrent_jobs=1, heartbeat_s=2.0, lease_s=60.0)
        upgrade(settings.database_url)
        with TestClient(create_app(settings)) as client:
            client.headers["Authorization"] = f"Bearer {make_key(settings)}"
            params = {
                "steps": args.steps,
                "batch_size": args.batch,
                "checkpoint_every": args.steps,
                "grid_per_class": 2,
            }
            train = {
                "gpu": training_leg(client, params, 0 if args.dry_run else 1),
                "cpu": training_leg(client, params, 0),
            }
            model = registered_model(client, train["gpu"]["job"])
            body = {"class": 3, "guidance": "cfg", "scale": 4.0, "steps": 25, "n": args.images, "seed": 7}
            sample = {
                "gpu": sampling_leg(client, model, "gpu", gpu, body, args.rounds),
                "cpu": sampling_leg(client, model, "cpu", "cpu", body, args.rounds),
            }
    result = {
        "machine": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if gpu == "cuda" else None,
        "torch": torch.__version__,
        "dry_run": args.dry_run,
        "training": {**train, "speedup": train["gpu"]["steps_per_s"] / train["cpu"]["steps_per_s"]},
        "sampling": {
            "images": args.images,
            "gpu_s": sample["gpu"]["seconds"],
            "cpu_s": sample["cpu"]["seconds"],
            "speedup": sample["cpu"]["seconds"] / sample["gpu"]["seconds"],
            "max_pixel_difference": max_pixel_difference(sample["gpu"]["images"], sample["cpu"]["images"]),
        },
    }
    for leg in ("gpu", "cpu"):
        t = train[leg]
        print(
            f"train {leg}: {t['status']} on {t['device']}, {t['steps_per_s']:.2f} steps/s, loss {t['final_loss']:.4f}, "
            f"{t['seconds']:.1f} s end to end"
        )
    s = result["sampling"]
    print(f"training speedup (steps/s): {result['training']['speedup']:.2f}x")
    print(
        f"sampling {args.images} CFG images x 25 steps: {s['gpu_s']:.3f} s on {gpu} vs {s['cpu_s']:.3f} s on cpu "
        f"({s['speedup']:.2f}x); largest pixel difference {s['max_pixel_difference']}/255"
    )
    out = REPO / "bench" / "results" / ("gpu-path-dry-run.json" if args.dry_run else "gpu-path.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("CRUCIBLE_DEMO_JOB", "false")
    main()
