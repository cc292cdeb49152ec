"""The training data path: samples Parquet -> mixture draw -> Ray Data preprocessing -> workers.

    the worker's positions of the mixture stream   worker_positions: from the restored step
    -> (pair, sample row) per position             map_batches(draw_rows): seeded by position
    -> images loaded, resized, normalised;         map_batches(PrepareSamples) on CPU actors
       conversation tokenised, images expanded
    -> read in order in the Train worker that built it (iter_batches, one step's rows at a time)
    -> each optimizer step's rows sorted by length into micro-batches, or packed into rows of
       up to train.max_seq_len tokens with data.packing (step_batches)

Step s of a run trains stream positions [s*G, (s+1)*G) (G the global batch), worker r of W the
r-th slice of them. Each worker builds its own stream from the step of the checkpoint it
restored, so a restarted run trains every position after that checkpoint once, whatever the
number of workers, and nothing is read from state that can run ahead of the checkpoint.

A corrupt image or malformed row becomes a row with an `error` naming the sample; workers count
and report them and stop the run past `data.error_budget`. Nothing is dropped silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import ray
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from m4cxr.config import Experiment
from m4cxr.data.mixture import Mixture, build_mixture
from m4cxr.data.prior_references import without_prior_references
from m4cxr.data.schema import ImageStore, samples_path
from m4cxr.data.stats import pair_counts
from m4cxr.model.inputs import pad_batch
from m4cxr.model.tokenizer import IGNORE, encode_conversation, load_tokenizer
from m4cxr.model.vision import image_array, normalise
from m4cxr.tasks import pretrain_tasks, single_turn_report_conversation

PRETRAIN_TASKS = tuple(pretrain_tasks())  # stage 1 trains on image-report pairs without instructions


# ----------------------------------------------------------------------------- the draw


def stage_mixture(exp: Experiment, stage: str, corpus_dir: str | Path) -> Mixture:
    """The mixture of a stage over the pairs that have training samples in the corpus; stage 1
    keeps the report-generation pairs with their empirical weights."""
    if stage == "pretrain":
        return build_mixture(exp.data.mixture, pair_counts(corpus_dir, "train"), strategy="empirical",
                             source=exp.source, tasks=PRETRAIN_TASKS)
    return build_mixture(exp.data.mixture, pair_counts(corpus_dir, "train"), source=exp.source)


def pair_rows(corpus_dir: str | Path, mixture: Mixture, split: str = "train") -> list[np.ndarray]:
    """For each pair of the mixture, the row numbers of its samples in samples/<split>.parquet."""
    table = pq.read_table(samples_path(corpus_dir, split), columns=["task", "dataset"])
    keys = np.array([f"{t}/{d}" for t, d in zip(table.column("task").to_pylist(), table.column("dataset").to_pylist())])
    return [np.flatnonzero(keys == p.key) for p in mixture.pairs]


def worker_positions(first_step: int, last_step: int, global_batch: int, rank: int, world: int) -> np.ndarray:
    """The stream positions worker `rank` of `world` trains in steps first_step+1 .. last_step."""
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} is not a multiple of {world} workers")
    per_worker = global_batch // world
    steps = np.arange(first_step, last_step, dtype=np.int64)[:, None]
    return (steps * global_batch + rank * per_worker + np.arange(per_worker, dtype=np.int64)[None, :]).reshape(-1)


def draw_rows(batch: dict[str, np.ndarray], mixture: Mixture, rows_by_pair: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Chunks of stream positions -> one row per position with its sample row; the same position
    always draws the same sample."""
    positions = np.concatenate([np.asarray(c, dtype=np.int64) for c in batch["positions"]] or [np.zeros(0, np.int64)])
    pair_idx, within = mixture.draw_at(positions)
    rows = np.array([rows_by_pair[p][int(u * len(rows_by_pair[p]))] for p, u in zip(pair_idx, within)], dtype=np.int64)
    return {"position": positions, "row": rows}


# ----------------------------------------------------------------------------- preprocessing


