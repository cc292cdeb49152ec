"""A local multi-node Ray cluster for the tests: a `ray start` head and worker nodes, all on
127.0.0.1, each worker node in a session of its own so that it can be taken away whole."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAD_PORT, DASHBOARD_PORT = "6391", "8276"
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


def wait_for(condition, timeout_s: float, what: str, job: subprocess.Popen | None = None):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if condition():
            return
        if job is not None and job.poll() is not None:
            raise AssertionError(f"the job ended (exit {job.returncode}) while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
