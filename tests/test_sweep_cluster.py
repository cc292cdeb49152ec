"""A sweep on a local two-node cluster: TPE + ASHA, two trials at a time, trials stopped early
giving their workers to the next ones; interrupted (Ctrl-C) and continued with the same name;
the Optuna study read back from its own storage."""

import csv
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, free_port
from local_cluster import wait_for

pytestmark = pytest.mark.slow  # a two-node Ray cluster

TRIALS = 6


def iterations(sweep_dir):
    """(start, end) of every Tune iteration of every trial, from its result.json; Tune's
    timestamps are whole seconds, so only what surely lies inside an iteration is kept."""
    out = []
    for path in sweep_dir.glob("trial_*/result.json"):
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if r["time_this_iter_s"] > 1:
                    out.append((path.parent.name, r["timestamp"] + 1 - r["time_this_iter_s"], r["timestamp"]))
    return out


def started_trials(sweep_dir) -> int:
    return len(list((sweep_dir / "trials").glob("trial_*/metrics.jsonl"))) if (sweep_dir / "trials").exists() else 0


@pytest.mark.timeout(900)
def test_asha_sweep_on_two_nodes_two_trials_at_a_time(cluster, synthetic_corpus, tmp_path):
    import optuna

    corpus, _ = synthetic_corpus
    cluster.add_node()
    wait_for(lambda: cluster.alive_nodes() == 2, 60, "the worker node to join")
    env = {**cluster.env, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": cluster.address}
    command = [sys.executable, "-m", "m4cxr.cli", "sweep", "--config", str(ROOT / "experiments/sweeps/quickstart.yaml"),
               "--name", "asha", "--set", f"data.corpus_dir={corpus}", "--set", f"tune.output_dir={tmp_path}",
               "--set", "tune.init_checkpoint=", "--set", "tune.objective=single", "--set", "tune.early_stopping=true",
               "--set", f"tune.num_trials={TRIALS}", "--set", "tune.max_concurrent_trials=2",
               "--set", "tune.trial_steps=6", "--set", "tune.eval_every=2", "--set", "tune.grace_period=2",
               "--set", "tune.eval_samples_per_task=2", "--set", "eval.max_new_tokens=8",
               "--set", "train.val_samples=4", "--set", "train.cpus_per_worker=0.5", "--set", "eval.cpus_per_actor=0.5",
               "--set", f"train.output_dir={tmp_path / 'train'}", "--set", "tracking.log_to=[mlflow]"]
    sweep_dir = tmp_path / "asha"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: started_trials(sweep_dir) >= 4, 600, "the fourth trial to start", first)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGINT)  # as a user pressing Ctrl-C
            first.wait(timeout=180)
        log.close()
    first_trials = {path.name for path in (sweep_dir / "trials").glob("trial_*")}
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=700)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "continuing" in second.stdout + second.stderr  # the sweep's progress lines are log records
    rows = list(csv.DictReader(open(sweep_dir / "results.csv")))
    assert len(rows) == TRIALS and len({r["trial"] for r in rows}) == TRIALS
    assert first_trials <= {r["trial"] for r in rows}  # the trials the first run started are the sweep's
    statuses = [r["status"] for r in rows]
    assert "error" not in statuses and statuses.count("stopped early") >= 1, statuses
    assert statuses.count("completed") >= 1, statuses
    # two trials ran at the same time: iterations of different trials overlap
    spans = iterations(sweep_dir)
    assert any(t1 != t2 and a1 < b2 and a2 < b1 for t1, a1, b1 in spans for t2, a2, b2 in spans), spans
    # the Optuna study lives in its own storage, readable by Optuna (and optuna-dashboard)
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["most_trials_at_once"] == 2 and (sweep_dir / "timeline.png").stat().st_size > 0
    study = optuna.load_study(study_name="asha", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == statuses.count("completed") and summary["optuna_storage"].startswith("sqlite:///")
    best = max(float(r["objective"]) for r in rows if r["status"] == "completed")
    assert study.best_value == pytest.approx(best, rel=1e-6)
    assert [t.state for t in study.trials].count(optuna.trial.TrialState.PRUNED) == statuses.count("stopped early")
    assert sorted(t.user_attrs["tune_trial"] for t in study.trials) == sorted(r["trial"] for r in rows)
    assert summary["plot"].endswith("optimization_history.png") and os.path.getsize(summary["plot"]) > 0
    assert os.path.getsize(sweep_dir / "results.md") > 0
    # optuna-dashboard, a real client of that storage, serves the same study
    port = free_port()
    dashboard = subprocess.Popen([str(Path(sys.executable).parent / "optuna-dashboard"), "--host", "127.0.0.1",
                                  "--port", str(port), f"sqlite:///{sweep_dir / 'optuna.db'}"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def served():
            try:
                return json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5))
            except OSError:
                return None
        wait_for(served, 60, "optuna-dashboard to answer")
        (listed,) = served()["study_summaries"]
        shown = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{listed['study_id']}"))
        assert listed["study_name"] == "asha" and len(shown["trials"]) == TRIALS
        assert sorted(t["state"] for t in shown["trials"]) == sorted(
            "Complete" if s == "completed" else "Pruned" for s in statuses)
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)
    # each trial is a run of the sweep's MLflow experiment, with its objective where it completed
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'train/mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("asha").experiment_id])
    assert {r.data.tags.get("trial_name") for r in runs} >= {r["trial"] for r in rows}
    logged = {r.data.metrics["objective"] for r in runs if "objective" in r.data.metrics}
    assert all(any(abs(float(r["objective"]) - v) < 1e-6 for v in logged) for r in rows if r["status"] == "completed")