class PrepareSamples:
    """Ray Data actor: sample rows -> token ids, labels and normalised pixels (or an error)."""

    def __init__(self, corpus_dir: str, split: str, tokenizer_dir: str, image_size: int, image_mean: list,
                 image_std: list, box_convention: str, tokens_per_image: int, max_seq_len: int, stage: str,
                 mrg_format: str = "cot", prior_references: str = "keep"):

        self.table = pq.read_table(samples_path(corpus_dir, split))
        self.store = ImageStore(corpus_dir)
        self.tokenizer = load_tokenizer(tokenizer_dir)  # with the <image> token added where missing
        self.image_size, self.box_convention = image_size, box_convention
        self.tokens_per_image = tokens_per_image
        self.max_seq_len = max_seq_len
        self.stage = stage
        self.mrg_format = mrg_format
        self.prior_references = prior_references

    def conversation(self, sample: dict, position: int) -> tuple[list[dict], list[str]]:
        image_ids = [i["image_id"] for i in sample["images"]]
        if self.prior_references == "remove":
            sample = without_prior_references(sample)
        if self.stage == "pretrain":  # image-report pairs, no instructions (stage 1)
            if not sample["report"]:
                raise ValueError("stage 1 needs a report")
            return [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": sample["report"]}], image_ids[:1]
        turns = sample["turns"]
        if sample["task_type"] != "mrg" or self.mrg_format == "cot":
            return turns, image_ids
        if self.mrg_format == "separate" and position % 2 == 1:
            return turns[:3], image_ids  # the findings question alone, as a classification task
        return single_turn_report_conversation(sample), image_ids

    def prepare(self, sample: dict, position: int = 0) -> dict[str, Any]:
        out = {"sample_id": sample["sample_id"], "task_type": sample["task_type"], "error": ""}
        try:
            turns, image_ids = self.conversation(sample, position)
            placeholders = sum(t["content"].count("<image>") for t in turns if t["role"] == "user")
            if placeholders != len(image_ids):
                raise ValueError(f"{placeholders} <image> placeholders but {len(image_ids)} images")
            pixels = []
            for image_id in image_ids:
                with Image.open(self.store.path(image_id)) as im:
                    pixels.append(image_array(im, self.image_size, self.box_convention))
            ids, labels = encode_conversation(self.tokenizer, turns, self.tokens_per_image)
            if len(ids) > self.max_seq_len:
                raise ValueError(f"{len(ids)} tokens, over train.max_seq_len {self.max_seq_len}")
        except (OSError, ValueError, KeyError) as err:
            out.update(error=f"{type(err).__name__}: {err}", input_ids=b"", labels=b"", pixels=b"", n_images=0)
            return out
        # bytes columns: uint8 pixels (normalised in the worker) and int32 ids move through
        # Arrow without per-element conversion
        out.update(input_ids=np.asarray(ids, np.int32).tobytes(), labels=np.asarray(labels, np.int32).tobytes(),
                   pixels=np.stack(pixels).tobytes(), n_images=len(pixels))
        return out

    def __call__(self, batch: dict[str, np.ndarray]):
        samples = self.table.take(np.asarray(batch["row"], dtype=np.int64)).to_pylist()
        prepared = [self.prepare(s, p) for s, p in zip(samples, batch["position"])]
        # an Arrow table with binary columns: handed on without per-element conversion
        return pa.table({
            "position": pa.array(np.asarray(batch["position"], np.int64)),
            **{key: pa.array([p[key] for p in prepared], type=pa.string()) for key in ("sample_id", "task_type", "error")},
            "n_images": pa.array([p["n_images"] for p in prepared], type=pa.int64()),
            **{key: pa.array([p[key] for p in prepared], type=pa.binary()) for key in ("input_ids", "labels", "pixels")},
        })


def prepare_args(exp: Experiment, corpus_dir: str, split: str, tokenizer_dir: str, tokens_per_image: int,
                 stage: str) -> dict:
    return dict(corpus_dir=str(corpus_dir), split=split, tokenizer_dir=str(tokenizer_dir),
                image_size=exp.data.image_size, image_mean=exp.model.image_mean, image_std=exp.model.image_std,
                box_convention=exp.data.box_convention, tokens_per_image=tokens_per_image,
                max_seq_len=exp.train.max_seq_len, stage=stage, mrg_format=exp.data.mrg_format,
                prior_references=exp.data.prior_references)


def _preprocess(ds, exp: Experiment, args: dict):
    return ds.map_batches(
        PrepareSamples, fn_constructor_kwargs=args, batch_size=32, num_cpus=exp.data.preprocess_cpus,
        compute=ray.data.ActorPoolStrategy(size=exp.data.preprocess_actors),
    )


def train_stream(exp: Experiment, stage: str, corpus_dir: str, tokenizer_dir: str, tokens_per_image: int,
                 positions: np.ndarray):
    """The training samples at the given mixture positions as a Ray Dataset (read it with
    preserve_order on, as the Train worker does, to get them in stream order)."""
    mixture = stage_mixture(exp, stage, corpus_dir)
    rows_by_pair = pair_rows(corpus_dir, mixture)
    positions = np.asarray(positions, dtype=np.int64)
    chunks = max(1, min(500, len(positions) // 1024))  # few, large draw tasks: each task costs scheduling time
    # the positions as in-memory rows, one chunk each: from_items starts no task (from_numpy's
    # 1-CPU tasks would wait forever where the Train workers hold all but a fraction of a CPU)
    ds = ray.data.from_items([{"positions": c} for c in np.array_split(positions, chunks)], override_num_blocks=chunks)
    ds = ds.map_batches(draw_rows, fn_kwargs={"mixture": mixture, "rows_by_pair": rows_by_pair},
                        batch_size=None, num_cpus=0.1)
    return _preprocess(ds, exp, prepare_args(exp, corpus_dir, "train", tokenizer_dir, tokens_per_image, stage))


def validation_rows(corpus_dir: str | Path, count: int, stage: str, split: str = "validate") -> np.ndarray:
    """A fixed validation set: `count` rows taken round-robin over the tasks (stage 1: reports)."""
    table = pq.read_table(samples_path(corpus_dir, split), columns=["task"])
    tasks = np.array(table.column("task").to_pylist())
    if stage == "pretrain":
        return np.flatnonzero(np.isin(tasks, PRETRAIN_TASKS))[:count]
    by_task = [np.flatnonzero(tasks == t) for t in sorted(set(tasks))]
    picked: list[int] = []
    for i in range(max((len(r) for r in by_task), default=0)):
        for r in by_task:
            if i < len(r) and len(picked) < count:
                picked.append(int(r[i]))
    return np.array(sorted(picked), dtype=np.int64)


def validation_set(exp: Experiment, stage: str, corpus_dir: str, tokenizer_dir: str, tokens_per_image: int):
    rows = validation_rows(corpus_dir, exp.train.val_samples, stage)
    ds = ray.data.from_items([{"position": -1, "row": int(r)} for r in rows])
    return _preprocess(ds, exp, prepare_args(exp, corpus_dir, "validate", tokenizer_dir, tokens_per_image, stage))


# ----------------------------------------------------------------------------- in the worker


def step_batches(rows: dict[str, np.ndarray], micro_batch: int, pad_id: int, image_size: int,
                 image_mean: list, image_std: list, group_by_length: bool = True,
                 pack_to: int = 0) -> tuple[list[dict], dict]:
    """One optimizer step's rows -> micro-batches, and counts: real and padded tokens, errors with
    their sample ids. Without pack_to: `micro_batch` samples each, padded (sorted by length when
    grouping). With pack_to: the samples packed into rows of up to pack_to tokens, `micro_batch`
    rows each (pack_micro_batches, packed_batch)."""

    ok = [i for i, e in enumerate(rows["error"]) if not e]
    errors = [f"{rows['sample_id'][i]}: {rows['error'][i]}" for i, e in enumerate(rows["error"]) if e]
    ids_of = {i: np.frombuffer(rows["input_ids"][i], np.int32) for i in ok}
    labels_of = {i: np.frombuffer(rows["labels"][i], np.int32) for i in ok}
    gray_of = {i: np.frombuffer(rows["pixels"][i], np.uint8).reshape(-1, image_size, image_size) for i in ok}
    if pack_to:
        groups = [[[ok[j] for j in row] for row in group]
                  for group in pack_micro_batches([len(ids_of[i]) for i in ok], pack_to, micro_batch)]
    else:
        if group_by_length:
            ok.sort(key=lambda i: len(ids_of[i]))
        groups = [ok[at:at + micro_batch] for at in range(0, len(ok), micro_batch)]
    batches, real, padded = [], 0, 0
    for group in groups:
        if pack_to:
            batch = packed_batch([[(ids_of[i], labels_of[i]) for i in row] for row in group], pad_id)
            idx = [i for row in group for i in row]  # sample order: row by row, left to right
        else:
            idx = group
            batch = pad_batch([ids_of[i].tolist() for i in idx], [labels_of[i].tolist() for i in idx], pad_id)
        # images in the order of their tokens, row-major: what M4CXR.embed expects
        gray = np.concatenate([gray_of[i] for i in idx]) if idx else np.zeros((0, image_size, image_size), np.uint8)
        batch["pixel_values"] = normalise(torch.from_numpy(gray.copy()), image_mean, image_std) if len(gray) else None
        batch["task_type"] = [rows["task_type"][i] for i in idx]
        batch["sample_id"] = [rows["sample_id"][i] for i in idx]
        real += sum(len(ids_of[i]) for i in idx)
        padded += batch["input_ids"].numel()
        batches.append(batch)
    return batches, {"tokens": real, "padded_tokens": padded, "errors": errors, "rows": len(rows["error"])}


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the indices of `lengths`, longest first, each into the first row with
    room for it. Rows come longest first, so micro-batches of consecutive rows pad little."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties in stream order
        if lengths[i] > capacity:
            raise ValueError(f"a sample of {lengths[i]} tokens does not fit a packed row of {capacity}")
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    order = sorted(range(len(rows)), key=lambda r: room[r])
    return [rows[r] for r in order]


def balance_rows(lengths: list[int], n_rows: int, capacity: int) -> list[list[int]] | None:
    """The indices of `lengths` in at most n_rows rows, as even as first-fit decreasing gets them:
    at the narrowest width up to `capacity` at which they fit (None if none)."""
    lo, hi, best = max(max(lengths), -(-sum(lengths) // n_rows)), capacity, None
    while lo <= hi:
        width = (lo + hi) // 2
        rows = pack_rows(lengths, width)
        if len(rows) <= n_rows:
            best, hi = rows, width - 1
        else:
            lo = width + 1
    return best


def pack_micro_batches(lengths: list[int], capacity: int, rows_per_micro: int) -> list[list[list[int]]]:
    """A step's samples (their lengths) -> micro-batches of packed rows of up to `capacity`
    tokens: first-fit decreasing over the step, then each micro-batch's samples spread evenly
    over its rows, since a micro-batch pads its rows to the longest one."""
    rows = pack_rows(lengths, capacity)
    batches = []
    for at in range(0, len(rows), rows_per_micro):
        group = rows[at:at + rows_per_micro]
        members = [i for row in group for i in row]
        even = balance_rows([lengths[i] for i in members], len(group), capacity)
        batches.append([[members[j] for j in row] for row in even] if even else group)
    return batches


def packed_batch(rows: list[list[tuple[np.ndarray, np.ndarray]]], pad_id: int) -> dict:
    """Packed rows of (input_ids, labels) samples -> a micro-batch: position_ids restart at 0 for
    every sample and for a row's padding (so no attention mask: M4CXR.forward), sample_index
    gives each position's sample (in row-major order; -1 on padding) to attribute its loss."""
    width = max(sum(len(ids) for ids, _ in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    sample_index = torch.full((len(rows), width), -1, dtype=torch.long)
    k = 0
    for r, row in enumerate(rows):
        at = 0
        for ids, lab in row:
            n = len(ids)
            input_ids[r, at:at + n] = torch.from_numpy(ids.astype(np.int64))
            # a sample's first label is never a target: the previous sample's last token must
            # not learn to predict it (encode_conversation masks the BOS anyway)
            labels[r, at + 1:at + n] = torch.from_numpy(lab[1:].astype(np.int64))
            position_ids[r, at:at + n] = torch.arange(n)
            sample_index[r, at:at + n] = k
            at += n
            k += 1
        position_ids[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "attention_mask": None, "position_ids": position_ids, "labels": labels,
            "sample_index": sample_index}
