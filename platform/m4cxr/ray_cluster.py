"""Starting or joining Ray, for every layer (data prepare, train, evaluate, sweep, serve).

Ray starts with its dashboard: it serves the State API that Ray Train's placement-group
cleaner, `ray list ...`, `ray job submit` and `serve status` use. Without it a sweep whose
trials are stopped early leaves their placement groups reserved and hangs.
"""

from __future__ import annotations

import os

import ray


def init_ray(num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`), else start a local one with
    its dashboard on 127.0.0.1 (the port Ray picks, 8265 when free)."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=log_to_driver)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=log_to_driver)
