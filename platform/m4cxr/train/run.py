"""Driver side of training: the corpus's tokenizer, the Ray Data streams, the TorchTrainer.

`run_stage(exp, "pretrain" | "instruction", corpus_dir)` trains one stage and returns its
summary (validation loss first and last, steps, non-padding token share, final checkpoint, the
restarts and what they cost). A failed worker or a lost node restarts the workers from the last
checkpoint (up to train.max_failures times); rerunning with the same run name resumes a stopped
run (Ray Train V2). Each worker streams its own samples (train/loop.py), so the trainer is given
the validation set only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

from ray.data import DataContext, ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from m4cxr.config import Experiment, to_dict
from m4cxr.data.pipeline import validation_set
from m4cxr.data.schema import read_sample_table
from m4cxr.model.checkpoint import read_info
from m4cxr.model.tokenizer import corpus_texts, train_tiny_tokenizer
from m4cxr.ray_cluster import init_ray
from m4cxr.train.lineage import lineage_problems, read_metrics, restart_costs, surviving_rows
from m4cxr.train.loop import STOP_FILE, train_loop_per_worker

logger = logging.getLogger(__name__)

STAGES = ("pretrain", "instruction")


def tokenizer_dir(exp: Experiment, corpus_dir: str | Path) -> str:
    """Where the run's tokenizer is: trained on the corpus ("train"), a folder, or the LLM's."""
    if exp.model.tokenizer == "train":
        path = Path(corpus_dir) / "tokenizer"
        if not (path / "tokenizer.json").exists():
            raise FileNotFoundError(
                f"{path}: no tokenizer trained for this corpus yet; run jobs/prepare_data.py "
                f"(or `m4cxr train` does it) first")
        return str(path)
    return exp.model.tokenizer or exp.model.llm


def prepare_tokenizer(exp: Experiment, corpus_dir: str | Path) -> str:
    """Train and save the corpus's tokenizer when the experiment asks for one (tiny runs)."""
    if exp.model.tokenizer != "train":
        return tokenizer_dir(exp, corpus_dir)
    path = Path(corpus_dir) / "tokenizer"
    if not (path / "tokenizer.json").exists():
        turns = read_sample_table(corpus_dir, "train").column("turns").to_pylist()
        tok = train_tiny_tokenizer(corpus_texts(turns), exp.model.tokenizer_vocab_size)
        tok.save_pretrained(path)
        logger.info(f"prepare: trained a {len(tok)}-token BPE tokenizer on {corpus_dir} -> {path}")
    return str(path)


def check_fits_checkpoint(exp: Experiment, checkpoint: str | Path) -> None:
    """The experiment's data settings must be the checkpoint's: the corpus is tokenised and its
    images resized by the experiment, the model was trained on its own."""
    info = read_info(checkpoint)
    settings = {"data.image_size": (exp.data.image_size, info["image_size"]),
                "data.box_convention": (exp.data.box_convention, info["box_convention"]),
                "model.projector.num_query_tokens": (exp.model.projector.num_query_tokens,
                                                     info["projector"]["num_query_tokens"])}
    differ = [f"{key} is {ours} but {theirs} in the checkpoint" for key, (ours, theirs) in settings.items() if ours != theirs]
    if differ:
        raise ValueError(f"{exp.source}: the experiment does not fit {checkpoint}: " + "; ".join(differ)
                         + " (set them with --set)")


def capacity_retries(wait_s: float) -> int:
    """Ray Train's controller_failure_limit for a wait of `wait_s` seconds: each attempt to
    place the workers waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default)."""
    if wait_s <= 0:
        return -1  # no limit
    attempt_s = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60))
    return max(1, math.ceil(wait_s / attempt_s))


