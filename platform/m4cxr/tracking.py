"""Experiment tracking for training runs and evaluations: MLflow runs and TensorBoard event
files, as `tracking.log_to` asks (sweeps log their trials through Tune's own callbacks).

    log = RunLog(exp, "quickstart-instruction", run_dir, kind="train")
    log.params(flat_params(to_dict(exp)))   # the resolved experiment
    log.metrics({"loss": 2.1, "lr": 1e-4}, step=10)
    log.tag("checkpoint", ".../final"); log.finish()

A run keeps its MLflow run id in its folder (`mlflow_run_id`), so a restarted worker or a rerun
with the same name goes on logging into the same MLflow run.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from m4cxr.config import Experiment


def mlflow_uri(exp: Experiment) -> str:
    """tracking.mlflow_tracking_uri, or a local SQLite store under train.output_dir (MLflow 3
    refuses its old file store by default)."""
    return exp.tracking.mlflow_tracking_uri or f"sqlite:///{Path(exp.train.output_dir).resolve() / 'mlflow.db'}"


def mlflow_experiment(client, exp: Experiment, name: str) -> str:
    """The id of MLflow experiment `name`, made if missing; with the local store its artifacts
    go beside it (train.output_dir/mlartifacts), not into the working directory."""
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    local = None if exp.tracking.mlflow_tracking_uri else (Path(exp.train.output_dir).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=local)


def flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, values as text (MLflow keeps 6,000 chars)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_params(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


def metric_key(name: str) -> str:
    """MLflow metric names allow letters, digits, _ - . / and spaces: `acc@0.5` -> `acc_0.5`."""
    return re.sub(r"[^\w\-./ ]", "_", name)


def flat_metrics(d: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested results dict, with dotted names."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_metrics(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[metric_key(key)] = float(v)
    return out


class RunLog:
    """One tracked run; does nothing when tracking.log_to is empty."""

    def __init__(self, exp: Experiment, run_name: str, run_dir: str | Path, kind: str):
        self.client = self.run_id = self.writer = None
        self.queued: list = []  # MLflow's RunOperations of the metrics logged without waiting
        run_dir = Path(run_dir)
        if "mlflow" in exp.tracking.log_to:
            try:
                from mlflow import MlflowClient  # optional: only when tracking.log_to has it
            except ImportError as err:
                raise ImportError("tracking.log_to has mlflow but mlflow is not installed: pip install mlflow") from err
            self.client = MlflowClient(tracking_uri=mlflow_uri(exp))
            experiment_id = mlflow_experiment(self.client, exp, exp.name)
            id_file = run_dir / "mlflow_run_id"
            if id_file.is_file():
                self.run_id = id_file.read_text().strip()
            else:
                run = self.client.create_run(experiment_id, run_name=run_name, tags={"m4cxr.kind": kind})
                self.run_id = run.info.run_id
                run_dir.mkdir(parents=True, exist_ok=True)
                id_file.write_text(self.run_id)
        if "tensorboard" in exp.tracking.log_to:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: needs tensorboard
            except ImportError as err:
                raise ImportError("tracking.log_to has tensorboard but tensorboard is not installed: "
                                  "pip install tensorboard") from err
            # flushed every 10 s by its own thread, not by the training loop
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), flush_secs=10)

    def params(self, values: dict[str, Any]) -> None:
        if self.client:
            from mlflow.entities import Param  # mlflow is optional (tracking.log_to)

            items = [Param(k, str(v)) for k, v in values.items()]
            for start in range(0, len(items), 100):  # MLflow takes 100 params per call
                self.client.log_batch(self.run_id, params=items[start:start + 100])

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.client:
            from mlflow.entities import Metric  # mlflow is optional (tracking.log_to)

            now = int(time.time() * 1000)
            items = [Metric(metric_key(k), float(v), now, step) for k, v in values.items()]
            # queued, not written in the training loop (a synchronous write to SQLite took 9 ms a
            # step); a killed worker loses at most the queue, whose steps its restart trains again
            for start in range(0, len(items), 1000):
                self.queued.append(self.client.log_batch(self.run_id, metrics=items[start:start + 1000],
                                                         synchronous=False))
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, float(v), step)

    def tag(self, key: str, value: str) -> None:
        if self.client:
            self.client.set_tag(self.run_id, key, value)

    def artifact(self, path: str | Path) -> None:
        if self.client:
            self.client.log_artifact(self.run_id, str(path))

    def flush(self) -> None:
        """Write what is queued; the run stays open (a stopped run goes on in its next allocation)."""
        for operation in self.queued:  # this run's queue (mlflow.flush_async_logging would
            operation.wait()          # flush, and create, the default store ./mlflow.db)
        self.queued = []
        if self.writer:
            self.writer.flush()

    def finish(self) -> None:
        self.flush()
        if self.client:
            self.client.set_terminated(self.run_id, "FINISHED")
        if self.writer:
            self.writer.close()
