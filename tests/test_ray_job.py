"""A training job submitted with `ray job submit` to a local two-node cluster (`ray start` head
plus a worker node, all on 127.0.0.1), its two Train workers on different nodes; the worker node
is then taken away (every process of it SIGKILLed) and, after a while, replaced, as an
autoscaler would replace a lost node. The job must wait for the capacity and finish by itself
with every stream position trained once."""

import json
import re
import subprocess
import time

import pytest

from m4cxr.train.lineage import lineage_problems, read_metrics

from conftest import ROOT
from local_cluster import ATTEMPT_S, wait_for

pytestmark = pytest.mark.slow  # a two-node Ray cluster


@pytest.mark.timeout(600)
def test_job_on_two_nodes_survives_a_lost_node(cluster, synthetic_corpus, tmp_path):
    corpus, _ = synthetic_corpus
    worker_node = cluster.add_node()
    wait_for(lambda: cluster.alive_nodes() == 2, 60, "the worker node to join")
    out = tmp_path / "shared"  # storage both nodes see, like cluster.yaml's NFS share
    cmd = [cluster.ray, "job", "submit", f"--address=http://127.0.0.1:{cluster.dashboard_port}", "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "runs", "tests/data"]}), "--",
           "python", "jobs/finetune.py", "--config", "experiments/quickstart.yaml",
           "--set", f"data.corpus_dir={corpus}", "--set", f"train.output_dir={out}",
           "--set", "train.num_workers=2", "--set", "train.placement_strategy=STRICT_SPREAD",
           "--set", "train.instruction.training_steps=16", "--set", "train.instruction.max_steps=16",
           "--set", "train.instruction.global_batch_size=4", "--set", "train.micro_batch_size=2",
           "--set", "train.checkpoint_every=4", "--set", "train.log_every=4", "--set", "train.val_samples=8",
           "--set", "train.max_failures=1", "--set", "train.capacity_wait_s=300", "--name", "two-nodes"]
    log = open(tmp_path / "job.log", "w")
    job = subprocess.Popen(cmd, env=cluster.env, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    run_dir = out / "two-nodes"
    try:
        wait_for(lambda: any(r["step"] >= 6 for r in read_metrics(run_dir)), 300, "step 6", job)
        cluster.kill_node(worker_node)  # mid-interval, two steps after the step-4 checkpoint
        killed_at = time.time()
        wait_for(lambda: cluster.alive_nodes() == 1, 120, "the lost node to be marked dead")
        # no node can take the lost worker: the run waits (each placement attempt times out after
        # ATTEMPT_S and is retried) rather than failing; then the "autoscaler" adds a node
        time.sleep(2 * ATTEMPT_S)
        assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
        cluster.add_node()
        job.wait(timeout=400)
    finally:
        if job.poll() is None:
            job.kill()
        log.close()
        text = (tmp_path / "job.log").read_text()
        print(text[-5000:])  # shown when the test fails
    assert job.returncode == 0 and "succeeded" in text.lower(), text[-3000:]
    # two workers on two nodes (STRICT_SPREAD); the lost node's own lines may never reach the
    # job's log, as its processes die at once
    placements = re.findall(r"worker (\d) of 2 on node (\w+)", text)
    assert {rank for rank, _ in placements} == {"0", "1"} and len({node for _, node in placements}) >= 2, placements
    assert cluster.alive_nodes() == 2  # the head and the replacement
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_metrics(run_dir)
    assert lineage_problems(rows, 16, 4) == [] and summary["steps"] == 16 and summary["skipped_samples"] == 0
    cost = summary["restart_costs"]
    assert summary["restarts"] == 1 and cost[0]["resumed_from_step"] % 4 == 0 and cost[0]["resumed_from_step"] < 16
    assert summary["seconds_lost"] >= 2 * ATTEMPT_S  # the wait for the replacement is counted
    # the loss continues from the restored step: a step trained before and after the loss of the
    # node gives the same loss (same weights, same samples)
    first = next(r for r in rows if r["time"] > killed_at and r["resumed_from"] == cost[0]["resumed_from_step"]
                 and r["step"] == cost[0]["resumed_from_step"] + 1)
    before = [r for r in rows if r["step"] == first["step"] and r["time"] < first["time"]]
    if before:
        assert first["loss"] == pytest.approx(before[0]["loss"], rel=1e-3)
    assert first["loss"] < rows[0]["loss"] or first["step"] == 1
    assert (run_dir / "final/projector.safetensors").exists()
