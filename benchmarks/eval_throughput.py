"""Evaluation throughput, both engines in one run: `m4cxr eval`'s batch inference (Ray Data) on
the vLLM engine and on transformers, the same checkpoint and requests: every report scenario with
and without CoT (a CoT report is two turns), phrase grounding and VQA of the test split.

    python benchmarks/eval_throughput.py [--checkpoint DIR] [--corpus DIR] [--trials 2]

The checkpoint is the quickstart's (run `m4cxr quickstart --out runs/quickstart` first).
`--trials N` evaluates it as N checkpoints at once, as a sweep's trials over one base are: on vLLM
one engine holds them as N LoRA adapters; 2 trials of the quickstart's test split are 1,358
requests. Each engine runs the evaluation twice, small (2 samples per task) and whole; the
difference between the two is the rate after start-up:

    rate = (requests_whole - requests_small) / (seconds_whole - seconds_small)
    start-up = seconds_small - requests_small / rate

Then a sweep trial's validation as the quickstart's sweep runs it (sweep/run.py
validation_objectives: CoT reports, grounding and VQA, tune.eval_samples_per_task samples each of
the validation split), timed whole on each engine, start-up included: what `eval.engine: auto`
weighs for a trial. Also counts the requests whose answers differ between the engines (greedy,
float32: none should).
Writes benchmarks/results/eval_throughput.json and prints a Markdown table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))


def timed_run(exp, checkpoints: dict, corpus: str, engine: str, samples_per_task: int, out: Path) -> dict:
    from m4cxr.eval.inference import run_inference

    exp.eval.samples_per_task = samples_per_task
    started = time.perf_counter()
    table = run_inference(exp, checkpoints, corpus, out, engine=engine)
    seconds = time.perf_counter() - started
    tokens = sum(table.column("generated_tokens").to_pylist())
    return {"requests": table.num_rows, "seconds": round(seconds, 2), "generated_tokens": tokens,
            "errors": sum(1 for e in table.column("error").to_pylist() if e), "table": table}


def engine_figures(small: dict, whole: dict) -> dict:
    span = whole["seconds"] - small["seconds"]
    rate = (whole["requests"] - small["requests"]) / span
    return {"requests": whole["requests"], "seconds": whole["seconds"], "errors": whole["errors"],
            "requests_per_s": round(rate, 2),
            "generated_tokens_per_s": round((whole["generated_tokens"] - small["generated_tokens"]) / span, 1),
            "start_up_s": round(small["seconds"] - small["requests"] / rate, 1),
            "small_run": {k: small[k] for k in ("requests", "seconds", "generated_tokens")}}


def differing(a, b) -> int:
    key = lambda r: (r["checkpoint"], r["sample_id"], r["mode"])  # noqa: E731
    left = {key(r): (r["findings"], r["prediction"], r["error"]) for r in a.to_pylist()}
    right = {key(r): (r["findings"], r["prediction"], r["error"]) for r in b.to_pylist()}
    return sum(1 for k in left.keys() | right.keys() if left.get(k) != right.get(k))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "runs/quickstart/train/quickstart-instruction/final"))
    p.add_argument("--corpus", default=str(ROOT / "runs/quickstart/corpus"))
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--merged", action="store_true",
                   help="evaluate the checkpoint with its LoRA adapter merged into the LLM (no adapter on either engine)")
    p.add_argument("--out", default=None, help="default: benchmarks/results/eval_throughput[_merged].json")
    args = p.parse_args()
    args.out = args.out or str(ROOT / f"benchmarks/results/eval_throughput{'_merged' if args.merged else ''}.json")
    if not (Path(args.checkpoint) / "m4cxr.json").is_file():
        sys.exit(f"{args.checkpoint}: no checkpoint; run `m4cxr quickstart --out runs/quickstart` first")

    import m4cxr
    import ray
    from m4cxr.model.checkpoint import read_experiment
    from m4cxr.ray_cluster import init_ray
    from m4cxr.sweep.run import validation_objectives

    m4cxr.log_progress()
    logging.getLogger("m4cxr").setLevel(logging.INFO)
    init_ray(num_cpus=os.cpu_count(), log_to_driver=False)
    if args.merged:
        from m4cxr.model.checkpoint import export_merged

        args.checkpoint = str(export_merged(args.checkpoint, Path(tempfile.mkdtemp()) / "merged"))
    checkpoints = {f"trial{i}": args.checkpoint for i in range(args.trials)}
    results: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores, {platform.machine()}",
                     "checkpoint": args.checkpoint, "merged": args.merged, "trials": args.trials, "engines": {}}
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ("vllm", "hf"):
            exp = read_experiment(args.checkpoint)
            exp.eval.engine = engine
            small = timed_run(exp, checkpoints, args.corpus, engine, 2, Path(tmp) / f"{engine}-small.parquet")
            whole = timed_run(exp, checkpoints, args.corpus, engine, 0, Path(tmp) / f"{engine}-whole.parquet")
            tables[engine] = whole.pop("table")
            small.pop("table")
            results["engines"][engine] = engine_figures(small, whole)
            results["max_new_tokens"] = exp.eval.max_new_tokens
            print(engine, json.dumps(results["engines"][engine]), flush=True)
        for engine in ("vllm", "hf"):
            exp = read_experiment(args.checkpoint)
            exp.eval.engine = engine
            started = time.perf_counter()
            objectives = validation_objectives(exp, args.checkpoint, args.corpus, Path(tmp) / f"val-{engine}.parquet")
            requests = pq.read_metadata(Path(tmp) / f"val-{engine}.parquet").num_rows
            results.setdefault("trial_validation", {})[engine] = {
                "seconds": round(time.perf_counter() - started, 1), "requests": requests, "objectives": objectives}
            print("trial validation", engine, json.dumps(results["trial_validation"][engine]), flush=True)
    ray.shutdown()
    v, h = results["engines"]["vllm"], results["engines"]["hf"]
    results["vllm_over_hf_requests_per_s"] = round(v["requests_per_s"] / h["requests_per_s"], 2)
    # how many requests before vLLM's start-up is paid back by its rate (if it is faster)
    per_request_saved = 1 / h["requests_per_s"] - 1 / v["requests_per_s"]
    extra_start = v["start_up_s"] - h["start_up_s"]
    results["break_even_requests"] = round(extra_start / per_request_saved) if per_request_saved > 0 else None
    results["answers_differing"] = differing(tables["vllm"], tables["hf"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print("\n| engine | requests | requests/s after start-up | generated tokens/s | start-up s | errors |")
    print("|---|---|---|---|---|---|")
    for name, r in results["engines"].items():
        print(f"| {name} | {r['requests']} | {r['requests_per_s']} | {r['generated_tokens_per_s']} | "
              f"{r['start_up_s']} | {r['errors']} |")
    print(f"\nvLLM / transformers, requests/s: {results['vllm_over_hf_requests_per_s']}x; break-even at "
          f"{results['break_even_requests']} requests; answers differing: {results['answers_differing']}")
    t = results["trial_validation"]
    print(f"a sweep trial's validation ({t['hf']['requests']} requests), start-up included: vLLM "
          f"{t['vllm']['seconds']} s, transformers {t['hf']['seconds']} s")


if __name__ == "__main__":
    main()
