"""A training job submitted with `ray job submit` to a local two-node cluster (`ray start` head
plus a worker node, all on 127.0.0.1), its two Train workers on different nodes; the worker node
is then taken away (every process of it SIGKILLed) and, after a while, replaced, as an
autoscaler would replace a lost node. The job must wait for the capacity and finish by itself
with every stream position trained once."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from m4cxr.train.lineage import lineage_problems, read_metrics

from conftest import ROOT

HEAD_PORT, DASHBOARD_PORT = "6391", "8276"
ATTEMPT_S = 10  # how long each attempt to place the workers waits (Ray Train's default: 60 s)


class LocalCluster:
    """A head and worker nodes started with `ray start`; each worker node in a session of its
    own, so that killing its process group takes the whole node away (raylet, workers, agents)."""

    def __init__(self):
        # a short temp dir: Ray's socket paths must stay under the Unix limit of 107 characters
        self.temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        self.ray = str(Path(sys.executable).parent / "ray")
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(ATTEMPT_S),
                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[subprocess.Popen] = []
        subprocess.run([self.ray, "start", "--head", f"--port={HEAD_PORT}", "--node-ip-address=127.0.0.1",
                        "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={DASHBOARD_PORT}", f"--temp-dir={self.temp}"],
                       check=True, env=self.env, capture_output=True, timeout=120)

    def add_node(self) -> subprocess.Popen:
        node = subprocess.Popen([self.ray, "start", f"--address=127.0.0.1:{HEAD_PORT}", "--node-ip-address=127.0.0.1",
                                 "--num-cpus=2", "--block"], env=self.env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.nodes.append(node)
        return node

    def kill_node(self, node: subprocess.Popen) -> None:
        """SIGKILL every process of the node at once: its session and every descendant of its
        `ray start` (the raylet's workers may sit in process groups of their own)."""
        doomed = descendants(node.pid)
        os.killpg(node.pid, signal.SIGKILL)
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.wait(timeout=30)

    def alive_nodes(self) -> int:
        done = subprocess.run([self.ray, "list", "nodes", f"--address=127.0.0.1:{HEAD_PORT}", "--format=json",
                               "--filter", "state=ALIVE"], env=self.env, capture_output=True, text=True, timeout=60)
        return len(json.loads(done.stdout)) if done.returncode == 0 else -1

    def stop(self) -> None:
        for node in self.nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
        subprocess.run([self.ray, "stop", "--force"], env=self.env, capture_output=True, timeout=120)
        shutil.rmtree(self.temp, ignore_errors=True)


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture()
def cluster():
    c = LocalCluster()
    try:
        yield c
    finally:
        c.stop()


def wait_for(condition, timeout_s: float, what: str, job: subprocess.Popen | None = None):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if condition():
            return
        if job is not None and job.poll() is not None:
            raise AssertionError(f"the job ended (exit {job.returncode}) while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.mark.timeout(600)
def test_job_on_two_nodes_survives_a_lost_node(cluster, synthetic_corpus, tmp_path):
    corpus, _ = synthetic_corpus
    worker_node = cluster.add_node()
    wait_for(lambda: cluster.alive_nodes() == 2, 60, "the worker node to join")
    out = tmp_path / "shared"  # storage both nodes see, like cluster.yaml's NFS share
    cmd = [cluster.ray, "job", "submit", f"--address=http://127.0.0.1:{DASHBOARD_PORT}", "--working-dir", str(ROOT),
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
