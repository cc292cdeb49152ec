"""Recovery from real worker deaths: consecutive 60-step training runs, each with its Ray Train
worker SIGKILLed twice at random steps; every run must finish by itself with a complete stream
lineage (every position trained once, in order). One run without faults, in the same Ray
instance, is the baseline for the wall time.

    python benchmarks/fault_recovery.py [--runs 20] [--steps 60] [--seed 0]

Writes benchmarks/results/fault_recovery.json and fault_recovery.png (one run's loss by step,
the attempts in colour) and prints a Markdown table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "tests"))  # the fault injector the tests use


def one_run(exp_args: list[str], corpus: Path, out: Path, name: str, kill_steps: list[int], steps: int,
            batch: int) -> dict:
    from faults import Killer, at_step

    from m4cxr.config import load_experiment
    from m4cxr.train.lineage import lineage_problems, read_metrics
    from m4cxr.train.run import run_stage

    exp = load_experiment(ROOT / "experiments/quickstart.yaml", exp_args + [f"train.output_dir={out}"])
    killer = Killer(out / name, [(at_step(k), "RayTrainWorker") for k in kill_steps])
    killer.start()
    started = time.time()
    try:
        summary, error = run_stage(exp, "instruction", corpus, run_name=name), ""
    except Exception as err:  # a failed run is a result here, not a crash of the benchmark
        summary, error = {}, f"{type(err).__name__}: {str(err)[:300]}"
    killer.done.set()
    rows = read_metrics(out / name)
    return {"name": name, "kill_at_steps": kill_steps, "kills": len(killer.killed), "finished": not error,
            "error": error, "lineage_problems": lineage_problems(rows, steps, batch) if rows else ["no rows"],
            "restarts": summary.get("restarts"), "steps_trained_again": summary.get("steps_trained_again"),
            "seconds_lost": summary.get("seconds_lost"), "restart_costs": summary.get("restart_costs"),
            "skipped_samples": summary.get("skipped_samples"), "wall_s": round(time.time() - started, 1)}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from m4cxr.train.lineage import attempts

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k, att in enumerate(attempts(rows)):
        ax.plot([r["step"] for r in att], [r["loss"] for r in att], marker="o", ms=3,
                label=f"attempt {k + 1} (from step {att[0]['resumed_from']})", alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = p.parse_args()

    from m4cxr.config import SyntheticConfig
    from m4cxr.data.synthetic import synthesize
    from m4cxr.ray_cluster import init_ray
    from m4cxr.train.lineage import read_metrics

    tmp = Path(tempfile.mkdtemp())
    corpus = tmp / "corpus"
    synthesize(corpus, SyntheticConfig(patients=200, seed=0, image_size=112), progress=False)
    init_ray(num_cpus=2, log_to_driver=False)
    batch = 8
    exp_args = [f"train.instruction.training_steps={args.steps}", f"train.instruction.max_steps={args.steps}",
                f"train.instruction.global_batch_size={batch}", "train.checkpoint_every=10", "train.log_every=10",
                "train.val_samples=8", "train.max_failures=4"]
    rng = random.Random(args.seed)
    baseline = one_run(exp_args, corpus, tmp / "runs", "baseline", [], args.steps, batch)
    print(f"baseline: {baseline['wall_s']} s, lineage problems {baseline['lineage_problems']}", flush=True)
    runs = []
    for i in range(args.runs):
        kills = sorted(rng.sample(range(2, args.steps), 2))
        run = one_run(exp_args, corpus, tmp / "runs", f"run{i:02d}", kills, args.steps, batch)
        runs.append(run)
        print(f"run {i + 1}/{args.runs}: kills at steps {kills} ({run['kills']} done), finished {run['finished']}, "
              f"lineage problems {len(run['lineage_problems'])}, restarts {run['restarts']}, "
              f"steps trained again {run['steps_trained_again']}, {run['seconds_lost']} s lost, {run['wall_s']} s",
              flush=True)
    good = [r for r in runs if r["finished"] and not r["lineage_problems"] and r["kills"] == 2]
    costs = [c for r in good for c in r["restart_costs"]]
    result = {
        "machine": f"{platform.machine()}, 2 cores (Ray num_cpus=2), {platform.python_version()}",
        "job": f"quickstart model, stage 2, {args.steps} steps x {batch} samples, checkpoint every 10 steps, "
               f"two SIGKILLs of the Train worker per run at random steps (seed {args.seed})",
        "runs": len(runs), "runs_finished_with_complete_lineage": len(good),
        "positions_lost_or_repeated_in_lineage": sum(len(r["lineage_problems"]) for r in runs),
        "restarts": len(costs),
        "steps_trained_again_mean": round(sum(c["steps_trained_again"] for c in costs) / max(1, len(costs)), 2),
        "seconds_lost_per_restart_mean": round(sum(c["seconds_lost"] for c in costs) / max(1, len(costs)), 1),
        "restarts_from_an_earlier_checkpoint_than_the_last_written": sum(
            1 for r in good for c, k in zip(r["restart_costs"], r["kill_at_steps"])
            if c["resumed_from_step"] < (k // 10) * 10),
        "baseline_wall_s": baseline["wall_s"],
        "wall_s_mean": round(sum(r["wall_s"] for r in runs) / max(1, len(runs)), 1),
        "baseline": baseline, "per_run": runs,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fault_recovery.json").write_text(json.dumps(result, indent=2))
    if good:
        plot(read_metrics(tmp / "runs" / good[0]["name"]), out / "fault_recovery.png",
             f"{good[0]['name']}: Train worker SIGKILLed at steps {good[0]['kill_at_steps']}")
    print(f"\n| measure | value |\n|---|---|\n"
          f"| runs finished by themselves with a complete lineage | **{len(good)} / {len(runs)}** |\n"
          f"| stream positions lost or trained twice in a lineage | {result['positions_lost_or_repeated_in_lineage']} |\n"
          f"| restarts | {len(costs)} |\n"
          f"| steps trained again per restart (mean) | {result['steps_trained_again_mean']} |\n"
          f"| restarts from an earlier checkpoint than the last one written | "
          f"{result['restarts_from_an_earlier_checkpoint_than_the_last_written']} |\n"
          f"| seconds lost per restart (mean) | {result['seconds_lost_per_restart_mean']} |\n"
          f"| wall time per run: no faults / two kills (mean) | {baseline['wall_s']} s / {result['wall_s_mean']} s |")


if __name__ == "__main__":
    main()
