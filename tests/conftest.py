import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(__file__).resolve().parent / "data" / "real"


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
