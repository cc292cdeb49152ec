"""The main job: the whole platform on the synthetic world, on a laptop CPU.

synthetic world -> tokenizer -> stage 1 (projector) -> stage 2 (instruction tuning) -> evaluation
on the test split -> a 4-trial sweep from the stage-2 model -> summary.json. Serving adds its
section to the same file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from m4cxr.config import load_experiment
from m4cxr.data.synthetic import synthesize
from m4cxr.eval.run import eval_summary, evaluate
from m4cxr.sweep.run import run_sweep
from m4cxr.train.run import prepare_tokenizer, run_stage


def run_quickstart(out: str | Path, config: str | Path = "experiments/quickstart.yaml", overrides=(),
                   sweep_config: str | Path = "experiments/sweeps/quickstart.yaml") -> dict:
    out = Path(out).resolve()
    places = [f"data.corpus_dir={out / 'corpus'}", f"train.output_dir={out / 'train'}", f"tune.output_dir={out / 'sweeps'}"]
    exp = load_experiment(config, [*places, *overrides])
    started = time.time()
    summary: dict = {"experiment": str(config), "out": str(out)}

    print(f"quickstart 1/6: synthetic world ({exp.data.synthetic.patients} patients) -> {exp.data.corpus_dir}")
    manifest = synthesize(exp.data.corpus_dir, exp.data.synthetic, exp.data.box_convention, exp.data.system_prompt)
    summary["data"] = {"corpus": exp.data.corpus_dir, "samples": manifest["samples"], "images": manifest["images"],
                       "patients": manifest["patients"], "leakage": manifest["leakage"]["patients_in_several_splits"]}

    print("quickstart 2/6: tokenizer")
    prepare_tokenizer(exp, exp.data.corpus_dir)

    print(f"quickstart 3/6: stage 1, projector pre-training ({exp.train.pretrain.training_steps} steps)")
    stage1 = run_stage(exp, "pretrain", exp.data.corpus_dir)
    print(f"quickstart 4/6: stage 2, instruction tuning ({exp.train.instruction.training_steps} steps)")
    stage2 = run_stage(exp, "instruction", exp.data.corpus_dir, init_checkpoint=stage1["checkpoint"])
    summary["train"] = {
        "val_loss_first": stage2["val_loss_first"], "val_loss_last": stage2["val_loss_last"],
        "steps": stage2["steps"], "nonpad_token_share": stage2["nonpad_token_share"],
        "checkpoint": stage2["checkpoint"], "skipped_samples": stage2["skipped_samples"],
        "seconds": round(stage1["seconds"] + stage2["seconds"], 1), "pretrain": stage1,
    }
    print("quickstart 5/6: evaluation on the test split (Ray Data batch inference)")
    results = evaluate(exp, stage2["checkpoint"], out / "eval")
    summary["eval"] = {**eval_summary(results, exp), "report": results["files"]["report"],
                       "seconds": results["seconds"]}
    sweep_exp = load_experiment(sweep_config, [*places, f"tune.init_checkpoint={stage2['checkpoint']}", *overrides])
    print(f"quickstart 6/6: sweep, {sweep_exp.tune.num_trials} trials (Ray Tune + Optuna)")
    sweep = run_sweep(sweep_exp, name="quickstart-sweep")
    summary["sweep"] = {k: sweep.get(k) for k in ("trials", "completed", "pareto_size", "best_experiment", "plot",
                                                   "best_params", "best_objectives", "seconds")}
    summary["seconds"] = round(time.time() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    t = summary["train"]
    print(f"\nquickstart done in {summary['seconds']:.0f}s -> {out / 'summary.json'}\n"
          f"  data: {summary['data']['samples']} samples, {summary['data']['images']} images, leakage {summary['data']['leakage']}\n"
          f"  stage 1: val loss {stage1['val_loss_first']:.3f} -> {stage1['val_loss_last']:.3f} in {stage1['steps']} steps\n"
          f"  stage 2: val loss {t['val_loss_first']:.3f} -> {t['val_loss_last']:.3f} in {t['steps']} steps, "
          f"non-padding tokens {t['nonpad_token_share']:.0%}\n"
          f"  model: {t['checkpoint']}\n"
          f"  eval: {describe_eval(summary['eval'])}\n"
          f"  sweep: {sweep['completed']}/{sweep['trials']} trials, Pareto front of {sweep['pareto_size']}, "
          f"best -> {sweep.get('best_experiment')}")
    return summary


def describe_eval(ev: dict) -> str:
    parts = []
    if "mrg" in ev:
        parts.append(f"report mF1-14 {ev['mrg']['mF1-14']:.3f} (baseline {ev['mrg']['baseline_mF1-14']:.3f})")
    if "grounding" in ev:
        parts.append(f"grounding mIoU {ev['grounding']['mIoU']:.3f} (baseline {ev['grounding']['baseline_mIoU']:.3f})")
    if "vqa" in ev:
        parts.append(f"VQA accuracy {ev['vqa']['accuracy']:.3f} (baseline {ev['vqa']['baseline_accuracy']:.3f})")
    return "; ".join(parts) + f"; report page {ev['report']}"
