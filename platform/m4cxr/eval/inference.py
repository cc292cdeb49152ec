"""Batch inference on Ray Data: test samples -> the model's answers, as an Arrow table.

    requests (sample row, mode)            ray.data.from_items, sorted by task so that a batch
                                           holds prompts of similar length
    -> answers                             map_batches(Predictor) over an actor pool, each actor
                                           holding one copy of the model (GPU or CPU)
    -> predictions.parquet                 one row per (sample, mode)

Report generation runs in the mode of `eval.cot` ("cot": the findings question first, the
model's own answer kept in the conversation, then the report question; "no_cot": the report
question alone) and, with `eval.both_cot_modes`, in the other mode too. Phrase grounding and VQA
ask the sample's own question. A sample that cannot be run (a missing image, a prompt too long)
becomes a row with an `error`; the scorer counts those and never drops them silently.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from m4cxr.config import Experiment
from m4cxr.data.schema import ImageStore, samples_path
from m4cxr.model.checkpoint import load_checkpoint
from m4cxr.ray_cluster import init_ray
from m4cxr.tasks import after_findings, single_turn_report_conversation, task_type

log = logging.getLogger(__name__)

PREDICTION_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("task", pa.string()),
    ("task_type", pa.string()),
    ("dataset", pa.string()),
    ("mode", pa.string()),  # cot | no_cot for report generation, "" otherwise
    ("findings", pa.string()),  # the model's answer to the findings question (cot)
    ("prediction", pa.string()),  # the final answer: the report, the box, the VQA answer
    ("reference", pa.string()),
    ("error", pa.string()),
])


def cot_modes(exp: Experiment) -> list[str]:
    first = "cot" if exp.eval.cot else "no_cot"
    return [first, "no_cot" if exp.eval.cot else "cot"] if exp.eval.both_cot_modes else [first]


def eval_requests(exp: Experiment, corpus_dir: str | Path) -> list[dict[str, Any]]:
    """(row, mode) pairs of the evaluated tasks in the test split, grouped by task."""
    table = pq.read_table(samples_path(corpus_dir, exp.eval.split), columns=["task", "dataset"])
    tasks = np.array(table.column("task").to_pylist())
    datasets = np.array(table.column("dataset").to_pylist())
    requests = []
    for task in exp.eval.tasks:
        chosen = tasks == task
        if task in exp.eval.datasets:
            chosen &= np.isin(datasets, exp.eval.datasets[task])
        rows = np.flatnonzero(chosen)
        if not len(rows):
            named = f" of {exp.eval.datasets[task]}" if task in exp.eval.datasets else ""
            log.warning("eval: no %s samples%s for task %s; it is left out of the tables", exp.eval.split, named, task)
        if exp.eval.samples_per_task:
            rows = rows[:exp.eval.samples_per_task]
        modes = cot_modes(exp) if task_type(task) == "mrg" else [""]
        requests += [{"row": int(r), "mode": m} for m in modes for r in rows]
    return requests


class Predictor:
    """Ray Data actor: one model copy; a batch of (row, mode) requests -> predictions."""

    def __init__(self, checkpoint: str, corpus_dir: str, split: str, max_new_tokens: int, decoding: str,
                 use_gpu: bool, seed: int = 0):
        self.device = "cuda" if use_gpu else "cpu"
        # bf16 on GPU as trained; fp32 on CPU, where batched and one-by-one greedy answers agree
        dtype = torch.bfloat16 if use_gpu else None
        self.model, _ = load_checkpoint(checkpoint, device=self.device, dtype=dtype)
        self.table = pq.read_table(samples_path(corpus_dir, split))
        self.store = ImageStore(corpus_dir)
        self.generation = dict(max_new_tokens=max_new_tokens, do_sample=decoding == "sample", seed=seed)

    def images(self, sample: dict) -> list:
        out = []
        for ref in sample["images"]:
            with self.store.load(ref["image_id"]) as im:
                im.load()
                out.append(im.copy())
        return out

    def generate(self, conversations: list[list[dict]], images: list[list]) -> list[str]:
        return self.model.generate(conversations, images, **self.generation) if conversations else []

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        samples = self.table.take(np.asarray(batch["row"], dtype=np.int64)).to_pylist()
        modes = [str(m) for m in batch["mode"]]
        out = [{"sample_id": s["sample_id"], "task": s["task"], "task_type": s["task_type"], "dataset": s["dataset"],
                "mode": m, "findings": "", "prediction": "", "reference": s["answer"] or "", "error": ""}
               for s, m in zip(samples, modes)]
        ready = []  # (index, conversation, images)
        for i, (s, m) in enumerate(zip(samples, modes)):
            try:
                images = self.images(s)
            except (OSError, KeyError) as err:
                out[i]["error"] = f"{type(err).__name__}: {err}"
                continue
            turns = single_turn_report_conversation(s) if m == "no_cot" else s["turns"]
            ready.append((i, turns, images))
        # one pass for every prompt that ends at its first question; CoT prompts then go on
        first = self.generate([t[:2] for _, t, _ in ready], [im for _, _, im in ready])
        cot = []
        for (i, turns, images), answer in zip(ready, first):
            if modes[i] == "cot":
                out[i]["findings"] = answer
                cot.append((i, after_findings(turns[:2], answer, turns[3:4]), images))
            else:
                out[i]["prediction"] = answer
        for (i, _, _), report in zip(cot, self.generate([c for _, c, _ in cot], [im for _, _, im in cot])):
            out[i]["prediction"] = report
        return pa.Table.from_pylist(out, schema=PREDICTION_SCHEMA)


def run_inference(exp: Experiment, checkpoint: str | Path, corpus_dir: str | Path, out: str | Path) -> pa.Table:
    """Predictions for the evaluated test samples, written to `out` (Parquet) and returned."""
    init_ray()
    requests = eval_requests(exp, corpus_dir)
    if not requests:
        raise ValueError(f"nothing to evaluate: no samples of tasks {exp.eval.tasks} in the "
                         f"{exp.eval.split} split of {corpus_dir}")
    args = dict(checkpoint=str(Path(checkpoint).resolve()), corpus_dir=str(Path(corpus_dir).resolve()),
                split=exp.eval.split, max_new_tokens=exp.eval.max_new_tokens, decoding=exp.eval.decoding,
                use_gpu=exp.eval.use_gpu, seed=exp.train.seed)
    ds = ray.data.from_items(requests).map_batches(
        Predictor, fn_constructor_kwargs=args, batch_size=exp.eval.batch_size,
        compute=ray.data.ActorPoolStrategy(size=exp.eval.actors), num_cpus=exp.eval.cpus_per_actor,
        num_gpus=1 if exp.eval.use_gpu else 0,
    )
    table = pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None))).cast(PREDICTION_SCHEMA)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return table
