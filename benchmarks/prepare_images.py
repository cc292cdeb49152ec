"""Image-store benchmark of `m4cxr data prepare`: full-resolution radiographs (MIMIC-CXR-JPG-sized
JPEGs and VinDr-sized DICOMs) read, resized to the encoder's 518 px and stored, by the Ray Data
path that prepare uses against a plain loop doing the same work, in the same process.

    python benchmarks/prepare_images.py [--jpegs 96] [--dicoms 24]

Writes benchmarks/results/prepare_images.json and prints a Markdown table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "tests"))


def make_images(folder: Path, jpegs: int, dicoms: int) -> list:
    from PIL import Image

    from dataset_fixtures import picture, write_dicom
    from m4cxr.data.sources.common import ImageRef

    refs = []
    for n in range(jpegs):  # MIMIC-CXR-JPG's usual size, quality 95
        path = folder / f"mimic_{n}.jpg"
        Image.fromarray(picture((2544, 3056), seed=n)).save(path, quality=95)
        refs.append(ImageRef(f"mimic_{n}", str(path), "mimic_cxr", "p", "s", "train"))
    for n in range(dicoms):  # a VinDr-sized 12-bit DICOM
        path = write_dicom(folder / f"vindr_{n}.dicom", (2304, 2880), seed=1000 + n)
        refs.append(ImageRef(f"vindr_{n}", str(path), "vindr_cxr", "p", "s", "train"))
    return refs


def loop(refs, out: Path, size: int) -> float:
    from m4cxr.data.prepare import resize_batch

    (out / "images").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for ref in refs:
        resize_batch({"image_id": np.array([ref.image_id]), "path": np.array([ref.path])}, str(out), size)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jpegs", type=int, default=96)
    parser.add_argument("--dicoms", type=int, default=24)
    parser.add_argument("--size", type=int, default=518)
    args = parser.parse_args()

    import ray

    from m4cxr.data.prepare import resize_images

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        refs = make_images(tmp / "src", args.jpegs, args.dicoms)
        from m4cxr.ray_cluster import init_ray
        init_ray(log_to_driver=False)
        warm = resize_images(refs[:8], tmp / "warm", args.size)  # start both workers first
        assert not any(r["error"] for r in warm.values())
        start = time.perf_counter()
        rows = resize_images(refs, tmp / "ray", args.size)
        ray_s = time.perf_counter() - start
        assert not any(r["error"] for r in rows.values()) and len(rows) == len(refs)
        loop_s = loop(refs, tmp / "loop", args.size)
        ray.shutdown()
    n = len(refs)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, Ray {ray.__version__}",
        "date": time.strftime("%Y-%m-%d"), "images": n, "jpegs_2544x3056": args.jpegs,
        "dicoms_2304x2880": args.dicoms, "size": args.size,
        "loop_images_per_s": n / loop_s, "ray_data_images_per_s": n / ray_s, "speedup": loop_s / ray_s,
    }
    out = ROOT / "benchmarks" / "results" / "prepare_images.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"\n| measure | value |\n|---|---|\n| plain loop (read, resize to {args.size} px, store) | "
          f"{result['loop_images_per_s']:.2f} images/s |\n| Ray Data (prepare's path) | "
          f"{result['ray_data_images_per_s']:.2f} images/s |\n| Ray Data vs the loop | **{result['speedup']:.2f}x** |")


if __name__ == "__main__":
    main()
