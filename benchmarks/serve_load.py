"""Serving load benchmark, both engines in one run on one machine: the OpenAI chat route over a
model application on the vLLM engine, then over one on the transformers engine (dynamic batching,
up to 32 per batch), the same checkpoint and requests (an image and a question, 64 new tokens), at
concurrency 1, 4, 16 and 32: requests/s (the median of 3 passes in which every client sends 4
requests in turn), generated tokens/s, p50/p99 latency, and the time to the first streamed token. Then the report route's two CoT turns on vLLM with prefix caching on and off.

    python benchmarks/serve_load.py [--checkpoint DIR] [--max-new-tokens 64] [--concurrency 1 4 16 32]

Without --checkpoint a tiny random-weight checkpoint of the quickstart's shape is built (LoRA
weights random too, so the adapter path runs). Each model application gets the machine's cores:
transformers as its torch threads, vLLM as its engine process plus the server's image encoding.
Writes benchmarks/results/serve_load.json and prints Markdown tables for RESULTS.md.
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
    model = build_model(exp, train_tiny_tokenizer(texts, 300))
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return str(save_checkpoint(model, exp, tmp / "ckpt"))


def image_b64(variant: int = 0) -> str:
    """One of the openly licensed chest X-rays in tests/data/real, resized to 256 px; a variant has
    a few pixels changed, so that its visual tokens are its own (no prefix-cache hit from another)."""
    from PIL import Image

    path = sorted(p for p in (ROOT / "tests/data/real").rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[0]
    with Image.open(path) as im:
        image = im.convert("L").resize((256, 256))
    for k in range(variant):
        image.putpixel((k % 256, k // 256), 255)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def chat_body(image: str, i: int, max_tokens: int, stream: bool) -> bytes:
    content = [{"type": "text", "text": "radiology image:"},
               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
               {"type": "text", "text": f"Answer the question. Is there finding {i} in this image?"}]
    body = {"model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return json.dumps(body).encode()


def one(url: str, body: bytes, stream: bool) -> tuple[float, float, int]:
    """(latency, time to the first text, completion tokens) of one request."""
    started = time.perf_counter()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    first, tokens = None, 0
    with urllib.request.urlopen(req, timeout=600) as r:
        if not stream:
            tokens = json.loads(r.read())["usage"]["completion_tokens"]
        else:
            for line in r:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if first is None and event.get("choices") and event["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - started
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    latency = time.perf_counter() - started
    return latency, first if first is not None else latency, tokens


def load(url: str, bodies: list[bytes], concurrency: int, stream: bool, rounds: int = 1) -> dict:
    """`rounds` passes over the bodies after a warm one: requests/s as the median pass (and each
    pass's), latencies over all of them."""
    with ThreadPoolExecutor(concurrency) as pool:  # warm, at this concurrency
        list(pool.map(lambda b: one(url, b, stream), bodies[:concurrency]))
    results, rates, tokens = [], [], []
    for _ in range(rounds):
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            done = list(pool.map(lambda b: one(url, b, stream), bodies))
        wall = time.perf_counter() - started
        results += done
        rates.append(len(bodies) / wall)
        tokens.append(sum(r[2] for r in done) / wall)
    if stream:  # streamed: the time to the first text
        first = [r[1] for r in results]
        return {"ttft_p50_ms": round(1000 * float(np.percentile(first, 50)), 1),
                "ttft_p99_ms": round(1000 * float(np.percentile(first, 99)), 1)}
    latencies = [r[0] for r in results]
    return {"requests": len(results), "requests_per_s": round(float(np.median(rates)), 2),
            "requests_per_s_rounds": [round(r, 2) for r in rates], "tokens_per_s": round(float(np.median(tokens)), 1),
            "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
            "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1)}


def mrg_load(url: str, concurrency: int, n: int) -> dict:
    """The report route (two CoT turns on the same engine), each request with an image of its own."""
    bodies = [json.dumps({"scenario": "single_image", "images": [image_b64(1 + i)], "cot": True}).encode()
              for i in range(n + 1)]

    def post(body: bytes) -> float:
        started = time.perf_counter()
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            json.loads(r.read())
        return time.perf_counter() - started

    post(bodies[0])
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(post, bodies[1:]))
    wall = time.perf_counter() - started
    return {"concurrency": concurrency, "requests": n, "requests_per_s": round(n / wall, 2),
            "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1)}


def deploy(serve, build, name: str, checkpoint: str, model_args: dict, max_new_tokens: int) -> str:
    common = {"checkpoints": {"default": checkpoint}, "max_new_tokens": max_new_tokens,
              "max_ongoing_requests": 128, "max_queued_requests": 1024}
    cpus = os.cpu_count()
    serve.run(build("model", {**common, **model_args, "max_prompt_tokens": 1024,
                              "ray_actor_options": {"num_cpus": cpus if model_args["engine"] == "hf" else 1}}),
              name=f"model-{name}", route_prefix=None)
    for route in ("v1", "mrg"):
        serve.run(build(route, {**common, "model_app": f"model-{name}"}), name=f"{name}-{route}",
                  route_prefix=f"/{name}/{route}")
    return f"/{name}"


def undeploy(serve, name: str) -> None:
    for app in (f"{name}-v1", f"{name}-mrg", f"model-{name}"):
        serve.delete(app)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    args = p.parse_args()

    import ray
    from ray import serve

    from m4cxr.ray_cluster import init_ray
    from m4cxr.serve.apps import build

    tmp = Path(tempfile.mkdtemp())
    checkpoint = args.checkpoint or tiny_checkpoint(tmp)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_ray(num_cpus=os.cpu_count() + 1, log_to_driver=False)  # the routes' small shares beside the model's
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    image = image_b64()
    engines = {"vllm": {"engine": "vllm"},
               "hf": {"engine": "hf", "max_batch_size": 32, "batch_wait_timeout_s": 0.05}}
    rows, started = [], {}
    for name, model_args in engines.items():
        t = time.perf_counter()
        prefix = deploy(serve, build, name, checkpoint, model_args, args.max_new_tokens)
        started[name] = round(time.perf_counter() - t, 1)
        url = f"{base}{prefix}/v1/chat/completions"
        for c in args.concurrency:
            # steady state: each client sends 4 requests one after another, in each of 3 passes
            # (with 1 or 2, the clients' first requests all arrive together, which flatters batches
            # that wait for each other); between passes and runs this machine varies a lot
            n = max(4 * c, 16)
            plain = load(url, [chat_body(image, i, args.max_new_tokens, False) for i in range(n)], c, False, 3)
            streamed = load(url, [chat_body(image, i, args.max_new_tokens, True) for i in range(max(2 * c, 16))], c,
                            True)
            rows.append({"engine": name, "concurrency": c, **plain, **streamed})
            print(rows[-1], flush=True)
        undeploy(serve, name)
    cot = []
    for caching in (True, False):
        name = "vllm-prefix" if caching else "vllm-noprefix"
        prefix = deploy(serve, build, name, checkpoint, {"engine": "vllm",
                                                          "engine_args": {"enable_prefix_caching": caching}},
                        args.max_new_tokens)
        for c in (1, 16):
            cot.append({"prefix_caching": caching, **mrg_load(f"{base}{prefix}/mrg", c, max(4 * c, 8))})
            print(cot[-1], flush=True)
        undeploy(serve, name)
    serve.shutdown()
    ray.shutdown()
    by = {(r["engine"], r["concurrency"]): r for r in rows}
    ratio = {c: round(by[("vllm", c)]["requests_per_s"] / by[("hf", c)]["requests_per_s"], 2) for c in args.concurrency}
    caching = {r["concurrency"]: r["requests_per_s"] for r in cot if r["prefix_caching"]}
    no_caching = {r["concurrency"]: r["requests_per_s"] for r in cot if not r["prefix_caching"]}
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "checkpoint": args.checkpoint or "tiny, the quickstart's shape, random weights (LoRA too)",
              "max_new_tokens": args.max_new_tokens, "engine_start_s": started, "rows": rows,
              "vllm_vs_hf_requests_per_s": ratio, "mrg_cot": cot,
              "prefix_caching_speedup": {c: round(caching[c] / no_caching[c], 2) for c in caching}}
    out = ROOT / "benchmarks/results/serve_load.json"
    out.write_text(json.dumps(result, indent=2))
    print("\n| engine | concurrency | requests/s (3 passes) | tokens/s | p50 ms | p99 ms | first token p50 ms | p99 ms |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        passes = " / ".join(str(x) for x in r["requests_per_s_rounds"])
        print(f"| {r['engine']} | {r['concurrency']} | {r['requests_per_s']} ({passes}) | {r['tokens_per_s']} | {r['p50_ms']} | "
              f"{r['p99_ms']} | {r['ttft_p50_ms']} | {r['ttft_p99_ms']} |")
    print("\n| prefix caching | concurrency | reports/s | p50 ms |\n|---|---|---|---|")
    for r in cot:
        print(f"| {'on' if r['prefix_caching'] else 'off'} | {r['concurrency']} | {r['requests_per_s']} | "
              f"{r['p50_ms']} |")
    print(f"\nvLLM vs transformers requests/s: {ratio}; prefix caching: {result['prefix_caching_speedup']} -> {out}")


if __name__ == "__main__":
    main()
