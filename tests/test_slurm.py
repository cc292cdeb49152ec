"""Training jobs on a real Slurm (tests/private_slurm.py: munged, slurmctld and slurmd on this
machine): a job with a one-minute time limit is warned, checkpoints, requeues itself and goes
on until it finishes, every stream position trained once across the allocations and one MLflow
run throughout; a cancelled job leaves a checkpoint the next submission goes on from."""

import json
import subprocess
import time

import pytest

from conftest import ROOT
from private_slurm import PrivateSlurm, slurm_installed

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not slurm_installed(), reason="Slurm (slurm-wlm, munge) is not installed, or not root")]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = PrivateSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        cluster.stop()


def submit(slurm: PrivateSlurm, corpus, out, name: str, steps: int, *sbatch: str) -> str:
    """sbatch jobs/slurm.sbatch jobs/finetune.py ... of the tiny model; returns the job id."""
    overrides = [f"data.corpus_dir={corpus}", f"train.output_dir={out}", f"train.instruction.training_steps={steps}",
                 f"train.instruction.max_steps={steps}", "train.checkpoint_every=5", "train.log_every=1",
                 "train.eval_every=1000", "train.val_samples=4", "tracking.log_to=[mlflow]",
                 f"tracking.mlflow_tracking_uri=sqlite:///{out}/mlflow.db"]
    command = ["sbatch", "--parsable", "--cpus-per-task=2", f"--output={out}/{name}-%j.out", *sbatch,
               "jobs/slurm.sbatch", "jobs/finetune.py", "--config", "experiments/quickstart.yaml", "--name", name,
               *[a for o in overrides for a in ("--set", o)]]
    done = subprocess.run(command, env=slurm.env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def mlflow_runs(out) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [(r, sorted(m.step for m in client.get_metric_history(r.info.run_id, "loss"))) for r in runs]


def test_a_time_limited_job_is_cut_requeued_and_finishes_with_a_complete_lineage(slurm, synthetic_corpus, tmp_path):
    corpus, _ = synthetic_corpus
    # the warning comes 24-29 s into each allocation (Slurm checks every 30 s), as training starts:
    # measured here, each allocation trains one step (two at most), so 4 steps take 3 or 4
    job = submit(slurm, corpus, tmp_path, "cut", 4, "--time=1", "--signal=B:USR1@30")
    state = slurm.wait_for_job(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 900)
    log = "\n".join(p.read_text() for p in sorted(tmp_path.glob("cut-*.out")))
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert int(state["Restarts"]) >= 2 and log.count("requeued to go on") >= 2, log[-3000:]
    summary = json.loads((tmp_path / "cut/summary.json").read_text())  # written after the lineage check passed
    assert summary["steps"] == 4 and summary["restarts"] >= 2
    assert summary["steps_trained_again"] == 0  # each allocation stopped at a checkpoint of its last step
    (run, steps), = mlflow_runs(tmp_path)  # one MLflow run through every allocation
    assert run.info.status == "FINISHED" and steps == list(range(1, 5))


def test_a_cancelled_job_leaves_a_checkpoint_the_next_submission_goes_on_from(slurm, synthetic_corpus, tmp_path):
    corpus, _ = synthetic_corpus
    job = submit(slurm, corpus, tmp_path, "cancelled", 20)
    metrics = tmp_path / "cancelled/metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and any(json.loads(line)["step"] >= 7 for line in metrics.read_text().splitlines())):
        assert time.time() < deadline and slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), slurm.job(job)
        time.sleep(1)
    slurm.run("scancel", job)
    slurm.wait_for_job(job, {"CANCELLED"}, 60)
    deadline = time.time() + 30
    while slurm.job_processes() and time.time() < deadline:  # the job's Ray went with it
        time.sleep(1)
    assert not slurm.job_processes()
    assert list((tmp_path / "cancelled").glob("checkpoint_*"))
    again = submit(slurm, corpus, tmp_path, "cancelled", 20)
    state = slurm.wait_for_job(again, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 600)
    assert state["JobState"] == "COMPLETED", (tmp_path / f"cancelled-{again}.out").read_text()[-3000:]
    summary = json.loads((tmp_path / "cancelled/summary.json").read_text())
    assert summary["steps"] == 20 and summary["restarts"] == 1
    assert summary["restart_costs"][0]["resumed_from_step"] >= 5  # the periodic checkpoint (every 5 steps)