def run_stage(exp: Experiment, stage: str, corpus_dir: str | Path, init_checkpoint: str | None = None,
              run_name: str | None = None, callbacks: list | None = None, track: bool = True) -> dict:
    """Train one stage; `callbacks` are Ray Train callbacks (a sweep passes Tune's report
    callback and track=False: Tune logs its trials itself)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; use one of {STAGES}")
    init_ray()
    corpus_dir = str(Path(corpus_dir).resolve())
    if init_checkpoint:  # a model reads its own ids and pixels: its tokenizer, image size and tokens per image
        tok_dir = str(Path(init_checkpoint) / "tokenizer")
        check_fits_checkpoint(exp, init_checkpoint)
    else:
        tok_dir = prepare_tokenizer(exp, corpus_dir)
    storage = Path(exp.train.output_dir).resolve()
    name = run_name or f"{exp.name}-{stage}"
    run_dir = storage / name
    run_dir.mkdir(parents=True, exist_ok=True)
    DataContext.get_current().enable_progress_bars = False  # the workers' step lines are the progress
    config = {"experiment": to_dict(exp), "source": exp.source, "stage": stage, "tokenizer_dir": tok_dir,
              "corpus_dir": corpus_dir, "init_checkpoint": str(Path(init_checkpoint).resolve()) if init_checkpoint else "",
              "run_dir": str(run_dir), "final_dir": str(run_dir / "final"), "track": track}
    trainer = torch_trainer(exp, config, name, storage, callbacks)
    started = time.time()
    with stop_on_signal(run_dir):
        result = trainer.fit()
    if result.error:
        raise result.error
    if not Path(config["final_dir"]).is_dir() and (run_dir / STOP_FILE).exists():
        raise StoppedEarly(f"[{stage}] stopped on request at step {surviving_rows(read_metrics(run_dir))[-1]['step']}; "
                           f"its checkpoint is in {run_dir}: the same command with --name {name} goes on from it")
    summary = stage_summary(exp, stage, run_dir, config["final_dir"], time.time() - started)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


class StoppedEarly(Exception):
    """The run stopped on request (SIGUSR1) after a checkpoint; rerun with its name to go on.
    Commands that train exit with `exit_code` then, which jobs/slurm.py requeues."""
    exit_code = 3


@contextlib.contextmanager
def stop_on_signal(run_dir: Path):
    """While training: SIGUSR1 (Slurm's warning before the time limit, `#SBATCH --signal`) asks
    the workers, through STOP_FILE in the run folder, which every node sees, to checkpoint at
    their next step and end. A STOP_FILE left by an earlier allocation is cleared first."""
    stop_file = run_dir / STOP_FILE
    stop_file.unlink(missing_ok=True)
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def ask_to_stop(signum, frame):
        logger.info("signal %s: the workers checkpoint at their next step and stop", signal.Signals(signum).name)
        stop_file.touch()

    before = signal.signal(signal.SIGUSR1, ask_to_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, before)


def torch_trainer(exp: Experiment, config: dict, name: str, storage: Path, callbacks: list | None) -> TorchTrainer:
    """The TorchTrainer of train/loop.py's workers, given the validation set only: each worker
    streams its own training samples."""
    tokens_per_image = exp.model.projector.num_query_tokens
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=exp.train.num_workers, use_gpu=exp.train.use_gpu,
                                     resources_per_worker={"CPU": exp.train.cpus_per_worker,
                                                           **({"GPU": 1} if exp.train.use_gpu else {})},
                                     placement_strategy=exp.train.placement_strategy),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=exp.train.keep_checkpoints),
                             failure_config=FailureConfig(
                                 max_failures=exp.train.max_failures,
                                 controller_failure_limit=capacity_retries(exp.train.capacity_wait_s)),
                             callbacks=callbacks or []),
        datasets={"val": validation_set(exp, config["stage"], config["corpus_dir"], config["tokenizer_dir"],
                                        tokens_per_image)},
        dataset_config=DataConfig(datasets_to_split=[], execution_options={"val": ExecutionOptions(preserve_order=True)}),
    )


def stage_summary(exp: Experiment, stage: str, run_dir: Path, final_dir: str, seconds: float) -> dict:
    """What metrics.jsonl says of the finished run: its last step, and the restarts and what they
    cost. A run must never end with stream positions untrained or trained twice."""
    st = getattr(exp.train, stage)
    rows = read_metrics(run_dir)
    last = surviving_rows(rows)[-1]
    restarts = restart_costs(rows)
    for r in restarts:
        logger.info(f"[{stage}] restart: resumed from the step-{r['resumed_from_step']} checkpoint, "
                    f"{r['steps_trained_again']} step(s) trained again, {r['seconds_lost']} s lost")
    problems = lineage_problems(rows, st.training_steps, st.global_batch_size)
    if problems:
        raise RuntimeError(f"{run_dir}/metrics.jsonl: incomplete stream lineage: {'; '.join(problems[:3])}")
    return {
        "stage": stage, "steps": last["step"], "val_loss_first": last["val_loss_first"],
        "val_loss_last": last.get("val_loss"), "loss_last": last["loss"],
        "nonpad_token_share": round(last["nonpad_token_share"], 4), "skipped_samples": last["skipped_samples"],
        "checkpoint": final_dir, "run_dir": str(run_dir), "seconds": round(seconds, 1),
        "restarts": len(restarts), "steps_trained_again": sum(r["steps_trained_again"] for r in restarts),
        "seconds_lost": round(sum(r["seconds_lost"] for r in restarts), 1), "restart_costs": restarts,
    }
