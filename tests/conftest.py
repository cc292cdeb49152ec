import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(__file__).resolve().parent / "data" / "real"


@pytest.fixture(scope="session", autouse=True)
def mlflow_default_store_in_tmp(tmp_path_factory):
    """MLflow's default store is ./mlflow.db: whatever reaches it (RunLog.finish flushes MLflow's
    default store) would write one into the folder pytest runs in, the repository. Ray's
    workers and the commands tests start inherit the variable."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow_default') / 'mlflow.db'}")
        yield


@pytest.fixture(scope="session", autouse=True)
def bystander_ray():
    """Someone else's Ray on the machine (tests/bystander_ray.py), started before the first test:
    after the last, it must be alive, its actor unchanged (same process, same entries), and no
    test's driver may have joined it."""
    from bystander_ray import BystanderRay

    bystander = BystanderRay()
    yield bystander
    try:
        after = bystander.state()
        before = bystander.initial
        assert after["pid"] == before["pid"] and after["entries"] == before["entries"], (before, after)
        assert after["drivers"] == before["drivers"] + 1, (  # + the driver that read it now
            f"{after['drivers'] - before['drivers'] - 1} drivers from the tests joined someone else's Ray")
    finally:
        bystander.stop()


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance per test module (starting Ray takes seconds), with its dashboard
    as the platform starts it."""
    import ray

    from m4cxr.ray_cluster import init_ray

    init_ray(num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory):
    """The synthetic world of the README command (200 patients, seed 0), written once per run."""
    from m4cxr.config import SyntheticConfig
    from m4cxr.data.synthetic import synthesize

    out = tmp_path_factory.mktemp("synthetic")
    manifest = synthesize(out, SyntheticConfig(patients=200, seed=0, image_size=128), progress=False)
    return out, manifest


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (tests serve on loopback only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def cluster():
    """A local two-or-more-node Ray cluster (tests/local_cluster.py), stopped after the test."""
    from local_cluster import LocalCluster

    c = LocalCluster()
    try:
        yield c
    finally:
        c.stop()


# the quickstart, small: 60 patients, 300 instruction-tuning steps (enough for its reports to state
# findings, which the grounded-report tests need; at 80 it wrote "No pleural effusion." over and
# over), 2 sweep trials
QUICKSTART_OVERRIDES = [
    "data.synthetic.patients=60", "train.pretrain.training_steps=10", "train.pretrain.max_steps=10",
    "train.instruction.training_steps=300", "train.instruction.max_steps=300", "train.val_samples=24",
    "eval.samples_per_task=6", "eval.bootstrap_samples=20", "eval.overlays=2",
    "tune.num_trials=2", "tune.trial_steps=4", "tune.eval_every=2", "tune.eval_samples_per_task=4"]


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """The small quickstart, run once per test run: (its folder, its summary). Its trained and
    evaluated checkpoints serve the quickstart test and the web page's browser test."""
    import ray

    from m4cxr.quickstart import run_quickstart
    from m4cxr.ray_cluster import init_ray

    out = tmp_path_factory.mktemp("quickstart") / "qs"
    started_here = not ray.is_initialized()
    init_ray(num_cpus=2, log_to_driver=False)
    try:
        summary = run_quickstart(out, ROOT / "experiments/quickstart.yaml",
                                 [*QUICKSTART_OVERRIDES, f"serve.port={free_port()}"])
    finally:
        if started_here:
            ray.shutdown()
    return out, summary
