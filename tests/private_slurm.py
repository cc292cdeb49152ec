"""A Slurm of the tests' own on this machine: munged, slurmctld and slurmd (Debian's slurm-wlm
and munge, as root), every file in a temp dir, every port free, one node with this machine's
CPUs. Stopping it kills its own daemons and its jobs' processes, by process id.

Facts of Slurm 22.05 it is set for: the requeue of a job waits `cred_expire` seconds (120 by
default, 5 at least), here 5; the scheduler runs every 2 s; a job's processes get SIGKILL 5 s
after SIGTERM (KillWait). Time limits and `--signal` warnings are checked every 30 s, whatever
the config: a one-minute job gets its warning 24-29 s after it starts.
"""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def slurm_installed() -> bool:
    return os.geteuid() == 0 and all(shutil.which(b) or Path("/usr/sbin", b).exists()
                                     for b in ("munged", "slurmctld", "slurmd", "sbatch"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def daemon(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class PrivateSlurm:
    def __init__(self, folder: Path):
        self.dir = Path(folder).resolve()
        for sub in ("etc", "state", "spool", "log", "munge"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir / "munge", 0o700)
        self.conf = self.dir / "etc/slurm.conf"
        self.socket = self.dir / "munge/munge.socket"
        self.host = socket.gethostname().split(".")[0]
        self.daemons: list[subprocess.Popen] = []
        try:
            self.start()
        except BaseException:
            self.stop()
            raise

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "RAY_ADDRESS"))}
        return {**env, "SLURM_CONF": str(self.conf)}

    def run(self, *command: str, check: bool = True) -> str:
        return subprocess.run(command, env=self.env(), capture_output=True, text=True, check=check, timeout=60).stdout

    def spawn(self, command: list[str], log: str) -> None:
        # the daemons read their config from -f, so that SLURM_CONF in a process's environment marks
        # it as one of this Slurm's jobs (job_processes)
        env = {k: v for k, v in self.env().items() if k != "SLURM_CONF"}
        with open(self.dir / "log" / log, "ab") as out:
            self.daemons.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                                 start_new_session=True, cwd=self.dir))

    def start(self) -> None:
        key = self.dir / "munge/munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        m = self.dir / "munge"
        self.spawn([daemon("munged"), "--foreground", "--force", f"--socket={self.socket}", f"--key-file={key}",
                    f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"], "munged.out")
        self.wait(self.socket.exists, 20, "munged's socket")
        cpus = os.cpu_count()
        memory = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.9)
        d = self.dir
        settings = {
            "ClusterName": "tests", "SlurmctldHost": "localhost", "SlurmctldPort": free_port(), "SlurmdPort": free_port(),
            "SlurmUser": "root", "SlurmdUser": "root", "AuthType": "auth/munge", "CredType": "cred/munge",
            "AuthInfo": f"socket={self.socket},cred_expire=5", "MailProg": "/bin/true",
            "StateSaveLocation": d / "state", "SlurmdSpoolDir": d / "spool",
            "SlurmctldPidFile": d / "slurmctld.pid", "SlurmdPidFile": d / "slurmd.pid",
            "SlurmctldLogFile": d / "log/slurmctld.log", "SlurmdLogFile": d / "log/slurmd.log",
            "PlugStackConfig": d / "etc/plugstack.conf", "ProctrackType": "proctrack/pgid", "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none", "AccountingStorageType": "accounting_storage/none",
            "MpiDefault": "none", "SelectType": "select/cons_tres", "SelectTypeParameters": "CR_Core",
            "SchedulerType": "sched/backfill", "SchedulerParameters": "bf_interval=1,sched_interval=2",
            # a minute of grace past a time limit, as many sites give: a job warned just as its
            # training ends still has to stop its Ray (measured: 35 s under load) before the kill
            "KillWait": 5, "OverTimeLimit": 1, "InactiveLimit": 0, "MinJobAge": 3600, "ReturnToService": 2,
            "JobRequeue": 1, "CompleteWait": 0,
        }
        (d / "etc/plugstack.conf").write_text("")
        lines = [f"{k}={v}" for k, v in settings.items()]
        lines += [f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN",
                  f"PartitionName=tests Nodes={self.host} Default=YES MaxTime=INFINITE State=UP"]
        self.conf.write_text("\n".join(lines) + "\n")
        self.spawn([daemon("slurmctld"), "-D", "-f", str(self.conf)], "slurmctld.out")
        self.spawn([daemon("slurmd"), "-D", "-f", str(self.conf), "-N", self.host], "slurmd.out")
        self.wait(lambda: self.run("sinfo", "-h", "-o", "%T", check=False).strip() == "idle", 60, "an idle node")

    def wait(self, condition, timeout_s: float, what: str) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.daemons):
                raise RuntimeError(f"a Slurm daemon ended while waiting for {what}: see {self.dir}/log")
            if condition():
                return
            time.sleep(0.3)
        raise TimeoutError(f"no {what} within {timeout_s} s: see {self.dir}/log")

    def job(self, job_id: str) -> dict:
        """scontrol's fields of a job (State, RestartCnt, ...)."""
        fields = self.run("scontrol", "-o", "show", "job", job_id).split()
        return dict(f.split("=", 1) for f in fields if "=" in f)

    def wait_for_job(self, job_id: str, states: set[str], timeout_s: float) -> dict:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            job = self.job(job_id)
            if job["JobState"] in states:
                return job
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not in {states} within {timeout_s} s: {self.job(job_id)}")

    def job_processes(self) -> list[int]:
        """Processes of this Slurm's jobs, found by the SLURM_CONF in their environment (a job's
        own sessions escape proctrack/pgid)."""
        mine = f"SLURM_CONF={self.conf}".encode()
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid():
                try:
                    if mine in (proc / "environ").read_bytes().split(b"\0"):
                        found.append(int(proc.name))
                except OSError:
                    continue
        return found

    def stop(self) -> None:
        for pid in self.job_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in reversed(self.daemons):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.daemons:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
