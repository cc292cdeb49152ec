"""Sweeps: the search space applied to an experiment, the Pareto front, and a real sweep on Ray
Tune + Optuna that is interrupted after its second trial, continued, and whose winning experiment
file trains and evaluates through the normal commands."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from m4cxr.config import ConfigError, load_experiment
from m4cxr.data.mixture import build_mixture, pairs_from_config
from m4cxr.sweep.report import pareto_front
from m4cxr.sweep.run import check_objectives
from m4cxr.sweep.space import apply_params, distributions, pair_param

from conftest import ROOT

SWEEP = ROOT / "experiments/sweeps/quickstart.yaml"


def test_shares_multipliers_and_lora_are_applied():
    exp = load_experiment(SWEEP)
    params = {"share_mrg": 0.6, "share_image_understanding": 0.3, "share_vqa": 0.3,
              pair_param("phrase_grounding/synthetic"): 2.0, "lora_r": 16, "lr": 5e-4}
    trial = apply_params(exp, params)
    pairs = pairs_from_config(trial.data.mixture)
    total = sum(p.weight for p in pairs)
    by_type = {t: sum(p.weight for p in pairs if p.task_type == t) / total for t in ("mrg", "image_understanding", "vqa")}
    assert by_type == pytest.approx({"mrg": 0.5, "image_understanding": 0.25, "vqa": 0.25}, abs=1e-4)
    weights = {p.key: p.weight for p in pairs}
    base = {p.key: p.weight for p in pairs_from_config(exp.data.mixture)}
    # within a task type, the multiplied pair doubles relative to its neighbours
    ratio = weights["phrase_grounding/synthetic"] / weights["finding_grounding/synthetic"]
    assert ratio == pytest.approx(2 * base["phrase_grounding/synthetic"] / base["finding_grounding/synthetic"], rel=1e-3)
    assert trial.model.lora.r == 16 and trial.train.instruction.lr == 5e-4
    assert exp.model.lora.r == 8  # the base experiment is left as it was
    mixture = build_mixture(trial.data.mixture, {p.key: 10 for p in pairs})
    assert sum(mixture.probabilities) == pytest.approx(1.0)


def test_bad_spaces_and_objectives_are_named():
    exp = load_experiment(SWEEP, ["tune.space.lr=[0.1, 0.01]"])
    with pytest.raises(ValueError, match=r"tune.space.lr must be a range"):
        distributions(exp.tune.space)
    with pytest.raises(ConfigError, match="did you mean 'tune.space.lora_r'"):
        load_experiment(SWEEP, ["tune.space.lora_rank=[4]"])
    with pytest.raises(ValueError, match="objective 'mrg_f1' is not known"):
        check_objectives(load_experiment(SWEEP, ["tune.objectives={mrg_f1: max}"]))


def test_pareto_front():
    rows = [{"status": "completed", "a": 0.5, "b": 0.5}, {"status": "completed", "a": 0.6, "b": 0.1},
            {"status": "completed", "a": 0.4, "b": 0.4}, {"status": "stopped early", "a": None, "b": None},
            {"status": "completed", "a": 0.1, "b": 0.9}]
    assert pareto_front(rows, {"a": "max", "b": "max"}) == [0, 1, 4]
    assert pareto_front(rows, {"a": "min", "b": "max"}) == [4]


def completed_trials(sweep_dir):
    done = 0
    for result in sweep_dir.glob("trial_*/result.json"):
        lines = result.read_text().splitlines()
        done += any("mrg_mF1-14" in line for line in lines)
    return done


def test_interrupted_sweep_continues_and_its_winner_trains(synthetic_corpus, tmp_path):
    corpus, _ = synthetic_corpus
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ""}
    settings = ["--set", f"data.corpus_dir={corpus}", "--set", f"tune.output_dir={tmp_path / 'sweeps'}",
                "--set", f"train.output_dir={tmp_path / 'train'}", "--set", "tune.init_checkpoint=",
                "--set", "tune.trial_steps=4", "--set", "tune.eval_every=2", "--set", "tune.eval_samples_per_task=4",
                "--set", "eval.max_new_tokens=12", "--set", "train.val_samples=8"]
    command = [sys.executable, "-m", "m4cxr.cli", "sweep", "--config", str(SWEEP), "--name", "resume", *settings]
    sweep_dir = tmp_path / "sweeps/resume"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while completed_trials(sweep_dir) < 2 and first.poll() is None and time.time() < deadline:
        time.sleep(1)
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    first.send_signal(signal.SIGINT)  # as a user pressing Ctrl-C
    first.wait(timeout=180)
    assert completed_trials(sweep_dir) in (2, 3)

    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "continuing" in second.stdout
    rows = list(csv.DictReader(open(sweep_dir / "results.csv")))
    assert len(rows) == 4 and len({r["trial"] for r in rows}) == 4
    assert all(r["status"] == "completed" for r in rows), rows
    # four distinct parameter settings: no finished trial was run again
    assert len({(r["share_mrg"], r["lora_r"], r["lr"]) for r in rows}) == 4
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["trials"] == 4 and summary["pareto_size"] >= 1
    for name in ("pareto.png", "importance.png", "parallel_coordinate.png", "results.md"):
        assert (sweep_dir / name).stat().st_size > 0, name

    # the winning experiment file trains and evaluates through the normal commands
    best = summary["best_experiment"]
    assert load_experiment(best).name == "quickstart-best"
    short = ["--set", "train.instruction.training_steps=3", "--set", "train.instruction.max_steps=3",
             "--set", f"train.output_dir={tmp_path / 'best'}", "--set", "train.val_samples=4"]
    train = subprocess.run([sys.executable, "-m", "m4cxr.cli", "train", "--stage", "instruction", "--config", best,
                            *short], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    checkpoint = tmp_path / "best/quickstart-best-instruction/final"
    assert (checkpoint / "m4cxr.json").is_file()
    ev = subprocess.run([sys.executable, "-m", "m4cxr.cli", "eval", "--config", best, "--checkpoint", str(checkpoint),
                         "--out", str(tmp_path / "best_eval"), "--set", "eval.samples_per_task=2",
                         "--set", "eval.max_new_tokens=8", "--set", "eval.bootstrap_samples=10"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stdout[-2000:] + ev.stderr[-2000:]
    assert "## Table 1" in (tmp_path / "best_eval/tables.md").read_text()
