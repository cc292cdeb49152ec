"""Prepare a training corpus from the public datasets in their official layouts.

    m4cxr data prepare --config experiments/m4cxr.yaml --source mimic_cxr=/data/mimic-cxr-jpg \
        --source ms_cxr=/data/ms-cxr ... --out runs/corpus

1. Each named source's adapter (data/sources/<name>.py) reads its folder and yields samples in the
   common record, with the paper's preprocessing rules.
2. The paper's MS-CXR rule: no training sample of another dataset uses an MS-CXR image.
3. Every image used is resized once (shortest edge to data.image_size) into the image store, in
   parallel on Ray Data; DICOM through pydicom, patient tags never read. Boxes follow the resize.
4. Samples, the image index and manifest.json are written: counts (task -> dataset -> split),
   skipped records with their reasons, records left out by each rule, and the leakage checks;
   boxes_preview.png shows one sample's boxes per dataset on its stored image.

Memory stays flat in the corpus size: the adapters' samples go to a spool file per dataset in
row groups of `chunk_rows` as they are made, and the final samples/<split>.parquet are written
from the spool chunk by chunk (the MS-CXR rule, unreadable images and the boxes' resize applied
on the way). What is held per image is its reference and, after the resize, three numbers.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from PIL import Image

from m4cxr.config import DataConfig, Experiment
from m4cxr.data.boxes_preview import BoxTiles, draw_box_tiles
from m4cxr.data.images import read_image, resize_shortest_edge
from m4cxr.data.prior_references import count_rewrites
from m4cxr.data.schema import IMAGE_INDEX_SCHEMA, SAMPLE_SCHEMA, SPLITS, Sample, samples_path, write_manifest
from m4cxr.data.sources.common import Collector, ImageRef, SourceError
from m4cxr.data.sources.covid_qu_ex import image_hashes
from m4cxr.data.sources.mimic_cxr import MimicIndex
from m4cxr.ray_cluster import init_ray
from m4cxr.data.stats import MS_CXR, corpus_stats

log = logging.getLogger(__name__)

# The adapters, in the order they run: MIMIC-CXR first (its index serves the MIMIC-derived
# datasets), MS-CXR before the datasets it must be kept out of.
SOURCES = ("mimic_cxr", "ms_cxr", "imagenome", "mimic_cxr_vqa", "mimic_diff_vqa", "radialog", "vindr_cxr",
           "chestx_ray14", "chestx_det10", "jsrt", "siim", "rsna", "covid19_radiography", "covid_qu_ex",
           "qata_cov19", "brax", "chexpert", "slake")

CHUNK_ROWS = 4096  # samples (or image index rows) per row group: what is held per file being written
PROGRESS_EVERY = 100_000  # samples between the progress lines of a long adapter


class PrepareContext:
    """What adapters share: the source folders and indexes read once."""

    def __init__(self, sources: dict[str, Path]):
        self.sources = sources
        self._mimic = None
        self._qu_ex_hashes: set[str] | None = None

    def mimic(self, needed_by: str | None = None):
        if "mimic_cxr" not in self.sources:
            raise SourceError(f"{needed_by} uses MIMIC-CXR images: pass --source mimic_cxr=PATH "
                              "(the MIMIC-CXR-JPG folder)")
        if self._mimic is None:
            self._mimic = MimicIndex(self.sources["mimic_cxr"])
        return self._mimic

    def covid_qu_ex_hashes(self) -> set[str] | None:
        if "covid_qu_ex" not in self.sources:
            return None
        if self._qu_ex_hashes is None:
            self._qu_ex_hashes = image_hashes(self.sources["covid_qu_ex"])
        return self._qu_ex_hashes


def parse_sources(items: list[str]) -> dict[str, Path]:
    """["name=path", ...] -> {name: path}, each name known and each folder present."""
    sources = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--source {item!r}: expected NAME=PATH")
        if name not in SOURCES:
            raise ValueError(f"--source {item!r}: unknown dataset {name!r}; the datasets are {', '.join(SOURCES)}")
        if not Path(path).is_dir():
            raise ValueError(f"--source {item!r}: {path} is not a folder")
        sources[name] = Path(path).resolve()  # Ray workers may not share the driver's folder
    if not sources:
        raise ValueError("no --source given")
    return sources


class ChunkedWriter:
    """One Parquet file written a row group at a time: rows or tables are held until
    `chunk_rows` of them are pending, then written out."""

    def __init__(self, path: Path, schema: pa.Schema, chunk_rows: int = CHUNK_ROWS):
        self.path, self.schema, self.chunk_rows = Path(path), schema, max(1, int(chunk_rows))
        self.writer: pq.ParquetWriter | None = None
        self.rows: list[dict] = []
        self.tables: list[pa.Table] = []
        self.pending = 0

    def add_row(self, row: dict) -> None:
        self.rows.append(row)
        self.pending += 1
        if self.pending >= self.chunk_rows:
            self.flush()

    def add_table(self, table: pa.Table) -> None:
        if table.num_rows:
            self.tables.append(table)
            self.pending += table.num_rows
            if self.pending >= self.chunk_rows:
                self.flush()

    def flush(self) -> None:
        if self.rows:
            self.tables.append(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.path, self.schema)
        if self.tables:
            table = pa.concat_tables(self.tables)
            self.writer.write_table(table, row_group_size=self.chunk_rows)
            self.tables = []
            del table
            pa.default_memory_pool().release_unused()
        self.pending = 0

    def close(self) -> None:
        self.flush()  # also writes an empty file when nothing came
        self.writer.close()


def spool_path(spool: Path, dataset: str) -> Path:
    return spool / f"{dataset}.parquet"


def spool_sink(writer: ChunkedWriter, c: Collector, progress: bool):
    """A collector's sink: each sample to the dataset's spool file as it is made."""

    def add(sample: Sample) -> None:
        writer.add_row(sample.to_row())
        if progress and c.added % PROGRESS_EVERY == 0:
            log.info(f"prepare: {c.dataset}: {c.added} samples so far")

    return add


def run_adapters(sources: dict[str, Path], config: DataConfig, seed: int = 0, progress: bool = True,
                 spool: Path | None = None, chunk_rows: int = CHUNK_ROWS) -> list[Collector]:
    """Every named source's adapter, in SOURCES order. Without `spool` the samples stay in each
    collector's `samples`; with it they are written to `spool`/<dataset>.parquet as they are made."""
    context = PrepareContext(sources)
    collectors = []
    for name in SOURCES:
        if name not in sources:
            continue
        start = time.time()
        c = Collector(name, sources[name], config, seed, context)
        writer = None
        if spool is not None:
            writer = ChunkedWriter(spool_path(spool, name), SAMPLE_SCHEMA, chunk_rows)
            c.sink = spool_sink(writer, c, progress)
        importlib.import_module(f"m4cxr.data.sources.{name}").read(c)
        if writer is not None:
            writer.close()
            c.sink = None
            c.sizes = {}  # original sizes only serve the adapter's boxes
        collectors.append(c)
        if progress:
            log.info(f"prepare: {name}: {c.added} samples, {len(c.images)} images, "
                     f"{len(c.skipped)} skipped, {sum(c.excluded.values())} left out by rules "
                     f"({time.time() - start:.1f}s)")
    return collectors


