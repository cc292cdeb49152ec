"""Serving load benchmark, in one run on one machine: the VQA service with dynamic batching
(serve.batch, up to 16 per batch) against the same service answering one request at a time,
at concurrency 1, 4 and 16, for short answers (16 new tokens, VQA) and report-length answers
(64). Requests/s and p50/p99 latency, on 127.0.0.1.

    python benchmarks/serve_load.py [--checkpoint DIR] [--requests 64] [--max-new-tokens 16 64]

Without --checkpoint a tiny random-weight checkpoint of the quickstart's shape is built. Writes
benchmarks/results/serve_load.json and prints a Markdown table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import socket
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))


def tiny_checkpoint(tmp: Path) -> str:
    import torch

    from m4cxr.config import load_experiment
    from m4cxr.model.checkpoint import save_checkpoint
    from m4cxr.model.m4cxr import build_model
    from m4cxr.model.tokenizer import train_tiny_tokenizer

    exp = load_experiment(ROOT / "experiments/quickstart.yaml")
    texts = ["Is the heart enlarged?", "There is a small left pleural effusion.", "The lungs are clear."] * 50
    torch.manual_seed(0)
    return str(save_checkpoint(build_model(exp, train_tiny_tokenizer(texts, 300)), exp, tmp / "ckpt"))


def image_b64() -> str:
    """One of the openly licensed chest X-rays in tests/data/real, resized to 256 px."""
    from PIL import Image

    path = sorted(p for p in (ROOT / "tests/data/real").rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[0]
    with Image.open(path) as im:
        image = im.convert("L").resize((256, 256))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def one(url: str, body: bytes) -> float:
    started = time.perf_counter()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        json.loads(r.read())
    return time.perf_counter() - started


def load(url: str, image: str, concurrency: int, n: int) -> dict:
    bodies = [json.dumps({"images": [image], "question": f"Is there finding {i} in this image?"}).encode()
              for i in range(n)]
    one(url, bodies[0])  # warm
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(lambda b: one(url, b), bodies))
    wall = time.perf_counter() - started
    return {"concurrency": concurrency, "requests": n, "requests_per_s": round(n / wall, 2),
            "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
            "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, nargs="+", default=[16, 64])
    args = p.parse_args()

    import ray
    from ray import serve

    from m4cxr.serve.apps import build

    tmp = Path(tempfile.mkdtemp())
    checkpoint = args.checkpoint or tiny_checkpoint(tmp)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from m4cxr.ray_cluster import init_ray
    init_ray(num_cpus=os.cpu_count(), log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    image = image_b64()
    rows = []
    for tokens in args.max_new_tokens:
        common = {"checkpoints": {"default": checkpoint}, "max_new_tokens": tokens,
                  "max_ongoing_requests": 64, "max_queued_requests": 1024}
        # each route over a model application of its own: batches of up to 16, or one at a time
        for route, batch in (("batched", {"max_batch_size": 16, "batch_wait_timeout_s": 0.05}),
                             ("single", {"max_batch_size": 1})):
            serve.run(build("model", {**common, **batch, "ray_actor_options": {"num_cpus": 0.9}}),
                      name=f"model_{route}", route_prefix=None)
            serve.run(build("vqa", {**common, "model_app": f"model_{route}"}), name=route, route_prefix=f"/{route}")
        for batching, route in (("on", "/batched"), ("off", "/single")):
            for c in (1, 4, 16):
                n = max(c * 4, args.requests if c == 16 else args.requests // 2)
                r = {"max_new_tokens": tokens, "batching": batching,
                     **load(f"http://127.0.0.1:{port}{route}", image, c, n)}
                rows.append(r)
                print(r, flush=True)
    serve.shutdown()
    ray.shutdown()
    by = {(r["max_new_tokens"], r["batching"], r["concurrency"]): r["requests_per_s"] for r in rows}
    speedups = {f"{t}_new_tokens": round(by[(t, "on", 16)] / by[(t, "off", 16)], 2) for t in args.max_new_tokens}
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "checkpoint": args.checkpoint or "tiny, the quickstart's shape, random weights",
              "rows": rows, "speedup_batched_vs_one_at_a_time_at_concurrency_16": speedups}
    out = ROOT / "benchmarks/results/serve_load.json"
    out.write_text(json.dumps(result, indent=2))
    print("\n| new tokens | batching | concurrency | requests/s | p50 ms | p99 ms |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['max_new_tokens']} | {r['batching']} | {r['concurrency']} | {r['requests_per_s']} | "
              f"{r['p50_ms']} | {r['p99_ms']} |")
    print(f"\nbatched vs one-at-a-time at concurrency 16: {speedups} -> {out}")


if __name__ == "__main__":
    main()
