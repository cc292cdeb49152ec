"""Real faults for the training tests and the recovery benchmark: SIGKILL the processes Ray
runs a training on, when the run reaches a given point. Only this process's own Ray is hit: the
actors are looked for among this process's descendants (init_ray's local Ray is its child), so
a colleague's training on the same machine is never touched."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from m4cxr.ray_cluster import descendants
from m4cxr.train.lineage import read_metrics, surviving_rows


def alive_actor_pids(class_part: str) -> list[int]:
    """PIDs of this process's own Ray actor processes whose class name contains `class_part`
    (RayTrainWorker, or PrepareSamples for the Ray Data actors that feed the stream): Ray titles
    each actor's process `ray::<class name>[.<method>]`, which the OS shows at once, where the
    State API can lag by seconds behind a short-lived actor."""
    pids = []
    for pid in descendants(os.getpid()):
        try:
            title = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::") and class_part in title:
            pids.append(pid)
    return pids


def checkpoints(run_dir: Path) -> int:
    return len(list(Path(run_dir).glob("checkpoint_*")))


class Killer(threading.Thread):
    """Watches a run's folder and, for each (condition, class_part) in `plan` in turn, SIGKILLs
    the live actors of that class once condition(metrics rows logged since the last kill,
    checkpoint folders) holds. `killed` records (step of the lineage, pids) per kill."""

    def __init__(self, run_dir: Path, plan: list, timeout_s: float = 600):
        super().__init__(daemon=True)
        self.run_dir, self.plan, self.timeout_s = Path(run_dir), list(plan), timeout_s
        self.killed: list[tuple[int, list[int]]] = []
        self.done = threading.Event()

    def run(self) -> None:
        deadline, seen = time.time() + self.timeout_s, 0
        while self.plan and not self.done.is_set() and time.time() < deadline:
            rows = read_metrics(self.run_dir) if (self.run_dir / "metrics.jsonl").exists() else []
            condition, class_part = self.plan[0]
            if condition(rows[seen:], checkpoints(self.run_dir)):
                pids = alive_actor_pids(class_part)
                if pids:
                    for pid in pids:
                        os.kill(pid, signal.SIGKILL)
                    step = surviving_rows(rows)[-1]["step"] if rows else 0
                    self.killed.append((step, pids))
                    seen = len(rows)
                    self.plan.pop(0)
            time.sleep(0.05)


def after_checkpoint(n: int):
    """Right after the n-th checkpoint folder is written."""
    return lambda rows, ckpts: ckpts >= n


def at_step(step: int):
    """Once the step is logged (after the last kill)."""
    return lambda rows, ckpts: any(r["step"] >= step for r in rows)
