"""The Ray Train loop of both stages (runs in every worker).

AdamW (betas, eps, weight decay from the config), linear warm-up then cosine decay over
max_steps, gradient clipping, gradient accumulation (micro batch x workers x accumulation =
global batch), bf16 autocast on GPU, optional DeepSpeed. A step's loss is the mean over all
its next-token targets, the same whether its samples are padded or packed (data.packing); it is
logged per task type, each packed sample's targets counted for its own task. A
checkpoint every `train.checkpoint_every` steps goes through ray.train.report; a restarted
worker resumes from ray.train.get_checkpoint() with model, optimiser, scheduler and step, and
builds its slice of the mixture stream from that step (data/pipeline.py): whatever checkpoint
Ray Train restores, every stream position after it is trained once, in order.

`train_loop_per_worker` reads as the outline of a run: join the worker group, build the model
and optimiser, restore a checkpoint, open the logs, validate once, then step through the stream
(check its positions, train, log, validate now and then, checkpoint) and save the final model.
The state a worker carries through it is one `Worker`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
import ray.train
import ray.train.torch
import torch

from m4cxr.config import Experiment, experiment_from_dict
from m4cxr.data.pipeline import step_batches, train_stream, worker_positions
from m4cxr.model.checkpoint import load_checkpoint, save_checkpoint
from m4cxr.model.m4cxr import add_lora, build_model, describe_counts
from m4cxr.model.tokenizer import load_tokenizer
from m4cxr.tracking import RunLog, flat_params

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
STOP_FILE = "STOP"  # in the run folder: checkpoint at the next step and end (see stop_requested)


# ----------------------------------------------------------------------------- the run's outline


def train_loop_per_worker(config: dict) -> None:
    """One worker's part of training one stage, from start (or restart) to the final model."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # our own progress lines say enough
    w = join_worker_group(config)
    build(w)
    restored = restore(w)
    open_logs(w, restored)
    distribute(w)
    if w.val_loss_first is None:  # a fresh run
        w.val_loss_first = validate(w)
        w.say(f"validation loss before training: {w.val_loss_first:.4f}")
    positions, stream = open_stream(w)
    w.resumed_from = w.step
    w.model.train()
    w.started = time.time()
    for rows in stream.iter_batches(batch_size=w.rows_per_step, batch_format="numpy", prefetch_batches=2):
        if w.at_end:
            break
        check_positions(w, rows, positions)
        train_loss, by_type = train_step(w, read_step(w, rows))
        metrics = step_metrics(w, train_loss, by_type)
        if (w.exp.train.eval_every and w.step % w.exp.train.eval_every == 0) or w.at_end:
            metrics["val_loss"] = validate(w)
        log_step(w, metrics, by_type)
        stop = stop_requested(w)
        if w.step % w.exp.train.checkpoint_every == 0 or w.at_end or stop:
            report_checkpoint(w, metrics)
        elif w.step % w.exp.train.log_every == 0:
            ray.train.report(metrics)
        if stop and not w.at_end:
            if w.run_log:
                w.run_log.flush()
            w.say(f"stopped on request at step {w.step}, its checkpoint saved: the run goes on from there")
            return
    if w.step < w.stage.training_steps:
        raise RuntimeError(f"the training stream ended at step {w.step} of {w.stage.training_steps}")
    save_final_model(w)


@dataclass
class Worker:
    """What one worker carries through a run: its place in the group, what it trains, and how
    far the run has got."""
    config: dict  # run_stage's train_loop_config
    exp: Experiment
    stage_name: str
    rank: int
    world: int
    device: torch.device
    accum: int  # micro-batches per optimizer step
    model: Any = None  # the M4CXR model itself
    engine: Any = None  # DeepSpeed's engine when train.deepspeed is set: it owns the optimizer step
    wrapped: Any = None  # what the forward pass calls: the engine, DDP's wrapper, or the model
    params: list = field(default_factory=list)
    optimizer: Any = None
    scheduler: Any = None
    run_log: RunLog | None = None  # the first worker's MLflow / TensorBoard run
    val_batches: list[dict] = field(default_factory=list)  # read when first needed
    # what a checkpoint carries besides model, optimizer and scheduler
    step: int = 0
    history: list = field(default_factory=list)
    errors_seen: int = 0
    rows_seen: int = 0
    val_loss_first: float | None = None
    # this attempt: the step it resumed from, its start, its tokens
    resumed_from: int = 0
    started: float = 0.0
    tokens_real: int = 0
    tokens_padded: int = 0

    @property
    def stage(self):
        return getattr(self.exp.train, self.stage_name)

    @property
    def micro(self) -> int:
        return self.exp.train.micro_batch_size

    @property
    def rows_per_step(self) -> int:
        return self.micro * self.accum

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def at_end(self) -> bool:
        return self.step >= self.stage.training_steps

    @property
    def metrics_file(self) -> Path:
        return Path(self.config["run_dir"]) / "metrics.jsonl"

    def say(self, msg: str, level: int = logging.INFO) -> None:
        """A progress line, from the first worker only."""
        if self.rank == 0:
            logger.log(level, "[%s] %s", self.stage_name, msg)


# ----------------------------------------------------------------------------- setup


def join_worker_group(config: dict) -> Worker:
    """This worker's place in the group, with the batch settings checked against its size."""
    exp = experiment_from_dict(config["experiment"], config.get("source", "<train config>"))
    stage_name = config["stage"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    logger.info("[%s] worker %s of %s on node %s (node rank %s)", stage_name, rank, world,
                ray.get_runtime_context().get_node_id()[:12], ctx.get_node_rank())
    return Worker(config, exp, stage_name, rank, world, device, accumulation_steps(exp, stage_name, world))


def accumulation_steps(exp: Experiment, stage_name: str, world: int) -> int:
    """Micro-batches per optimizer step: global batch = micro batch x workers x accumulation."""
    micro, stage = exp.train.micro_batch_size, getattr(exp.train, stage_name)
    if exp.data.packing and exp.train.deepspeed:
        # DeepSpeed steps the optimizer every `accumulation` micro-batches; a packed step has as
        # many micro-batches as its samples fill
        raise ValueError("data.packing does not work with train.deepspeed; set one of them off")
    if exp.data.packing and not exp.data.length_grouping:
        # first-fit decreasing orders a step's samples by length; random micro-batches cannot be kept
        raise ValueError("data.length_grouping=false cannot be honoured with data.packing, which packs by length; "
                         "set one of them back")
    if stage.global_batch_size % (micro * world):
        raise ValueError(f"train.{stage_name}.global_batch_size {stage.global_batch_size} is not a multiple of "
                         f"train.micro_batch_size {micro} x {world} workers")
    return stage.global_batch_size // (micro * world)


def build(w: Worker) -> None:
    """The model with this stage's trainable parts, AdamW and the warm-up/cosine schedule (and
    DeepSpeed's engine around them when train.deepspeed is set)."""
    torch.manual_seed(w.exp.train.seed)  # the same frozen random weights on every (re)start
    w.model = load_or_build_model(w)
    counts = w.model.set_trainable(w.stage.trainable)
    w.say(f"trainable parameters: {describe_counts(counts)}; "
          f"accumulation {w.accum} x micro batch {w.micro} x {w.world} worker(s)")
    w.model.to(w.device)
    w.params = [p for p in w.model.parameters() if p.requires_grad]
    w.optimizer = torch.optim.AdamW(w.params, lr=w.stage.lr, betas=tuple(w.exp.train.betas), eps=w.exp.train.eps,
                                    weight_decay=w.stage.weight_decay)
    w.scheduler = torch.optim.lr_scheduler.LambdaLR(w.optimizer,
                                                    warmup_cosine(w.stage.warmup_steps, w.stage.max_steps))
    if w.exp.train.deepspeed:  # DeepSpeed owns the optimizer step, accumulation and clipping
        w.engine = deepspeed_engine(w.exp, w.model, w.optimizer, w.scheduler, w.micro, w.accum, w.on_gpu)


def load_or_build_model(w: Worker):
    """The previous stage's model (init_checkpoint), with its LoRA folded in when this stage asks
    for another adapter; else a new model."""
    init = w.config.get("init_checkpoint")
    if not init:
        return build_model(w.exp, load_tokenizer(w.config["tokenizer_dir"]), on_gpu=w.on_gpu)
    model, _ = load_checkpoint(init, trainable=True)
    if lora_differs(model, w.exp):
        base = model.llm.merge_and_unload() if hasattr(model.llm, "merge_and_unload") else model.llm
        model.llm = add_lora(base, w.exp.model)
        w.say(f"LoRA of {init} merged; a new adapter as model.lora asks (r {w.exp.model.lora.r})")
    return model


def restore(w: Worker) -> bool:
    """Resume from the checkpoint Ray Train hands a restarted worker; False when there is none."""
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return False
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, weights_only=False)
        if w.engine is not None:
            w.engine.load_checkpoint(folder, tag="engine")
    if w.engine is None:
        missing = set(state["model"]) - {n for n, _ in w.model.named_parameters()}
        if missing:
            raise RuntimeError(f"the checkpoint does not fit the model: unknown parameters {sorted(missing)[:5]}")
        w.model.load_state_dict(state["model"], strict=False)
        w.optimizer.load_state_dict(state["optimizer"])
        w.scheduler.load_state_dict(state["scheduler"])
    w.step, w.history = state["step"], state["history"]
    w.errors_seen, w.rows_seen, w.val_loss_first = state["errors_seen"], state["rows_seen"], state["val_loss_first"]
    return True


