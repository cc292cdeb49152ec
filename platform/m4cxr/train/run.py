"""Driver side of training: the corpus's tokenizer, the Ray Data streams, the TorchTrainer.

`run_stage(exp, "pretrain" | "instruction", corpus_dir)` trains one stage and returns its
summary (validation loss first and last, steps, non-padding token share, final checkpoint).
Rerunning with the same run name resumes the run from its last checkpoint (Ray Train V2).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from m4cxr.config import Experiment, to_dict

STAGES = ("pretrain", "instruction")


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (e.g. under `ray job submit`), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


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
        from m4cxr.data.schema import read_sample_table
        from m4cxr.model.tokenizer import corpus_texts, train_tiny_tokenizer

        turns = read_sample_table(corpus_dir, "train").column("turns").to_pylist()
        tok = train_tiny_tokenizer(corpus_texts(turns), exp.model.tokenizer_vocab_size)
        tok.save_pretrained(path)
        print(f"prepare: trained a {len(tok)}-token BPE tokenizer on {corpus_dir} -> {path}")
    return str(path)


def run_stage(exp: Experiment, stage: str, corpus_dir: str | Path, init_checkpoint: str | None = None,
              run_name: str | None = None, inject_failure_at: int = -1, callbacks: list | None = None,
              stop_file: str | None = None) -> dict:
    """Train one stage; `inject_failure_at` makes the worker fail once at that step (to check
    that a run recovers from its last checkpoint); `callbacks` are Ray Train callbacks (a sweep
    passes Tune's report callback); the workers end early once `stop_file` exists."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from m4cxr.data.pipeline import train_stream, validation_set
    from m4cxr.train.loop import train_loop_per_worker

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; use one of {STAGES}")
    init_ray()
    st = getattr(exp.train, stage)
    corpus_dir = str(Path(corpus_dir).resolve())
    tok_dir = prepare_tokenizer(exp, corpus_dir)
    storage = Path(exp.train.output_dir).resolve()
    name = run_name or f"{exp.name}-{stage}"
    run_dir = storage / name
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = str(run_dir / "stream_position.json")
    tokens_per_image = exp.model.projector.num_query_tokens
    total = st.training_steps * st.global_batch_size
    datasets = {
        "train": train_stream(exp, stage, corpus_dir, tok_dir, tokens_per_image, total, marker),
        "val": validation_set(exp, stage, corpus_dir, tok_dir, tokens_per_image),
    }
    config = {"experiment": to_dict(exp), "source": exp.source, "stage": stage, "tokenizer_dir": tok_dir,
              "init_checkpoint": str(Path(init_checkpoint).resolve()) if init_checkpoint else "", "marker": marker, "run_dir": str(run_dir),
              "final_dir": str(run_dir / "final"), "inject_failure_at": inject_failure_at,
              "stop_file": str(stop_file or "")}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=exp.train.num_workers, use_gpu=exp.train.use_gpu,
                                     resources_per_worker={"CPU": exp.train.cpus_per_worker,
                                                           **({"GPU": 1} if exp.train.use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=exp.train.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=exp.train.max_failures),
                             callbacks=callbacks or []),
        datasets=datasets,
        # the training stream keeps its order, so a run is reproducible and resumable
        dataset_config=DataConfig(datasets_to_split=["train"],
                                  execution_options={"train": ExecutionOptions(preserve_order=True),
                                                     "val": ExecutionOptions(preserve_order=True)}),
    )
    started = time.time()
    result = trainer.fit()
    if result.error:
        raise result.error
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = history[-1]
    summary = {
        "stage": stage, "steps": last["step"], "val_loss_first": last["val_loss_first"],
        "val_loss_last": last.get("val_loss"), "loss_last": last["loss"],
        "stopped_early": bool(stop_file) and Path(stop_file).exists(),
        "nonpad_token_share": round(last["nonpad_token_share"], 4), "skipped_samples": last["skipped_samples"],
        "checkpoint": config["final_dir"], "run_dir": str(run_dir), "seconds": round(time.time() - started, 1),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
