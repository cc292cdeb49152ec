"""Someone else's Ray on this machine: a colleague's job, or the user's own overnight run.

A head started with `ray start --head` as a user starts one: Ray's default ports and temp dir
where they are free, in a session of its own, holding a detached actor with state. (It is a child of the test process, which the fault tests'
actor search looks among, so its actor is not titled as a Ray Train worker; a training started
outside the tests, beside `tests/test_faults.py`, finished with no restart.) The test
run must leave it alive and unchanged: no test joins it, stops it or kills its actor
(conftest.py checks it after the last test).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_TEMP = Path("/tmp/ray")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
            return True
        except OSError:
            return False


def some_free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


ACTOR = '''
import json, os, sys, ray

ray.init(address=sys.argv[1], namespace="bystander", log_to_driver=False)

@ray.remote
class Ledger:
    def __init__(self):
        self.entries = []
    def add(self, entry):
        self.entries.append(entry)
        return len(self.entries)
    def state(self):
        return {"entries": self.entries, "pid": os.getpid()}

if sys.argv[2] == "create":
    ledger = Ledger.options(name="ledger", lifetime="detached", get_if_exists=True).remote()
    for step in range(3):
        ray.get(ledger.add.remote(f"step {step}"))
state = ray.get(ray.get_actor("ledger").state.remote())
from ray.util.state import list_jobs
state["drivers"] = len(list_jobs(address=sys.argv[3]))
print(json.dumps(state))
'''


class BystanderRay:
    def __init__(self):
        self.ray = str(Path(sys.executable).parent / "ray")
        # Ray's default temp dir, unless a Ray of the machine's already lives there
        self.own_temp = (DEFAULT_TEMP / "ray_current_cluster").exists()
        self.temp = Path(tempfile.mkdtemp(prefix="bystander", dir="/tmp")) if self.own_temp else DEFAULT_TEMP
        port = 6379 if port_is_free(6379) else some_free_port()
        dashboard = 8265 if port_is_free(8265) else some_free_port()
        self.address = f"127.0.0.1:{port}"
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        args = [self.ray, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dashboard}",
                "--node-ip-address=127.0.0.1", "--num-cpus=1", "--include-dashboard=true", f"--temp-dir={self.temp}"]
        # Ray's other default ports, where yet another Ray (a second test run's bystander) holds them
        for option, default in (("--dashboard-agent-listen-port", 52365), ("--ray-client-server-port", 10001)):
            if not port_is_free(default):
                args.append(f"{option}={some_free_port()}")
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env["RAY_AUTH_MODE"] = "disabled"
        self.head = subprocess.Popen(args, env=self.env, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self.initial = self.state("create")
        except BaseException:
            self.stop()
            raise

    def state(self, action: str = "read") -> dict:
        """The ledger actor's entries and process id, and how many drivers the cluster has seen."""
        deadline = time.time() + 300  # a loaded machine (a quickstart beside the tests) starts Ray slowly
        while True:
            try:
                done = subprocess.run([sys.executable, "-c", ACTOR, self.address, action, self.dashboard],
                                      env=self.env, capture_output=True, text=True, timeout=180)
            except subprocess.TimeoutExpired as err:
                done = subprocess.CompletedProcess(err.cmd, -1, "", f"no answer in {err.timeout:.0f}s")
            if done.returncode == 0:
                return json.loads(done.stdout.strip().splitlines()[-1])
            if time.time() > deadline or self.head.poll() is not None:
                raise AssertionError(f"the bystander Ray at {self.address} did not answer: {done.stderr[-2000:]}")
            time.sleep(1)

    def stop(self) -> None:
        """Its own processes, by id: the head's session and every descendant."""
        from faults import descendants

        doomed = descendants(self.head.pid)
        try:
            os.killpg(self.head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.head.wait(timeout=30)
        if self.own_temp:
            shutil.rmtree(self.temp, ignore_errors=True)
        else:  # Ray's default temp dir: leave no pointer to a Ray that is gone
            current = DEFAULT_TEMP / "ray_current_cluster"
            if current.exists() and self.address.split(":")[1] in current.read_text():
                current.unlink()