def training_state(w: Worker) -> dict:
    """What the first worker writes to STATE_FILE (restore reads it back); under DeepSpeed the
    engine saves model and optimizer itself."""
    return {"model": trainable_state(w.model) if w.engine is None else {},
            "optimizer": w.optimizer.state_dict() if w.engine is None else {},
            "scheduler": w.scheduler.state_dict(), "step": w.step,
            "history": w.history, "errors_seen": w.errors_seen, "rows_seen": w.rows_seen,
            "val_loss_first": w.val_loss_first}


def open_logs(w: Worker, restored: bool) -> None:
    """On the first worker: metrics.jsonl (saying what a restart costs) and MLflow / TensorBoard,
    as tracking.log_to asks (a sweep's trials are logged by Tune instead)."""
    if w.rank != 0:
        return
    logged = [json.loads(line)["step"] for line in w.metrics_file.read_text().splitlines()] \
        if w.metrics_file.exists() else []
    if logged:  # a restart: say what it costs
        again = f"; steps {w.step + 1}-{max(logged)} are trained again" if max(logged) > w.step else ""
        w.say(f"resumed from the checkpoint at step {w.step} "
              f"(stream position {w.step * w.stage.global_batch_size}){again}")
    w.metrics_file.touch()
    if w.config.get("track", True):
        w.run_log = RunLog(w.exp, Path(w.config["run_dir"]).name, w.config["run_dir"], kind=w.stage_name)
        if not restored:
            w.run_log.params(flat_params(w.config["experiment"]))
            w.run_log.tag("run_dir", w.config["run_dir"])


def distribute(w: Worker) -> None:
    """What the forward pass calls: DeepSpeed's engine, DDP's wrapper over several workers, or
    the model itself."""
    w.wrapped = w.engine or w.model
    if w.engine is None and w.world > 1:
        # a micro-batch without images (text-only tasks) leaves the vision tower without gradients
        # on that rank while another rank's has them: DDP must look for unused parameters
        w.wrapped = ray.train.torch.prepare_model(w.model, move_to_device=False,
                                                  parallel_strategy_kwargs={"find_unused_parameters": True})


