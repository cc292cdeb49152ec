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
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from m4cxr.config import experiment_from_dict
from m4cxr.data.pipeline import step_batches, train_stream, worker_positions
from m4cxr.model.m4cxr import describe_counts
from m4cxr.tracking import RunLog, flat_params

STATE_FILE = "train_state.pt"


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


def train_loop_per_worker(config: dict) -> None:
    import logging

    import ray
    import ray.data
    import ray.train
    import ray.train.torch

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # our own progress lines say enough

    from m4cxr.model.checkpoint import load_checkpoint, save_checkpoint
    from m4cxr.model.m4cxr import build_model
    from m4cxr.model.tokenizer import load_tokenizer

    exp = experiment_from_dict(config["experiment"], config.get("source", "<train config>"))
    stage_name = config["stage"]
    stage = getattr(exp.train, stage_name)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    say = (lambda msg: print(f"[{stage_name}] {msg}", flush=True)) if rank == 0 else (lambda msg: None)
    print(f"[{stage_name}] worker {rank} of {world} on node {ray.get_runtime_context().get_node_id()[:12]} "
          f"(node rank {ctx.get_node_rank()})", flush=True)

    micro = exp.train.micro_batch_size
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
    accum = stage.global_batch_size // (micro * world)

    torch.manual_seed(exp.train.seed)  # the same frozen random weights on every (re)start
    if config.get("init_checkpoint"):
        model, _ = load_checkpoint(config["init_checkpoint"], trainable=True)
        if lora_differs(model, exp):  # this stage asks for another adapter: fold the old one in
            from m4cxr.model.m4cxr import add_lora

            base = model.llm.merge_and_unload() if hasattr(model.llm, "merge_and_unload") else model.llm
            model.llm = add_lora(base, exp.model)
            say(f"LoRA of {config['init_checkpoint']} merged; a new adapter as model.lora asks (r {exp.model.lora.r})")
    else:
        model = build_model(exp, load_tokenizer(config["tokenizer_dir"]), on_gpu=on_gpu)
    counts = model.set_trainable(stage.trainable)
    say(f"trainable parameters: {describe_counts(counts)}; accumulation {accum} x micro batch {micro} x {world} worker(s)")
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=tuple(exp.train.betas), eps=exp.train.eps,
                                  weight_decay=stage.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(stage.warmup_steps, stage.max_steps))

    step, history = 0, []
    errors_seen, rows_seen, val_first = 0, 0, None
    engine = None
    if exp.train.deepspeed:  # DeepSpeed owns the optimizer step, accumulation and clipping
        engine = deepspeed_engine(exp, model, optimizer, scheduler, micro, accum, on_gpu)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, weights_only=False)
            if engine is not None:
                engine.load_checkpoint(folder, tag="engine")
        if engine is None:
            missing = set(state["model"]) - {n for n, _ in model.named_parameters()}
            if missing:
                raise RuntimeError(f"the checkpoint does not fit the model: unknown parameters {sorted(missing)[:5]}")
            model.load_state_dict(state["model"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        step, history = state["step"], state["history"]
        errors_seen, rows_seen, val_first = state["errors_seen"], state["rows_seen"], state["val_loss_first"]
    metrics_file = Path(config["run_dir"]) / "metrics.jsonl"
    if rank == 0:
        logged = [json.loads(line)["step"] for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
        if logged:  # a restart: say what it costs
            again = f"; steps {step + 1}-{max(logged)} are trained again" if max(logged) > step else ""
            say(f"resumed from the checkpoint at step {step} (stream position {step * stage.global_batch_size}){again}")
        metrics_file.touch()
    # MLflow / TensorBoard, as tracking.log_to asks (a sweep's trials are logged by Tune instead)
    run_log = RunLog(exp, Path(config["run_dir"]).name, config["run_dir"], kind=stage_name) \
        if rank == 0 and config.get("track", True) else None
    if run_log and not checkpoint:
        run_log.params(flat_params(config["experiment"]))
        run_log.tag("run_dir", config["run_dir"])

    core = model
    if engine is None and world > 1:
        # a micro-batch without images (text-only tasks) leaves the vision tower without gradients
        # on that rank while another rank's has them: DDP must look for unused parameters
        model = ray.train.torch.prepare_model(model, move_to_device=False,
                                              parallel_strategy_kwargs={"find_unused_parameters": True})

    def forward(batch):
        def on_device(key):  # a packed batch has no attention_mask, a padded one no position_ids
            return None if batch.get(key) is None else batch[key].to(device)

        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu and exp.train.precision == "bf16"):
            out = (engine or model)(input_ids=on_device("input_ids"), attention_mask=on_device("attention_mask"),
                                    position_ids=on_device("position_ids"), pixel_values=on_device("pixel_values"))
        return token_losses(out.logits, batch["labels"].to(device), on_device("sample_index"))

    pad_id = core.tokenizer.pad_token_id
    pack_to = exp.train.max_seq_len if exp.data.packing else 0
    val_batches: list[dict] = []

    def validate() -> float:
        if not val_batches:  # read when first needed: a restarted worker may not validate until the end
            for rows in ray.train.get_dataset_shard("val").iter_batches(batch_size=micro * 4, batch_format="numpy"):
                batches, stats = step_batches(rows, micro, pad_id, exp.data.image_size, exp.model.image_mean,
                                              exp.model.image_std, pack_to=pack_to)
                for e in stats["errors"]:
                    say(f"validation sample skipped: {e}")
                val_batches.extend(batches)
        core.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in val_batches:
                loss_sum, n = forward(batch)
                total += float(loss_sum.sum())
                count += int(n.sum())
        core.train()
        return total / max(1, count)

    if val_first is None:  # a fresh run
        val_first = validate()
        say(f"validation loss before training: {val_first:.4f}")

    # this worker's slice of the stream from the restored step on, never from state that could
    # run ahead of the checkpoint (a marker written after a report the controller missed)
    rows_per_step = micro * accum
    positions = worker_positions(step, stage.training_steps, stage.global_batch_size, rank, world)
    data_context = ray.data.DataContext.get_current()
    data_context.execution_options.preserve_order = True
    data_context.enable_progress_bars = False  # the step lines are the progress
    stream = train_stream(exp, stage_name, config["corpus_dir"], config["tokenizer_dir"],
                          exp.model.projector.num_query_tokens, positions)
    resumed_from = step
    core.train()
    started, tokens_real, tokens_padded, first_step = time.time(), 0, 0, step
    metrics: dict = {}
    for rows in stream.iter_batches(batch_size=rows_per_step, batch_format="numpy", prefetch_batches=2):
        if step >= stage.training_steps:
            break
        expected = positions[(step - resumed_from) * rows_per_step:(step - resumed_from + 1) * rows_per_step]
        if not np.array_equal(rows["position"], expected):
            raise RuntimeError(f"worker {rank}: step {step + 1} got stream positions {rows['position'][:4].tolist()}..., "
                               f"expected {expected[:4].tolist()}...")
        batches, stats = step_batches(rows, micro, pad_id, exp.data.image_size, exp.model.image_mean,
                                      exp.model.image_std, exp.data.length_grouping, pack_to)
        rows_seen += stats["rows"]
        errors_seen += len(stats["errors"])
        for e in stats["errors"]:
            print(f"[{stage_name}] worker {rank}: sample skipped: {e}", flush=True)
        check_error_budget(errors_seen, stage.training_steps * rows_per_step, exp.data.error_budget, stats["errors"])
        tokens_real += stats["tokens"]
        tokens_padded += stats["padded_tokens"]
        by_type: dict[str, list[float]] = {}
        step_loss_sum, step_tokens = 0.0, 0
        targets = max(1, step_targets(batches))
        for k, batch in enumerate(batches):
            loss_sum, n = forward(batch)
            loss = loss_sum.sum() / targets  # the step's loss is the mean over all its targets
            if engine is not None:
                engine.backward(loss * accum)  # DeepSpeed divides each micro-batch's loss by accum
                engine.step()
            else:
                # DDP: all-reduce the gradients once per step, on the last micro-batch
                defer = world > 1 and k < len(batches) - 1
                with model.no_sync() if defer else contextlib.nullcontext():
                    loss.backward()
            step_loss_sum += float(loss_sum.sum())
            step_tokens += int(n.sum())
            for t, ls, nn_ in zip(batch["task_type"], loss_sum.tolist(), n.tolist()):
                by_type.setdefault(t, [0.0, 0])
                by_type[t][0] += ls
                by_type[t][1] += nn_
        if engine is None:
            torch.nn.utils.clip_grad_norm_(params, exp.train.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        train_loss = step_loss_sum / max(1, step_tokens)
        history.append([step, train_loss])
        # the lineage: step s trained positions [first_position, position) over all workers
        metrics = {"step": step, "loss": train_loss, "lr": scheduler.get_last_lr()[0],
                   "first_position": (step - 1) * stage.global_batch_size, "position": step * stage.global_batch_size,
                   "resumed_from": resumed_from, "time": time.time(),
                   "nonpad_token_share": tokens_real / max(1, tokens_padded), "skipped_samples": errors_seen,
                   "samples_per_s": (step - first_step) * rows_per_step * world / max(1e-9, time.time() - started),
                   "val_loss_first": val_first}
        for t, (ls, nn_) in by_type.items():
            metrics[f"loss_{t}"] = ls / max(1, nn_)
        last = step >= stage.training_steps
        if (exp.train.eval_every and step % exp.train.eval_every == 0) or last:
            metrics["val_loss"] = validate()
        if run_log:
            run_log.metrics({k: v for k, v in metrics.items() if k not in ("step", "time")}, step)
        if rank == 0:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if step % exp.train.log_every == 0 or last:
            per_type = " ".join(f"{t} {ls / max(1, nn_):.3f}" for t, (ls, nn_) in sorted(by_type.items()))
            say(f"step {step}/{stage.training_steps} loss {train_loss:.4f} ({per_type}) lr {metrics['lr']:.2e} "
                f"non-pad {metrics['nonpad_token_share']:.2f}" + (f" val {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""))
        if step % exp.train.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory() as tmp:
                if engine is not None:  # every rank writes its shard of the DeepSpeed state
                    engine.save_checkpoint(tmp, tag="engine")
                if rank == 0:
                    torch.save({"model": trainable_state(core) if engine is None else {},
                                "optimizer": optimizer.state_dict() if engine is None else {},
                                "scheduler": scheduler.state_dict(), "step": step,
                                "history": history, "errors_seen": errors_seen, "rows_seen": rows_seen,
                                "val_loss_first": val_first}, Path(tmp) / STATE_FILE)
                # with DeepSpeed every rank's shard goes into the checkpoint (Ray merges the folders)
                keeps = rank == 0 or engine is not None
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if keeps else None)
        elif step % exp.train.log_every == 0:
            ray.train.report(metrics)
    if step < stage.training_steps:
        raise RuntimeError(f"the training stream ended at step {step} of {stage.training_steps}")
    with gathered_weights(engine, core):  # ZeRO-3 holds each weight in pieces across the ranks
        if rank == 0:
            save_checkpoint(core, exp, config["final_dir"])
            if run_log:
                run_log.tag("checkpoint", config["final_dir"])
                run_log.finish()
            say(f"final model: {config['final_dir']}")


def gathered_weights(engine, model):
    """Under ZeRO-3, a context in which every rank holds the full weights; otherwise nothing."""
    if engine is None or engine.zero_optimization_stage() != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def deepspeed_engine(exp, model, optimizer, scheduler, micro: int, accum: int, on_gpu: bool):
    """DeepSpeed ZeRO from the JSON file named by train.deepspeed (batch sizes, clipping and
    precision are set from the experiment so the two never disagree)."""
    try:
        import deepspeed
    except ImportError as err:
        raise ImportError("train.deepspeed is set but DeepSpeed is not installed: pip install -e '.[gpu]'") from err
    ds_config = json.loads(Path(exp.train.deepspeed).read_text())
    ds_config.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum,
                     gradient_clipping=exp.train.grad_clip)
    ds_config["bf16"] = {"enabled": exp.train.precision == "bf16" and on_gpu}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine
