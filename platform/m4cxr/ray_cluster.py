"""Starting or joining Ray, for every layer (data prepare, train, evaluate, sweep, serve).

A local Ray is this process's own (its temp dir, free ports): someone else's Ray on the same
machine is never joined nor stopped. Ray starts with its dashboard: it serves the State API
that Ray Train's placement-group cleaner, `ray list ...`, `ray job submit` and `serve status`
use. Without it a sweep whose trials are stopped early leaves their placement groups reserved
and hangs.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import ray

started: dict[str, str] = {}  # the local Ray this process started: its temp dir



def free_port() -> int:
    """A TCP port nobody holds on this machine now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit` or a Slurm job), else start a
    local Ray of this process's own: never the machine's running Ray (address "local"), in a
    temp dir of its own, its dashboard and metrics on free ports on 127.0.0.1. A colleague's Ray
    on the same machine, on Ray's default ports and temp dir, is never joined nor disturbed, and
    this Ray ends with this process (ray.shutdown)."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=log_to_driver)
        return
    started["temp_dir"] = tempfile.mkdtemp(prefix="m4cxr-ray-")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=free_port(), log_to_driver=log_to_driver,
             _temp_dir=started["temp_dir"], _metrics_export_port=free_port())


def local_logs() -> Path:
    """The logs folder of the local Ray this process started last (Serve's replica and access
    logs are there)."""
    if "temp_dir" not in started:
        raise RuntimeError("this process started no local Ray (init_ray)")
    return Path(started["temp_dir"]) / "session_latest" / "logs"


def descendants(root: int) -> list[int]:
    """Every process below `root` (children, their children, ...), from /proc: what stopping
    one's own Ray by process id must reach, and nothing of another's."""
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