def open_stream(w: Worker):
    """This worker's slice of the mixture stream from the restored step on, and the stream
    positions it must bring, in order. Built from the restored step, never from state that could
    run ahead of the checkpoint (a marker written after a report the controller missed)."""
    positions = worker_positions(w.step, w.stage.training_steps, w.stage.global_batch_size, w.rank, w.world)
    data_context = ray.data.DataContext.get_current()
    data_context.execution_options.preserve_order = True
    data_context.enable_progress_bars = False  # the step lines are the progress
    stream = train_stream(w.exp, w.stage_name, w.config["corpus_dir"], w.config["tokenizer_dir"],
                          w.exp.model.projector.num_query_tokens, positions)
    return positions, stream


# ----------------------------------------------------------------------------- a step


def micro_batches(w: Worker, rows: dict, group_by_length: bool = True) -> tuple[list[dict], dict]:
    """Rows -> padded (or packed, with data.packing) micro-batches, and their counts."""
    pack_to = w.exp.train.max_seq_len if w.exp.data.packing else 0
    return step_batches(rows, w.micro, w.model.tokenizer.pad_token_id, w.exp.data.image_size,
                        w.exp.model.image_mean, w.exp.model.image_std, group_by_length, pack_to)


def forward(w: Worker, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's per-sample summed loss and target counts (token_losses)."""
    def on_device(key):  # a packed batch has no attention_mask, a padded one no position_ids
        return None if batch.get(key) is None else batch[key].to(w.device)

    with torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=w.on_gpu and w.exp.train.precision == "bf16"):
        out = w.wrapped(input_ids=on_device("input_ids"), attention_mask=on_device("attention_mask"),
                        position_ids=on_device("position_ids"), pixel_values=on_device("pixel_values"))
    return token_losses(out.logits, batch["labels"].to(w.device), on_device("sample_index"))


def check_positions(w: Worker, rows: dict, positions: np.ndarray) -> None:
    """The step's rows must be the stream positions this worker trains in this step."""
    done = w.step - w.resumed_from
    expected = positions[done * w.rows_per_step:(done + 1) * w.rows_per_step]
    if not np.array_equal(rows["position"], expected):
        got = rows["position"][:4].tolist()
        raise RuntimeError(f"worker {w.rank}: step {w.step + 1} got stream positions {got}..., "
                           f"expected {expected[:4].tolist()}...")


def read_step(w: Worker, rows: dict) -> list[dict]:
    """The step's micro-batches; the samples that failed are counted against data.error_budget."""
    batches, stats = micro_batches(w, rows, w.exp.data.length_grouping)
    w.rows_seen += stats["rows"]
    w.errors_seen += len(stats["errors"])
    for e in stats["errors"]:
        logger.warning("[%s] worker %s: sample skipped: %s", w.stage_name, w.rank, e)
    check_error_budget(w.errors_seen, w.stage.training_steps * w.rows_per_step, w.exp.data.error_budget,
                       stats["errors"])
    w.tokens_real += stats["tokens"]
    w.tokens_padded += stats["padded_tokens"]
    return batches


def train_step(w: Worker, batches: list[dict]) -> tuple[float, dict[str, list[float]]]:
    """Forward and backward over the step's micro-batches, then one optimizer step. Returns the
    step's loss and, per task type, [summed loss, targets]."""
    by_type: dict[str, list[float]] = {}
    loss_total, target_total = 0.0, 0
    targets = max(1, step_targets(batches))
    for k, batch in enumerate(batches):
        loss_sum, n = forward(w, batch)
        backward(w, loss_sum.sum() / targets, last_micro_batch=k == len(batches) - 1)  # the mean over all targets
        loss_total += float(loss_sum.sum())
        target_total += int(n.sum())
        for task_type, loss, count in zip(batch["task_type"], loss_sum.tolist(), n.tolist()):
            by_type.setdefault(task_type, [0.0, 0])
            by_type[task_type][0] += loss
            by_type[task_type][1] += count
    if w.engine is None:
        torch.nn.utils.clip_grad_norm_(w.params, w.exp.train.grad_clip)
        w.optimizer.step()
        w.scheduler.step()
        w.optimizer.zero_grad(set_to_none=True)
    w.step += 1
    train_loss = loss_total / max(1, target_total)
    w.history.append([w.step, train_loss])
    return train_loss, by_type


