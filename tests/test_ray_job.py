"""A training job submitted with `ray job submit` to a local head started here, on 127.0.0.1."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT

HEAD_PORT, DASHBOARD_PORT = "6391", "8276"


@pytest.fixture()
def ray_head():
    # a short temp dir: Ray's socket paths must stay under the Unix limit of 107 characters
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    ray = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray, "start", "--head", f"--port={HEAD_PORT}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}",
                    f"--temp-dir={temp}"],
                   check=True, env=env, capture_output=True, timeout=120)
    try:
        yield env, ray
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_a_training_job(ray_head, synthetic_corpus, tmp_path):
    env, ray = ray_head
    corpus, _ = synthetic_corpus
    out = tmp_path / "runs"
    cmd = [ray, "job", "submit", f"--address=http://127.0.0.1:{DASHBOARD_PORT}", "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "runs", "tests/data"]}), "--",
           "python", "jobs/finetune.py", "--config", "experiments/quickstart.yaml",
           "--set", f"data.corpus_dir={corpus}", "--set", f"train.output_dir={out}",
           "--set", "train.instruction.training_steps=4", "--set", "train.instruction.max_steps=4",
           "--set", "train.val_samples=8", "--name", "submitted"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    summary = json.loads((out / "submitted/summary.json").read_text())
    assert summary["steps"] == 4 and (out / "submitted/final/projector.safetensors").exists()
