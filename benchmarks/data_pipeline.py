"""Data-path benchmark, all in one run on the same machine:

1. samples/s of the Ray Data pipeline (draw -> load, resize, normalise, tokenise on CPU actors)
   against a plain single-process loop doing the same work, and against image decoding alone;
2. the share of non-padding tokens with and without length grouping and with packing
   (data.packing: rows of up to train.max_seq_len tokens), on the paper's mixture of sequence
   lengths (Table 10 weights; 361 visual tokens per image); and the samples/s of the Ray Data
   path with the Train worker's collate (step_batches), length-grouped and packed;
3. the quickstart's peak memory (all its processes together).

    python benchmarks/data_pipeline.py [--samples 1500] [--skip-quickstart] [--out FILE]

Writes benchmarks/results/data_pipeline.json (or --out) and prints a Markdown table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))


def make_corpus(tmp: Path):
    from m4cxr.config import load_experiment
    from m4cxr.data.synthetic import synthesize
    from m4cxr.train.run import prepare_tokenizer

    exp = load_experiment(ROOT / "experiments/quickstart.yaml", [
        f"data.corpus_dir={tmp / 'corpus'}", "data.image_size=224", "data.synthetic.image_size=224",
        "data.synthetic.patients=150", "data.preprocess_actors=2", "data.preprocess_cpus=0.9"])
    synthesize(exp.data.corpus_dir, exp.data.synthetic, progress=False)
    return exp, prepare_tokenizer(exp, exp.data.corpus_dir)


def throughput(exp, tok_dir, n: int) -> dict:
    import ray

    from m4cxr.data.pipeline import (
        PrepareSamples, draw_rows, pair_rows, prepare_args, stage_mixture, step_batches, train_stream,
    )
    from m4cxr.data.schema import ImageStore

    corpus = exp.data.corpus_dir
    tpi = exp.model.projector.num_query_tokens
    mixture = stage_mixture(exp, "instruction", corpus)
    drawn = draw_rows({"positions": [np.arange(n)]}, mixture, pair_rows(corpus, mixture))
    prep = PrepareSamples(**prepare_args(exp, corpus, "train", tok_dir, tpi, "instruction"))
    rows = drawn["row"]

    # image decoding alone (the same images, one process)
    from PIL import Image

    store = ImageStore(corpus)
    paths = [[store.path(i["image_id"]) for i in prep.table.slice(int(r), 1).to_pylist()[0]["images"]] for r in rows]
    t0 = time.perf_counter()
    for sample_paths in paths:
        for p in sample_paths:
            with Image.open(p) as im:
                im.load()
    decode = n / (time.perf_counter() - t0)

    # the same work as the pipeline in a plain single-process loop
    t0 = time.perf_counter()
    for start in range(0, n, 8):
        prep({"row": rows[start:start + 8], "position": drawn["position"][start:start + 8]})
    loop = n / (time.perf_counter() - t0)

    # the Ray Data pipeline, consumed as a trainer would consume it
    from m4cxr.ray_cluster import init_ray
    init_ray(num_cpus=os.cpu_count(), log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = train_stream(exp, "instruction", corpus, tok_dir, tpi, np.arange(n))
    for _ in ds.limit(64).iter_batches(batch_size=32):  # start the actors before timing
        pass
    # steady state: timed from the first batch (actor start-up, a one-off per run, is reported apart)
    t_start = time.perf_counter()
    seen, t0 = 0, None
    for batch in train_stream(exp, "instruction", corpus, tok_dir, tpi, np.arange(n)).iter_batches(batch_size=32, prefetch_batches=4):
        if t0 is None:
            t0 = time.perf_counter()
            continue
        seen += len(batch["position"])
    pipeline = seen / (time.perf_counter() - t0)
    start_s = t0 - t_start

    # the same, read one worker step at a time and collated into micro-batches as the Train
    # worker does (data.packing off: length-grouped; on: packed rows of train.max_seq_len)
    def collated(pack_to: int) -> float:
        seen, t0 = 0, None
        for rows in train_stream(exp, "instruction", corpus, tok_dir, tpi, np.arange(n)).iter_batches(
                batch_size=step_rows, batch_format="numpy", prefetch_batches=2):
            step_batches(rows, exp.train.micro_batch_size, 0, exp.data.image_size, exp.model.image_mean,
                         exp.model.image_std, True, pack_to)
            if t0 is None:
                t0 = time.perf_counter()
                continue
            seen += len(rows["position"])
        return seen / (time.perf_counter() - t0)

    step_rows = 32
    grouped = collated(0)
    packed = collated(exp.train.max_seq_len)
    ray.shutdown()
    return {"samples": n, "decode_only_per_s": round(decode, 1), "single_process_loop_per_s": round(loop, 1),
            "ray_data_per_s": round(pipeline, 1), "ray_start_s": round(start_s, 1),
            "ray_vs_loop": round(pipeline / loop, 2), "ray_vs_decode_only": round(pipeline / decode, 2),
            "worker_step_rows": step_rows, "ray_data_collated_grouped_per_s": round(grouped, 1),
            "ray_data_collated_packed_per_s": round(packed, 1)}


def padding(exp, tok_dir, steps: int = 200, per_worker_step: int = 32, micro: int = 4) -> dict:
    """Non-padding share on the paper's mixture: Table 10 probabilities, 361 tokens per image,
    text lengths and image counts of each task taken from the synthetic corpus. Packed: the
    step's samples in rows of up to the paper's train.max_seq_len tokens as the Train worker
    packs them, micro-batches of `micro` rows or of one row."""
    from transformers import AutoTokenizer

    from m4cxr.config import load_experiment
    from m4cxr.data.pipeline import pack_micro_batches
    from m4cxr.data.mixture import build_mixture
    from m4cxr.data.schema import read_samples

    tok = AutoTokenizer.from_pretrained(tok_dir)
    by_task: dict[str, list[tuple[int, int]]] = {}
    for s in read_samples(exp.data.corpus_dir, "train"):
        text = sum(len(tok(t["content"], add_special_tokens=False)["input_ids"]) for t in s.turns)
        by_task.setdefault(s.task, []).append((text, len(s.images)))
    paper_exp = load_experiment(ROOT / "experiments/m4cxr.yaml")
    paper = build_mixture(paper_exp.data.mixture)
    max_seq_len = paper_exp.train.max_seq_len
    rng = np.random.default_rng(0)
    pairs, _ = paper.draw(steps * per_worker_step)
    lengths = []
    for p in pairs:
        text, images = by_task[paper.pairs[p].task][rng.integers(len(by_task[paper.pairs[p].task]))]
        lengths.append(text + 361 * images)
    lengths = np.array(lengths).reshape(steps, per_worker_step)

    def share(group: bool) -> float:
        real = padded = 0
        for step in lengths:
            step = np.sort(step) if group else step
            for mb in step.reshape(-1, micro):
                real += mb.sum()
                padded += mb.max() * len(mb)
        return real / padded

    def packed(rows_per_micro: int) -> tuple[float, float, float]:
        """Non-padding share, rows per step, and how full the rows are (of max_seq_len)."""
        real = padded = rows = 0
        for step in lengths:
            for mb in pack_micro_batches(step.tolist(), max_seq_len, rows_per_micro):
                row_lengths = [int(step[r].sum()) for r in mb]
                real += sum(row_lengths)
                padded += max(row_lengths) * len(row_lengths)
                rows += len(row_lengths)
        return real / padded, rows / len(lengths), real / (rows * max_seq_len)

    share_micro, rows_per_step, fill = packed(micro)
    share_one, _, _ = packed(1)
    return {"per_worker_step": per_worker_step, "micro_batch": micro, "mean_len": float(lengths.mean()),
            "max_len": int(lengths.max()), "nonpad_share_grouped": round(share(True), 4),
            "nonpad_share_random": round(share(False), 4), "max_seq_len": max_seq_len,
            "nonpad_share_packed": round(share_micro, 4), "nonpad_share_packed_one_row": round(share_one, 4),
            "packed_rows_per_step": round(rows_per_step, 2), "packed_row_fill": round(fill, 4),
            "grouped_micro_batches_per_step": per_worker_step // micro}


def quickstart_peak_memory(tmp: Path) -> dict:
    import psutil

    cmd = [sys.executable, "-m", "m4cxr.cli", "quickstart", "--out", str(tmp / "qs")]
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    root = psutil.Process(proc.pid)
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            try:
                procs = [root] + root.children(recursive=True)
                rss = sum(p.memory_info().rss for p in procs if p.is_running())
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    code = proc.wait()
    stop.set()
    thread.join()
    summary = json.loads((tmp / "qs/summary.json").read_text()) if code == 0 else {}
    return {"exit_code": code, "seconds": round(time.time() - started, 1), "peak_rss_gib": round(peak / 2**30, 2),
            "train_seconds": summary.get("train", {}).get("seconds"),
            "val_loss_first": summary.get("train", {}).get("val_loss_first"),
            "val_loss_last": summary.get("train", {}).get("val_loss_last")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=12000)
    parser.add_argument("--skip-quickstart", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/data_pipeline.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        exp, tok_dir = make_corpus(tmp)
        result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                  "date": time.strftime("%Y-%m-%d"), "throughput": throughput(exp, tok_dir, args.samples),
                  "padding": padding(exp, tok_dir)}
        if not args.skip_quickstart:
            result["quickstart"] = quickstart_peak_memory(tmp)
    out = Path(args.out)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    t, p = result["throughput"], result["padding"]
    print(json.dumps(result, indent=2))
    print(f"\n| measure | value |\n|---|---|\n"
          f"| image decoding alone | {t['decode_only_per_s']} samples/s |\n"
          f"| single-process loop (same work) | {t['single_process_loop_per_s']} samples/s |\n"
          f"| Ray Data pipeline | {t['ray_data_per_s']} samples/s ({t['ray_vs_loop']}x the loop, "
          f"{t['ray_vs_decode_only']:.0%} of decode-only) |\n"
          f"| Ray Data pipeline + worker collate, length-grouped | {t['ray_data_collated_grouped_per_s']} samples/s |\n"
          f"| Ray Data pipeline + worker collate, packed | {t['ray_data_collated_packed_per_s']} samples/s |\n"
          f"| non-padding tokens, length grouping | {p['nonpad_share_grouped']:.1%} |\n"
          f"| non-padding tokens, random micro-batches | {p['nonpad_share_random']:.1%} |\n"
          f"| non-padding tokens, packed ({p['micro_batch']} rows / 1 row per micro-batch) | "
          f"{p['nonpad_share_packed']:.1%} / {p['nonpad_share_packed_one_row']:.1%} |\n"
          f"| packed rows per step, fill of {p['max_seq_len']} tokens | {p['packed_rows_per_step']}, "
          f"{p['packed_row_fill']:.1%} |")
    if "quickstart" in result:
        print(f"| quickstart peak memory (all processes) | {result['quickstart']['peak_rss_gib']} GiB |")


if __name__ == "__main__":
    main()