def backward(w: Worker, loss: torch.Tensor, last_micro_batch: bool) -> None:
    if w.engine is not None:
        w.engine.backward(loss * w.accum)  # DeepSpeed divides each micro-batch's loss by accum
        w.engine.step()
        return
    # DDP: all-reduce the gradients once per step, on the last micro-batch
    defer = w.world > 1 and not last_micro_batch
    with w.wrapped.no_sync() if defer else contextlib.nullcontext():
        loss.backward()


def validate(w: Worker) -> float:
    """The mean next-token loss over the validation set."""
    if not w.val_batches:  # read when first needed: a restarted worker may not validate until the end
        for rows in ray.train.get_dataset_shard("val").iter_batches(batch_size=w.micro * 4, batch_format="numpy"):
            batches, stats = micro_batches(w, rows)
            for e in stats["errors"]:
                w.say(f"validation sample skipped: {e}", logging.WARNING)
            w.val_batches.extend(batches)
    w.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in w.val_batches:
            loss_sum, n = forward(w, batch)
            total += float(loss_sum.sum())
            count += int(n.sum())
    w.model.train()
    return total / max(1, count)


# ----------------------------------------------------------------------------- logging and checkpoints


def step_metrics(w: Worker, train_loss: float, by_type: dict[str, list[float]]) -> dict:
    """The step's row of metrics.jsonl. The lineage: step s trained stream positions
    [first_position, position) over all workers."""
    now = time.time()
    metrics = {"step": w.step, "loss": train_loss, "lr": w.scheduler.get_last_lr()[0],
               "first_position": (w.step - 1) * w.stage.global_batch_size,
               "position": w.step * w.stage.global_batch_size,
               "resumed_from": w.resumed_from, "time": now,
               "nonpad_token_share": w.tokens_real / max(1, w.tokens_padded), "skipped_samples": w.errors_seen,
               "samples_per_s": (w.step - w.resumed_from) * w.rows_per_step * w.world / max(1e-9, now - w.started),
               "val_loss_first": w.val_loss_first}
    for task_type, (loss, count) in by_type.items():
        metrics[f"loss_{task_type}"] = loss / max(1, count)
    return metrics


def log_step(w: Worker, metrics: dict, by_type: dict[str, list[float]]) -> None:
    """The step to MLflow / TensorBoard and metrics.jsonl, and every log_every steps a line."""
    if w.run_log:
        w.run_log.metrics({k: v for k, v in metrics.items() if k not in ("step", "time")}, w.step)
    if w.rank == 0:
        with open(w.metrics_file, "a") as f:
            f.write(json.dumps(metrics) + "\n")
    if w.step % w.exp.train.log_every == 0 or w.at_end:
        per_type = " ".join(f"{t} {loss / max(1, count):.3f}" for t, (loss, count) in sorted(by_type.items()))
        val = f" val {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
        w.say(f"step {w.step}/{w.stage.training_steps} loss {metrics['loss']:.4f} ({per_type}) "
              f"lr {metrics['lr']:.2e} non-pad {metrics['nonpad_token_share']:.2f}{val}")


def stop_requested(w: Worker) -> bool:
    """Whether the run folder holds STOP_FILE (train/run.py writes it on SIGUSR1: Slurm's warning
    before a time limit). Every worker gives the same answer at the same step, since a checkpoint
    report is a barrier that all of them must reach."""
    asked = (Path(w.config["run_dir"]) / STOP_FILE).exists()
    if w.world > 1:
        flag = torch.tensor([int(asked)], device=w.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        asked = bool(flag.item())
    return asked


def report_checkpoint(w: Worker, metrics: dict) -> None:
    """Report the step with a checkpoint: the first worker's STATE_FILE (and with DeepSpeed
    every worker's shard of the engine state; Ray merges the folders)."""
    with tempfile.TemporaryDirectory() as tmp:
        if w.engine is not None:  # every rank writes its shard of the DeepSpeed state
            w.engine.save_checkpoint(tmp, tag="engine")
        if w.rank == 0:
            torch.save(training_state(w), Path(tmp) / STATE_FILE)
        keeps = w.rank == 0 or w.engine is not None
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if keeps else None)


