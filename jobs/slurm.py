"""A platform job inside a Slurm allocation: Ray across the allocation's nodes, private to the
job, then the job itself. jobs/slurm.sbatch runs it (see there for sbatch's options):

    sbatch --nodes=2 --gpus-per-node=4 --time=24:00:00 jobs/slurm.sbatch \\
        jobs/finetune.py --config experiments/m4cxr.yaml --name m4cxr-instruction

- Ray: the head on this node (the allocation's first), a worker node on every other node (srun
  runs this script with --worker there), each `ray start --block` with its node's CPUs and GPUs
  as Slurm gives them (SLURM_CPUS_ON_NODE, SLURM_GPUS_ON_NODE), its temp dir
  /tmp/m4cxr-ray-<job>-<restart>-* and every port chosen free on its node: two jobs, or a
  colleague's Ray, on one node never meet. The job reaches it through RAY_ADDRESS
  (ray_cluster.init_ray). At the end Ray is stopped by its process ids, never `ray stop`.
- Time limits: Slurm's warning (`#SBATCH --signal=B:USR1@...`) is passed to the job; a
  training job checkpoints at its next step and exits with StoppedEarly.exit_code (train/run.py). The
  allocation then requeues itself (`scontrol requeue`): the next one runs the same command, and
  the run, by its name, goes on from that checkpoint, in the same MLflow run.
- `scancel` (SIGTERM) stops Ray and the job at once; the run's last periodic checkpoint
  (train.checkpoint_every) is where the next submission goes on.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _args  # noqa: F401  (makes platform/ importable)
from m4cxr.ray_cluster import descendants

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_args() -> list[str]:
    """`ray start` options of this node: its share of the allocation, its own temp dir and ports."""
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    cpus = os.environ.get("SLURM_CPUS_ON_NODE") or str(os.cpu_count())
    # short (Ray's socket paths must stay under 107 characters) and new for every start
    temp = tempfile.mkdtemp(prefix=f"m4cxr-ray-{os.environ['SLURM_JOB_ID']}-{restart}-", dir="/tmp")
    return ["--block", f"--num-cpus={cpus}", f"--num-gpus={os.environ.get('SLURM_GPUS_ON_NODE') or 0}",
            f"--temp-dir={temp}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


def start_ray(nodes: list[str]) -> tuple[str, list[subprocess.Popen]]:
    """The head here, a worker node on each other node; returns RAY_ADDRESS and the processes."""
    ip = "127.0.0.1" if len(nodes) == 1 else socket.gethostbyname(socket.gethostname())
    address = f"{ip}:{free_port()}"
    head = subprocess.Popen([RAY, "start", "--head", f"--node-ip-address={ip}", f"--port={address.split(':')[1]}",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}",
                             f"--ray-client-server-port={free_port()}", *node_args()], start_new_session=True,
                            stdout=subprocess.DEVNULL)  # its logs are in its temp dir
    started = [head]
    if len(nodes) > 1:  # srun forwards our SIGTERM to its tasks on the other nodes
        others = len(nodes) - 1
        started.append(subprocess.Popen(["srun", f"--nodes={others}", f"--ntasks={others}", "--ntasks-per-node=1",
                                         f"--exclude={nodes[0]}", sys.executable, __file__, "--worker", address]))
    wait_for_nodes(address, len(nodes), head)
    return address, started


def wait_for_nodes(address: str, count: int, head: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    probe = f"import ray; ray.init(address='{address}', log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))"
    while time.time() < deadline:
        if head.poll() is not None:
            sys.exit(f"slurm job: the Ray head ended (exit {head.returncode}) before the job started")
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        if done.returncode == 0 and int(done.stdout.split()[-1]) >= count:
            print(f"slurm job: Ray is up at {address} on {count} node(s)", flush=True)
            return
        time.sleep(2)
    sys.exit(f"slurm job: Ray did not come up on {count} node(s) within {timeout_s:.0f} s")


def stop(head: subprocess.Popen, *others: subprocess.Popen) -> None:
    """Our own processes, by id: the Ray head and everything below it at once (SIGKILL); the
    others (srun, which passes it on to the other nodes' Ray; the job) asked to end."""
    for pid in [head.pid, *descendants(head.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in others:
        proc.terminate()
    for proc in (head, *others):
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_job(job: list[str]) -> int:
    # Ray's token authentication, which `ray start` turns on, for every process of the job: other
    # users of the nodes cannot reach this Ray (the token is in ~/.ray, on every node)
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                           capture_output=True, text=True, check=True).stdout.split()
    print(f"slurm job {os.environ['SLURM_JOB_ID']} (restart {os.environ.get('SLURM_RESTART_COUNT', '0')}) "
          f"on {', '.join(nodes)}: {' '.join(job)}", flush=True)
    warned = []
    signal.signal(signal.SIGUSR1, lambda *_: warned.append(time.time()))  # Slurm's time-limit warning
    address, ray_processes = start_ray(nodes)
    # The job starts with SIGUSR1 ignored (inherited) until its training installs its handler, so a
    # warning that comes while it is still starting is not its death; hence it is sent again
    # every 2 s until the job ends.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    task = subprocess.Popen([sys.executable, *job], env={**os.environ, "RAY_ADDRESS": address})
    signal.signal(signal.SIGUSR1, lambda *_: warned.append(time.time()))

    def cancel(signum, frame):  # scancel: no time to lose before SIGKILL
        stop(*ray_processes, task)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, cancel)
    while task.poll() is None:
        if warned:
            if len(warned) == 1:
                print("slurm job: time-limit warning; the job checkpoints and stops", flush=True)
                warned.append(time.time())
            task.send_signal(signal.SIGUSR1)
        time.sleep(2)
    code = task.returncode
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    stop(*ray_processes)
    from m4cxr.train.run import StoppedEarly

    if code == StoppedEarly.exit_code:
        print("slurm job: stopped at a checkpoint; requeued to go on", flush=True)
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True)
    return code


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:  # on another node of the allocation, through srun
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        os.execv(RAY, [RAY, "start", f"--address={sys.argv[2]}", *node_args()])
    if len(sys.argv) < 2:
        sys.exit("usage: sbatch jobs/slurm.sbatch JOB.py [ARGS...]")
    sys.exit(run_job(sys.argv[1:]))


if __name__ == "__main__":
    main()