def spooled(spool: Path, dataset: str, chunk_rows: int, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """A dataset's spooled samples, a chunk at a time, in the order they were made."""
    # One decoding thread, and freed memory handed back after each chunk: otherwise the Arrow
    # allocator's per-thread caches keep growing with the number of chunks read.
    with pq.ParquetFile(spool_path(spool, dataset)) as file:
        for batch in file.iter_batches(batch_size=chunk_rows, columns=columns, use_threads=False):
            yield pa.Table.from_batches([batch])
            del batch
            pa.default_memory_pool().release_unused()


def rows_with_images(table: pa.Table, image_ids: pa.Array) -> np.ndarray:
    """Mask of the rows that use one of `image_ids`."""
    found = np.zeros(table.num_rows, dtype=bool)
    if len(image_ids) and table.num_rows:
        images = table.column("images")
        ids = pc.struct_field(pc.list_flatten(images), "image_id")
        hits = pc.is_in(ids, value_set=image_ids).to_numpy(zero_copy_only=False)
        found[pc.list_parent_indices(images).to_numpy(zero_copy_only=False)[hits]] = True
    return found


def ms_cxr_training_mask(table: pa.Table, dataset: str, ms_images: pa.Array) -> np.ndarray:
    """The paper's rule: a training sample of another dataset that uses an MS-CXR image is left out."""
    if dataset == MS_CXR or not len(ms_images):
        return np.zeros(table.num_rows, dtype=bool)
    train = pc.equal(table.column("split"), "train").to_numpy(zero_copy_only=False)
    return train & rows_with_images(table, ms_images)


def apply_ms_cxr_rule(collectors: list[Collector], spool: Path, chunk_rows: int) -> tuple[pa.Array, set[str]]:
    """Count the samples the MS-CXR rule leaves out; returns the MS-CXR image ids and the ids of
    the images that the remaining samples use."""
    ms_images: set[str] = set()
    if any(c.dataset == MS_CXR for c in collectors):
        for table in spooled(spool, MS_CXR, chunk_rows, ["images"]):
            ms_images.update(pc.unique(pc.struct_field(pc.list_flatten(table.column("images")), "image_id")).to_pylist())
    ms_array = pa.array(sorted(ms_images), type=pa.string())
    used: set[str] = set()
    for c in collectors:
        left_out = 0
        for table in spooled(spool, c.dataset, chunk_rows, ["split", "images"]):
            dropped = ms_cxr_training_mask(table, c.dataset, ms_array)
            left_out += int(dropped.sum())
            kept = table.filter(pa.array(~dropped)) if dropped.any() else table
            used.update(pc.unique(pc.struct_field(pc.list_flatten(kept.column("images")), "image_id")).to_pylist())
        if left_out:
            c.exclude("training sample with an MS-CXR image", left_out)
    return ms_array, used


def resize_batch(batch: dict[str, np.ndarray], out_dir: str, size: int) -> dict[str, np.ndarray]:
    """Ray Data map_batches: read, resize and store each image; report its size, scale or error."""
    widths, heights, scales, errors = [], [], [], []
    for image_id, path in zip(batch["image_id"], batch["path"]):
        try:
            stored, scale = resize_shortest_edge(read_image(path), size)
            stored.save(Path(out_dir) / "images" / f"{image_id}.png", compress_level=1)
            widths.append(stored.width), heights.append(stored.height), scales.append(scale), errors.append("")
        except ValueError as err:
            widths.append(0), heights.append(0), scales.append(0.0), errors.append(str(err))
    return {"image_id": batch["image_id"], "width": np.array(widths), "height": np.array(heights),
            "scale": np.array(scales), "error": np.array(errors, dtype=object)}


def resized_batches(refs: list[ImageRef], out_dir: Path, size: int) -> Iterator[dict[str, np.ndarray]]:
    """resize_batch's results for every image of `refs`, resized on Ray Data, a block at a time
    (in no particular order)."""
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    if not refs:
        return
    init_ray()
    # Ray Data reserves part of the CPUs for each operator; with one map operator that reservation
    # only leaves CPUs idle (on 2 cores it halves the throughput: benchmarks/prepare_images.py).
    # A dataset takes the context as it is when the dataset is made.
    context = ray.data.DataContext.get_current()
    reserved = context.op_resource_reservation_enabled
    context.op_resource_reservation_enabled = False
    try:
        # Arrow blocks, as many as from_items would make, without a dict per image in the driver.
        blocks = min(len(refs), context.read_op_min_num_blocks)
        bounds = np.linspace(0, len(refs), blocks + 1).astype(int)
        ds = ray.data.from_arrow([pa.table({"image_id": [r.image_id for r in refs[a:b]],
                                            "path": [r.path for r in refs[a:b]]})
                                  for a, b in zip(bounds[:-1], bounds[1:])])
        ds = ds.map_batches(resize_batch, fn_kwargs={"out_dir": str(out_dir), "size": size}, batch_size=4)
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    finally:
        context.op_resource_reservation_enabled = reserved


class Resized:
    """Every stored image's size and scale by its position in the image list, and the errors of
    those that could not be read (numbers, not a dict per image)."""

    def __init__(self, refs: list[ImageRef], out_dir: Path, size: int):
        self.position = {r.image_id: n for n, r in enumerate(refs)}
        self.width = np.zeros(len(refs), dtype=np.int64)
        self.height = np.zeros(len(refs), dtype=np.int64)
        self.scale = np.zeros(len(refs), dtype=np.float64)
        self.errors: dict[str, str] = {}
        for batch in resized_batches(refs, out_dir, size):
            at = np.array([self.position[i] for i in batch["image_id"]], dtype=np.int64)
            self.width[at], self.height[at], self.scale[at] = batch["width"], batch["height"], batch["scale"]
            self.errors.update((i, e) for i, e in zip(batch["image_id"], batch["error"]) if e)

    def stored(self, image_id: str) -> bool:
        return image_id in self.position and image_id not in self.errors


def write_image_index(refs: list[ImageRef], resized: Resized, out: Path, chunk_rows: int) -> None:
    """images.parquet: every stored image in the order of `refs`."""
    writer = ChunkedWriter(out / "images.parquet", IMAGE_INDEX_SCHEMA, chunk_rows)
    for n, ref in enumerate(refs):
        if ref.image_id in resized.errors:
            continue
        writer.add_row({"image_id": ref.image_id, "path": f"images/{ref.image_id}.png", "width": int(resized.width[n]),
                        "height": int(resized.height[n]), "view": ref.view, "dataset": ref.dataset,
                        "patient_id": ref.patient_id, "study_id": ref.study_id, "split": ref.split})
    writer.close()


def scale_boxes(table: pa.Table, resized: Resized) -> pa.Table:
    """The boxes in pixels of the stored images: each scaled as its image was."""
    if not pc.sum(pc.list_value_length(table.column("boxes")).fill_null(0)).as_py():
        return table
    images = table.column("images").to_pylist()
    boxes = table.column("boxes").to_pylist()
    for sample_images, sample_boxes in zip(images, boxes):
        for box in sample_boxes or ():
            scale = float(resized.scale[resized.position[sample_images[box["image_index"]]["image_id"]]])
            box["box"] = [v * scale for v in box["box"]]
    column = SAMPLE_SCHEMA.names.index("boxes")
    return table.set_column(column, SAMPLE_SCHEMA.field("boxes"), pa.array(boxes, type=SAMPLE_SCHEMA.field("boxes").type))


def draw_boxes_preview(out: Path, by_split: dict[str, BoxTiles]) -> list[str]:
    """boxes_preview.png from the samples chosen while writing (split by split, in the order of
    the samples files' names, as data/boxes_preview.boxes_preview would choose from the corpus),
    its images opened from the store by their path, without reading the whole image index."""
    tiles = BoxTiles()
    for split in sorted(by_split):
        tiles.merge(by_split[split])
    return draw_box_tiles(tiles, lambda image_id: Image.open(out / "images" / f"{image_id}.png"),
                          out / "boxes_preview.png")


def write_corpus_samples(collectors: list[Collector], spool: Path, out: Path, ms_images: pa.Array,
                         unavailable: pa.Array, resized: Resized, chunk_rows: int,
                         preview: dict[str, BoxTiles]) -> tuple[int, Counter]:
    """samples/<split>.parquet from the spool, in the adapters' order: the MS-CXR rule applied,
    samples using an image in `unavailable` (not stored) left out and counted per dataset, boxes
    scaled. Returns the samples written and the samples lost."""
    samples_path(out).mkdir(parents=True, exist_ok=True)
    writers: dict[str, ChunkedWriter] = {}
    lost: Counter = Counter()
    written = 0
    try:
        for c in collectors:
            for table in spooled(spool, c.dataset, chunk_rows):
                dropped = ms_cxr_training_mask(table, c.dataset, ms_images)
                missing = ~dropped & rows_with_images(table, unavailable)
                if missing.any():
                    lost[c.dataset] += int(missing.sum())
                if dropped.any() or missing.any():
                    table = table.filter(pa.array(~(dropped | missing)))
                table = scale_boxes(table, resized)
                for split in pc.unique(table.column("split")).to_pylist():
                    part = table.filter(pc.equal(table.column("split"), split))
                    if split not in SPLITS:
                        raise ValueError(f"sample {part.column('sample_id')[0].as_py()}: split {split!r} "
                                         f"is not one of {SPLITS}")
                    if split not in writers:
                        writers[split] = ChunkedWriter(samples_path(out, split), SAMPLE_SCHEMA, chunk_rows)
                    writers[split].add_table(part)
                    preview.setdefault(split, BoxTiles()).offer(part)
                    written += part.num_rows
    finally:
        for writer in writers.values():
            writer.close()
    return written, lost


def prepare(exp: Experiment, sources: dict[str, Path], out_dir: str | Path, seed: int = 0,
            progress: bool = True, chunk_rows: int = CHUNK_ROWS) -> dict:
    """Run the adapters of `sources`, store the images and write the corpus; returns the manifest.
    `chunk_rows` samples at most are held per file being written (and make one row group)."""
    out = Path(out_dir).resolve()
    start = time.time()
    size = exp.data.image_size
    spool = out / ".prepare-spool"
    shutil.rmtree(spool, ignore_errors=True)
    spool.mkdir(parents=True)
    try:
        collectors = run_adapters(sources, exp.data, seed, progress, spool=spool, chunk_rows=chunk_rows)
        ms_images, used = apply_ms_cxr_rule(collectors, spool, chunk_rows)
        refs: dict[str, ImageRef] = {}
        for c in collectors:
            for image_id, ref in c.images.items():
                if image_id in used and image_id not in refs:
                    refs[image_id] = ref
            c.images = {}  # the references of the images used live on in `refs`
        if progress:
            log.info(f"prepare: resizing {len(refs)} images to a shortest edge of {size} px on Ray Data")
        unregistered = used.difference(refs)  # used by a sample, registered by no adapter: not stored
        del used
        ref_list = list(refs.values())
        del refs
        resized = Resized(ref_list, out, size)
        unavailable = pa.array(sorted(unregistered.union(resized.errors)), type=pa.string())
        skipped = [item for c in collectors for item in c.skipped]
        skipped += [{"dataset": ref.dataset, "record": ref.path, "reason": resized.errors[ref.image_id]}
                    for ref in ref_list if ref.image_id in resized.errors]
        write_image_index(ref_list, resized, out, chunk_rows)
        stored = len(ref_list) - len(resized.errors)
        del ref_list
        preview: dict[str, BoxTiles] = {}
        written, lost = write_corpus_samples(collectors, spool, out, ms_images, unavailable, resized, chunk_rows,
                                             preview)
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    manifest = corpus_stats(out)
    counts: dict = {}
    for pair, by_split in manifest["pairs"].items():
        task, dataset = pair.split("/", 1)
        counts.setdefault(task, {})[dataset] = by_split
    manifest.update({
        "counts": counts,
        "skipped": skipped,
        "samples_lost_to_unreadable_images": dict(lost),
        "excluded": {c.dataset: dict(c.excluded) for c in collectors if c.excluded},
        "notes": {c.dataset: c.notes for c in collectors if c.notes},
        # what data.prior_references=remove changes in the training targets (the corpus keeps them as written)
        "prior_references": {"setting": exp.data.prior_references, **count_rewrites(out, "train")},
        "source": {"kind": "prepare", "sources": {k: str(v) for k, v in sources.items()}, "seed": seed,
                   "image_size": size, "box_convention": exp.data.box_convention},
    })
    manifest["boxes_preview"] = {"file": "boxes_preview.png", "datasets": draw_boxes_preview(out, preview)}
    write_manifest(out, manifest)
    if progress:
        log.info(f"prepare: wrote {written} samples and {stored} images to {out_dir} "
                 f"in {time.time() - start:.1f}s")
    return manifest
