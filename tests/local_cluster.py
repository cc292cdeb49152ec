"""A local multi-node Ray cluster for the tests: a `ray start` head and worker nodes, all on
127.0.0.1, each node in a session of its own so that it can be taken away whole, on free ports
and its own temp dir. Stopping it kills its own processes by id: another Ray on the machine (a
colleague's job) is never touched."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conftest import free_port
from faults import descendants

ATTEMPT_S = 10  # how long each attempt to place Train workers waits (Ray Train's default: 60 s)


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
        self.head_port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.head_port}"
        self.nodes: list[subprocess.Popen] = []
        self.head = self.start_node(["--head", f"--port={self.head_port}", "--include-dashboard=true",
                                     "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                                     f"--ray-client-server-port={free_port()}", f"--temp-dir={self.temp}"])
        try:  # up when the State API (the dashboard) lists it
            wait_for(lambda: self.alive_nodes() == 1, 120, "the head node", self.head)
        except BaseException:
            self.stop()
            raise

    def start_node(self, args: list[str]) -> subprocess.Popen:
        """`ray start --block` in a session of its own: its process group is the node."""
        return subprocess.Popen([self.ray, "start", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--block",
                                 f"--dashboard-agent-listen-port={free_port()}", *args], env=self.env,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def add_node(self) -> subprocess.Popen:
        node = self.start_node([f"--address={self.address}"])
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
        done = subprocess.run([self.ray, "list", "nodes", f"--address={self.address}", "--format=json",
                               "--filter", "state=ALIVE"], env=self.env, capture_output=True, text=True, timeout=60)
        try:
            return len(json.loads(done.stdout)) if done.returncode == 0 else -1
        except json.JSONDecodeError:  # the dashboard not answering yet
            return -1

    def stop(self) -> None:
        """Kill this cluster's nodes, the head last, by their process ids (no `ray stop`, which
        stops every Ray on the machine)."""
        for node in self.nodes + [self.head]:
            if node.poll() is None:
                self.kill_node(node)
        shutil.rmtree(self.temp, ignore_errors=True)


def wait_for(condition, timeout_s: float, what: str, job: subprocess.Popen | None = None):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if condition():
            return
        if job is not None and job.poll() is not None:
            raise AssertionError(f"the job ended (exit {job.returncode}) while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
