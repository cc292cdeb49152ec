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
"""

from __future__ import annotations

import importlib
import time
from collections import Counter
from pathlib import Path

import numpy as np

from m4cxr.config import DataConfig, Experiment
from m4cxr.data.schema import ImageStore, write_manifest, write_samples
from m4cxr.data.sources.common import Collector, ImageRef, SourceError
from m4cxr.data.stats import MS_CXR, corpus_stats

# The adapters, in the order they run: MIMIC-CXR first (its index serves the MIMIC-derived
# datasets), MS-CXR before the datasets it must be kept out of.
SOURCES = ("mimic_cxr", "ms_cxr", "imagenome", "mimic_cxr_vqa", "mimic_diff_vqa", "radialog", "vindr_cxr",
           "chestx_ray14", "chestx_det10", "jsrt", "siim", "rsna", "covid19_radiography", "covid_qu_ex",
           "qata_cov19", "brax", "chexpert", "slake")


class PrepareContext:
    """What adapters share: the source folders and indexes read once."""

    def __init__(self, sources: dict[str, Path]):
        self.sources = sources
        self._mimic = None
        self._qu_ex_hashes: set[str] | None = None

    def mimic(self, needed_by: str | None = None):
        from m4cxr.data.sources.mimic_cxr import MimicIndex

        if "mimic_cxr" not in self.sources:
            raise SourceError(f"{needed_by} uses MIMIC-CXR images: pass --source mimic_cxr=PATH "
                              "(the MIMIC-CXR-JPG folder)")
        if self._mimic is None:
            self._mimic = MimicIndex(self.sources["mimic_cxr"])
        return self._mimic

    def covid_qu_ex_hashes(self) -> set[str] | None:
        from m4cxr.data.sources.covid_qu_ex import image_hashes

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


def run_adapters(sources: dict[str, Path], config: DataConfig, seed: int = 0,
                 progress: bool = True) -> list[Collector]:
    context = PrepareContext(sources)
    collectors = []
    for name in SOURCES:
        if name not in sources:
            continue
        start = time.time()
        c = Collector(name, sources[name], config, seed, context)
        importlib.import_module(f"m4cxr.data.sources.{name}").read(c)
        collectors.append(c)
        if progress:
            print(f"prepare: {name}: {len(c.samples)} samples, {len(c.images)} images, "
                  f"{len(c.skipped)} skipped, {sum(c.excluded.values())} left out by rules "
                  f"({time.time() - start:.1f}s)", flush=True)
    return collectors


def keep_ms_cxr_out(collectors: list[Collector]) -> None:
    """The paper's rule: MS-CXR images appear in no other dataset's training samples."""
    ms_images = {i["image_id"] for c in collectors if c.dataset == MS_CXR for s in c.samples for i in s.images}
    if not ms_images:
        return
    for c in collectors:
        if c.dataset == MS_CXR:
            continue
        kept = [s for s in c.samples if s.split != "train" or not any(i["image_id"] in ms_images for i in s.images)]
        if len(kept) < len(c.samples):
            c.exclude("training sample with an MS-CXR image", len(c.samples) - len(kept))
            c.samples = kept


def resize_batch(batch: dict[str, np.ndarray], out_dir: str, size: int) -> dict[str, np.ndarray]:
    """Ray Data map_batches: read, resize and store each image; report its size, scale or error."""
    from m4cxr.data.images import read_image, resize_shortest_edge

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


def resize_images(refs: list[ImageRef], out_dir: Path, size: int) -> dict[str, dict]:
    """image_id -> {width, height, scale, error} for every image, resized on Ray Data."""
    import ray

    from m4cxr.ray_cluster import init_ray

    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    if not refs:
        return {}
    init_ray()
    # Ray Data reserves part of the CPUs for each operator; with one map operator that reservation
    # only leaves CPUs idle (on 2 cores it halves the throughput: benchmarks/prepare_images.py).
    # A dataset takes the context as it is when the dataset is made.
    context = ray.data.DataContext.get_current()
    reserved = context.op_resource_reservation_enabled
    context.op_resource_reservation_enabled = False
    try:
        ds = ray.data.from_items([{"image_id": r.image_id, "path": r.path} for r in refs])
        ds = ds.map_batches(resize_batch, fn_kwargs={"out_dir": str(out_dir), "size": size}, batch_size=4)
        return {row["image_id"]: row for row in ds.take_all()}
    finally:
        context.op_resource_reservation_enabled = reserved


def prepare(exp: Experiment, sources: dict[str, Path], out_dir: str | Path, seed: int = 0,
            progress: bool = True) -> dict:
    """Run the adapters of `sources`, store the images and write the corpus; returns the manifest."""
    out = Path(out_dir).resolve()
    start = time.time()
    size = exp.data.image_size
    collectors = run_adapters(sources, exp.data, seed, progress)
    keep_ms_cxr_out(collectors)
    used = {i["image_id"] for c in collectors for s in c.samples for i in s.images}
    refs: dict[str, ImageRef] = {}
    for c in collectors:
        for image_id, ref in c.images.items():
            if image_id in used and image_id not in refs:
                refs[image_id] = ref
    if progress:
        print(f"prepare: resizing {len(refs)} images to a shortest edge of {size} px on Ray Data",
              flush=True)
    resized = resize_images(list(refs.values()), out, size)
    store = ImageStore(out)
    skipped = [item for c in collectors for item in c.skipped]
    for image_id, ref in refs.items():
        row = resized[image_id]
        if row["error"]:
            skipped.append({"dataset": ref.dataset, "record": ref.path, "reason": row["error"]})
            continue
        store.index[image_id] = {"image_id": image_id, "path": f"images/{image_id}.png", "width": int(row["width"]),
                                 "height": int(row["height"]), "view": ref.view, "dataset": ref.dataset,
                                 "patient_id": ref.patient_id, "study_id": ref.study_id, "split": ref.split}
    samples, lost = [], Counter()
    for c in collectors:
        for s in c.samples:
            if not all(i["image_id"] in store.index for i in s.images):
                lost[s.dataset] += 1
                continue
            for box in s.boxes:
                scale = float(resized[s.images[box["image_index"]]["image_id"]]["scale"])
                box["box"] = [v * scale for v in box["box"]]
            samples.append(s)
    store.write_index()
    write_samples(samples, out)
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
        "source": {"kind": "prepare", "sources": {k: str(v) for k, v in sources.items()}, "seed": seed,
                   "image_size": size, "box_convention": exp.data.box_convention},
    })
    from m4cxr.eval.pictures import boxes_preview

    manifest["boxes_preview"] = {"file": "boxes_preview.png",
                                 "datasets": boxes_preview(out, out / "boxes_preview.png")}
    write_manifest(out, manifest)
    if progress:
        print(f"prepare: wrote {len(samples)} samples and {len(store.index)} images to {out_dir} "
              f"in {time.time() - start:.1f}s", flush=True)
    return manifest
