"""Memory and time of `m4cxr data prepare` against the number of MIMIC-CXR studies.

MIMIC-CXR-JPG folders of several sizes (tests/dataset_fixtures.py `mimic_cxr_at_scale`, tiny
images, so that the figures are the driver's bookkeeping and not the pixels) are prepared, each
by a fresh `m4cxr data prepare` process. Measured per run: the peak resident memory of that
process (the Ray driver, getrusage RUSAGE_SELF; Ray's own processes are not counted), its time
and the samples written. The slope between the smallest and the largest size, in KiB per study,
is extrapolated to MIMIC-CXR's 227,835 studies (the largest size keeps the slope clear of the
few MiB by which one process's peak varies from run to run).

    flock /tmp/m4cxr-ray.lock python benchmarks/prepare_scale.py [--studies 1500 6000 24000] \
        [--compare-with /tmp/prepare_old/platform]

`--compare-with` runs the same measurement on another checkout's platform/ folder (e.g. the
committed version, `git worktree add /tmp/prepare_old HEAD`) for a before / after table.
Writes benchmarks/results/prepare_scale.json and prints a Markdown table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIMIC_STUDIES = 227_835
IMAGE_SIZE = 8  # shortest edge of the stored images

# Runs in the measured process: prepare through the command line, then its own peak memory.
CHILD = """
import json, resource, sys, time
from m4cxr.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
print("RESULT " + json.dumps({"code": code, "seconds": time.perf_counter() - start,
                              "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def run_prepare(platform_dir: Path, source: Path, out: Path) -> dict:
    config = platform_dir.parent / "experiments" / "quickstart.yaml"
    args = ["data", "prepare", "--config", str(config), "--set", f"data.image_size={IMAGE_SIZE}", "--out", str(out),
            "--source", f"mimic_cxr={source}"]
    env = {**os.environ, "PYTHONPATH": str(platform_dir), "RAY_DEDUP_LOGS": "0"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True,
                          cwd=platform_dir.parent)
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"prepare on {source} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    manifest = json.loads((out / "manifest.json").read_text())
    files = sorted((out / "samples").glob("*.parquet"))
    import pyarrow.parquet as pq

    return {"peak_mib": result["peak_kib"] / 1024, "wall_s": wall, "prepare_s": result["seconds"],
            "samples": manifest["samples"], "images": manifest["images"],
            "row_groups": {f.stem: pq.ParquetFile(f).num_row_groups for f in files},
            "progress": [line for line in proc.stdout.splitlines() if line.startswith("prepare:")]}


def measure(platform_dir: Path, sources: dict[int, Path], tmp: Path, label: str) -> dict:
    runs = {}
    for studies, source in sources.items():
        print(f"{label}: preparing {studies} studies", flush=True)
        runs[studies] = run_prepare(platform_dir, source, tmp / f"{label}-{studies}")
        print(f"{label}: {studies} studies: {runs[studies]['peak_mib']:.0f} MiB, {runs[studies]['wall_s']:.1f}s, "
              f"{runs[studies]['samples']} samples", flush=True)
    small, large = min(runs), max(runs)
    slope_kib = (runs[large]["peak_mib"] - runs[small]["peak_mib"]) * 1024 / (large - small)
    time_per_study = (runs[large]["prepare_s"] - runs[small]["prepare_s"]) / (large - small)
    return {"platform": str(platform_dir), "runs": {str(k): v for k, v in runs.items()},
            "slope_kib_per_study": slope_kib,
            "extrapolated_extra_gib_at_mimic": slope_kib * (MIMIC_STUDIES - large) / 1024 ** 2,
            "extrapolated_peak_gib_at_mimic": (runs[large]["peak_mib"] * 1024 + slope_kib * (MIMIC_STUDIES - large))
            / 1024 ** 2,
            "seconds_per_1000_studies": time_per_study * 1000,
            "time_ratio": runs[large]["prepare_s"] / runs[small]["prepare_s"]}


def table(results: dict, sizes: list[int]) -> str:
    lines = ["| code | " + " | ".join(f"peak at {n:,} studies" for n in sizes) + f" | slope {sizes[0]:,} -> {sizes[-1]:,}"
             f" | at {MIMIC_STUDIES:,} studies (extrapolated) | prepare time at " + " / ".join(f"{n:,}" for n in sizes)
             + " |", "|---" * (len(sizes) + 4) + "|"]
    for label, r in results.items():
        runs = [r["runs"][str(n)] for n in sizes]
        lines.append(f"| {label} | " + " | ".join(f"{run['peak_mib']:.0f} MiB" for run in runs) +
                     f" | {r['slope_kib_per_study']:.2f} KiB/study | {r['extrapolated_peak_gib_at_mimic']:.2f} GiB | "
                     + " / ".join(f"{run['prepare_s']:.1f}s" for run in runs) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, nargs="+", default=[1500, 6000, 24000])
    parser.add_argument("--compare-with", type=Path, help="another checkout's platform/ folder, measured first")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from dataset_fixtures import mimic_cxr_at_scale

    sizes = sorted(set(args.studies))
    if len(sizes) < 2:
        parser.error("--studies: at least two sizes")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = {n: mimic_cxr_at_scale(tmp / f"mimic-{n}", n) for n in sizes}
        results = {}
        if args.compare_with:
            results["before"] = measure(args.compare_with.resolve(), sources, tmp, "before")
        results["after" if args.compare_with else "this checkout"] = measure(ROOT / "platform", sources, tmp, "after")
    import ray

    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                         f"Ray {ray.__version__}",
              "date": time.strftime("%Y-%m-%d"), "studies": sizes, "image_size": IMAGE_SIZE,
              "mimic_cxr_studies": MIMIC_STUDIES, "results": results}
    out = ROOT / "benchmarks" / "results" / "prepare_scale.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: {m: v for m, v in r.items() if m != "runs"} for k, r in results.items()}, indent=2))
    print("\n" + table(results, sizes))


if __name__ == "__main__":
    main()