def save_final_model(w: Worker) -> None:
    with gathered_weights(w.engine, w.model):  # ZeRO-3 holds each weight in pieces across the ranks
        if w.rank == 0:
            save_checkpoint(w.model, w.exp, w.config["final_dir"])
            if w.run_log:
                w.run_log.tag("checkpoint", w.config["final_dir"])
                w.run_log.finish()
            w.say(f"final model: {w.config['final_dir']}")


# ---------------------------------------------------------------- schedule, losses, error budget


class DataBudgetExceeded(RuntimeError):
    pass


def check_error_budget(errors: int, planned: int, budget: float, recent: list[str]) -> None:
    """Stop the run once more than `budget` of the worker's planned samples have failed. The
    budget is a share of the whole run, so one bad sample early on does not stop it."""
    if errors > budget * planned:
        raise DataBudgetExceeded(
            f"{errors} failed samples, over data.error_budget {budget} of the {planned} this worker streams; "
            f"last: {recent[-1] if recent else '-'}")


def warmup_cosine(warmup: int, max_steps: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def token_losses(logits: torch.Tensor, labels: torch.Tensor,
                 sample_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed cross-entropy of the next-token targets, and the number of targets. A
    padded batch has one sample per row; a packed one says each position's sample (sample_index,
    -1 on padding), and each target counts for the sample it belongs to."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    ce = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="none",
    ).view(shift_labels.shape)
    targets = shift_labels != -100
    if sample_index is None:
        return ce.sum(1), targets.sum(1)
    owner = sample_index[:, 1:].to(ce.device)[targets]
    n_samples = int(sample_index.max()) + 1
    loss = ce.new_zeros(n_samples).index_add(0, owner, ce[targets])
    return loss, torch.bincount(owner, minlength=n_samples)


def step_targets(batches: list[dict]) -> int:
    """The next-token targets of a step's micro-batches. Each micro-batch's summed loss is divided
    by this, so a step's gradient is that of the mean over all its targets, whether its samples
    are padded or packed and however they fall into micro-batches."""
    return sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def lora_differs(model, exp) -> bool:
    """Whether the loaded model's LoRA adapter differs from the experiment's model.lora."""
    peft_config = getattr(model.llm, "peft_config", {}).get("default")
    if peft_config is None:
        return True
    want = exp.model.lora
    return (peft_config.r, peft_config.lora_alpha, peft_config.lora_dropout, set(peft_config.target_modules)) != \
        (want.r, want.alpha, want.dropout, set(want.target_modules))


# ----------------------------------------------------------------------------- DeepSpeed


def gathered_weights(engine, model):
    """Under ZeRO-3, a context in which every rank holds the full weights; otherwise nothing."""
    if engine is None or engine.zero_optimization_stage() != 3:
        return contextlib.nullcontext()
    import deepspeed  # optional (the gpu extra), and only wanted with train.deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def deepspeed_engine(exp, model, optimizer, scheduler, micro: int, accum: int, on_gpu: bool):
    """DeepSpeed ZeRO from the JSON file named by train.deepspeed (batch sizes, clipping and
    precision are set from the experiment so the two never disagree)."""
    try:
        import deepspeed  # optional (the gpu extra), and only wanted with train.deepspeed
    except ImportError as err:
        raise ImportError("train.deepspeed is set but DeepSpeed is not installed: pip install -e '.[gpu]'") from err
    ds_config = json.loads(Path(exp.train.deepspeed).read_text())
    ds_config.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum,
                     gradient_clipping=exp.train.grad_clip)
    ds_config["bf16"] = {"enabled": exp.train.precision == "bf16" and on_gpu}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine
