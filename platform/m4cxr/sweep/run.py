"""Sweeps with Ray Tune and Optuna: each trial is a short stage-2 fine-tune on Ray Train plus a
small evaluation on the validation split.

    trial (a Tune function trainable)
      -> the experiment with the trial's parameters (sweep/space.py), shortened to tune.trial_steps
      -> run_stage(...) builds a TorchTrainer; its reports reach Tune through
         ray.tune.integration.ray_train.TuneReportCallback (validation loss for ASHA)
      -> Ray Data batch inference on `validate` -> the objectives, reported with ray.tune.report
    search: OptunaSearch, NSGA-II over several objectives (multi) or TPE on their weighted sum
            with ASHA early stopping on validation loss (single)

A sweep lives in tune.output_dir/<name>; running it again with the same name continues it with
Tuner.restore: finished trials are kept, unfinished ones resume from their last checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.search.optuna import OptunaSearch

from m4cxr.config import Experiment, experiment_from_dict, to_dict

# What a trial can be judged by: "<task type>_<metric>" from the validation evaluation.
OBJECTIVES = ("mrg_mF1-14", "mrg_MF1-14", "mrg_BLEU-4", "mrg_ROUGE-L", "grounding_mIoU", "grounding_acc@0.5",
              "vqa_accuracy", "vqa_recall", "vqa_BLEU-1", "val_loss")
SINGLE = "objective"  # the weighted sum, in single-objective sweeps


def check_objectives(exp: Experiment) -> None:
    t = exp.tune
    for name in list(t.objectives) + list(t.weights):
        if name not in OBJECTIVES:
            raise ValueError(f"{exp.source}: tune objective {name!r} is not known; choose from {list(OBJECTIVES)}")
    if t.objective == "single" and not any(t.weights.get(k) for k in t.objectives):
        raise ValueError(f"{exp.source}: a single-objective sweep needs tune.weights for its objectives")


def trial_experiment(base: Experiment, params: dict[str, Any]) -> Experiment:
    """The experiment one trial trains: the parameters applied, stage 2 cut to tune.trial_steps."""
    from m4cxr.sweep.space import apply_params

    exp = apply_params(base, params)
    t, st = exp.tune, exp.train.instruction
    st.training_steps = st.max_steps = t.trial_steps
    st.warmup_steps = min(st.warmup_steps, max(1, t.trial_steps // 10))
    exp.train.eval_every = t.eval_every
    exp.train.log_every = min(exp.train.log_every, t.eval_every)
    exp.train.checkpoint_every = t.eval_every  # an interrupted trial resumes from here
    return exp


def validation_objectives(exp: Experiment, checkpoint: str, corpus_dir: str, out: Path) -> dict[str, float]:
    """The trial's model on the validation split: CoT report generation, grounding, VQA."""
    from m4cxr.eval.inference import run_inference
    from m4cxr.eval.scoring import score_predictions

    ev = copy.deepcopy(exp)
    ev.eval.split, ev.eval.cot, ev.eval.both_cot_modes, ev.eval.radgraph = "validate", True, False, False
    ev.eval.tasks = [task for task in ("single_image", "phrase_grounding", "vqa") if task in exp.eval.tasks]
    ev.eval.samples_per_task = exp.tune.eval_samples_per_task
    ev.eval.bootstrap_samples = 10
    results = score_predictions(ev, run_inference(ev, checkpoint, corpus_dir, out), corpus_dir)
    single = results["mrg"].get("single_image", {}).get("cot", {})
    ground = results["grounding"].get("phrase_grounding", {})
    vqa = results["vqa"].get("vqa", {})
    out_metrics = {f"mrg_{k}": single.get("uncertain_as_negative", {}).get(k, single.get(k))
                   for k in ("mF1-14", "MF1-14", "BLEU-4", "ROUGE-L")}
    out_metrics |= {f"grounding_{k}": ground.get(k) for k in ("mIoU", "acc@0.5")}
    out_metrics |= {f"vqa_{k}": vqa.get(k) for k in ("accuracy", "recall", "BLEU-1")}
    return {k: float(v) for k, v in out_metrics.items() if v is not None}


def weighted_objective(exp: Experiment, metrics: dict[str, float]) -> float:
    t = exp.tune
    return sum(t.weights.get(k, 0.0) * (1 if mode == "max" else -1) * metrics.get(k, 0.0)
               for k, mode in t.objectives.items())


class TrialReportCallback(TuneReportCallback):
    """Tune's report callback for a trial that a scheduler may stop: once the trial is stopped
    (its stop file exists) nobody reads Tune's one-item queue any more, so reports are dropped
    instead of blocking the Train run forever."""

    def __init__(self, stop_file: str):
        super().__init__()
        self.stop_file = stop_file

    def after_report(self, run_context, metrics, checkpoint) -> None:
        from ray.util.queue import Full

        item = dict(metrics[0], **({CHECKPOINT_PATH_KEY: checkpoint.path} if checkpoint else {}))
        while not Path(self.stop_file).exists():
            try:
                # Private to Ray 2.60's TuneReportCallback (no public way to drop a report for a
                # stopped trial). Kept only while early-stopping sweeps run one trial at a time:
                # with Ray's stock callback and two ASHA trials side by side on one node, later
                # trials' workers waited forever for CPUs (seen on Ray 2.60; no Ray issue found).
                self._training_actor_item_queue.put(item, timeout=1.0)
                return
            except Full:
                continue


def watch_for_stop(stop_file: Path) -> None:
    """When Tune stops this trial (ASHA), write the stop file: the Train workers see it and end,
    which frees their CPUs or GPUs for the next trial. Tune's stop is an event on the trial's
    session (the same private session TuneReportCallback uses). Private to Ray 2.60, kept for
    the reason given in TrialReportCallback."""
    from ray.train._internal.session import get_session

    session = get_session()

    def wait() -> None:
        session.stop_event.wait()
        stop_file.parent.mkdir(parents=True, exist_ok=True)
        stop_file.write_text("stopped by the sweep's scheduler\n")

    threading.Thread(target=wait, daemon=True).start()


def release_stopped_trials(exp: Experiment) -> int:
    """Remove the worker placement groups that trials stopped early left behind.

    When ASHA stops a trial, Tune ends the trial's actor, and with it the Train controller, but
    the placement group of its workers (owned by the sweep's driver) stays reserved on Ray 2.60,
    so the next trial would wait for it forever. Sweeps that stop trials run one trial at a
    time, so at the start of a trial any worker-shaped placement group but its own is a leftover.
    """
    import ray.util
    from ray.util.placement_group import PlacementGroup

    own = ray.util.get_current_placement_group()
    worker = {"CPU": float(exp.train.cpus_per_worker), **({"GPU": 1.0} if exp.train.use_gpu else {})}
    removed = 0
    for pg_id, info in ray.util.placement_group_table().items():
        if info["state"] != "CREATED" or (own is not None and pg_id == own.id.hex()):
            continue
        if all({k: float(v) for k, v in b.items()} == worker for b in info["bundles"].values()):
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
            removed += 1
    if removed:
        print(f"sweep: released {removed} placement group(s) of trials stopped early")
    return removed


def run_trial(params: dict[str, Any], base: dict, source: str, corpus_dir: str, sweep_dir: str) -> None:
    """One trial, run by Tune: fine-tune with the trial's settings, then measure the objectives."""
    import ray.tune

    from m4cxr.train.run import run_stage

    exp = trial_experiment(experiment_from_dict(copy.deepcopy(base), source), params)
    exp.train.output_dir = str(Path(sweep_dir) / "trials")
    name = ray.tune.get_context().get_trial_name()
    stop_file = Path(sweep_dir) / "trials" / name / "STOP"
    stop_file.unlink(missing_ok=True)  # a resumed trial runs on
    watch_for_stop(stop_file)
    if exp.tune.objective == "single" and exp.tune.early_stopping:
        release_stopped_trials(exp)
    init = exp.tune.init_checkpoint or None
    summary = run_stage(exp, "instruction", corpus_dir, init_checkpoint=init, run_name=name,
                        callbacks=[TrialReportCallback(str(stop_file))], stop_file=str(stop_file))
    if summary["stopped_early"]:
        return
    metrics = validation_objectives(exp, summary["checkpoint"], corpus_dir,
                                    Path(summary["run_dir"]) / "validation_predictions.parquet")
    metrics["val_loss"] = float(summary["val_loss_last"])
    metrics[SINGLE] = weighted_objective(exp, metrics)
    ray.tune.report({**metrics, "step": summary["steps"], "trial_checkpoint": summary["checkpoint"]})


class FinalResultOptunaSearch(OptunaSearch):
    """OptunaSearch that learns from each trial's final report only (the reports before it are
    training metrics, without the objectives)."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, str) and self.metric in result:
            super().on_trial_result(trial_id, result)


def trial_name(trial) -> str:
    """Short trial names (Tune's default puts every parameter in the folder name)."""
    return f"trial_{trial.trial_id}"


def searcher_and_scheduler(exp: Experiment):
    import optuna
    from ray.tune.schedulers import ASHAScheduler

    from m4cxr.sweep.space import DefineByRun

    t = exp.tune
    multi = t.objective == "multi"
    kind = t.sampler if t.sampler != "auto" else ("nsga2" if multi else "tpe")
    if kind == "nsga2":
        # the first generation is random: sized to the sweep so that small sweeps still evolve
        sampler = optuna.samplers.NSGAIISampler(seed=t.seed, population_size=max(2, min(50, t.num_trials // 2)))
    else:
        sampler = optuna.samplers.TPESampler(seed=t.seed, n_startup_trials=max(1, min(10, t.num_trials // 2)))
    if multi:
        search = FinalResultOptunaSearch(space=DefineByRun(t.space), metric=list(t.objectives),
                                     mode=list(t.objectives.values()), sampler=sampler)
        return search, None
    search = FinalResultOptunaSearch(space=DefineByRun(t.space), metric=SINGLE, mode="max", sampler=sampler)
    scheduler = ASHAScheduler(time_attr="step", metric="val_loss", mode="min", grace_period=t.grace_period,
                              reduction_factor=t.reduction_factor,
                              max_t=t.trial_steps + 1) if t.early_stopping else None  # +1: never stop the final report
    return search, scheduler


def logger_callbacks(exp: Experiment, sweep_dir: Path) -> list:
    out = []
    for name in exp.tune.log_to:
        if name == "tensorboard":
            try:
                import tensorboardX  # noqa: F401
            except ImportError as err:
                raise ImportError("tune.log_to has tensorboard but tensorboardX is not installed: "
                                  "pip install tensorboardX") from err
            from ray.tune.logger import TBXLoggerCallback

            out.append(TBXLoggerCallback())
        elif name == "mlflow":
            try:
                import mlflow  # noqa: F401
            except ImportError as err:
                raise ImportError("tune.log_to has mlflow but mlflow is not installed: pip install mlflow") from err
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            uri = exp.tune.mlflow_tracking_uri or f"file://{sweep_dir / 'mlruns'}"
            out.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=sweep_dir.name))
    return out


def run_sweep(exp: Experiment, name: str | None = None) -> dict:
    """Run (or continue) the sweep of an experiment's `tune` section; returns its summary."""
    from ray import tune

    from m4cxr.sweep.report import write_outputs
    from m4cxr.sweep.space import distributions
    from m4cxr.ray_cluster import init_ray

    check_objectives(exp)
    if exp.tune.objective == "single" and exp.tune.early_stopping and exp.tune.max_concurrent_trials > 1:
        raise ValueError(f"{exp.source}: early stopping (ASHA) runs one trial at a time here; set "
                         f"tune.max_concurrent_trials=1 (give each trial more workers instead) or "
                         f"tune.early_stopping=false")
    distributions(exp.tune.space)  # a bad space fails here, before any trial starts
    init_ray()
    name = name or f"{exp.name}-sweep"
    storage = Path(exp.tune.output_dir).resolve()
    sweep_dir = storage / name
    corpus_dir = str(Path(exp.data.corpus_dir).resolve())
    if exp.tune.init_checkpoint:
        exp = copy.deepcopy(exp)
        exp.tune.init_checkpoint = str(Path(exp.tune.init_checkpoint).resolve())
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=to_dict(exp), source=exp.source, corpus_dir=corpus_dir,
                             sweep_dir=str(sweep_dir)),
        {"cpu": exp.tune.cpus_per_trial})
    # the reports during training carry training metrics only; the objectives come with the
    # trial's last report, so Tune must not insist on them in every report
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    started = time.time()
    if tune.Tuner.can_restore(str(sweep_dir)):
        print(f"sweep: continuing {sweep_dir} (finished trials are kept)")
        tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True, resume_errored=True)
    else:
        search, scheduler = searcher_and_scheduler(exp)
        print(f"sweep: {exp.tune.num_trials} trials of {exp.tune.trial_steps} steps, "
              f"{exp.tune.objective}-objective over {list(exp.tune.objectives)} -> {sweep_dir}")
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=exp.tune.num_trials,
                                        max_concurrent_trials=exp.tune.max_concurrent_trials,
                                        trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(name=name, storage_path=str(storage),
                                      callbacks=logger_callbacks(exp, sweep_dir)),
        )
    grid = tuner.fit()
    summary = write_outputs(exp, grid, sweep_dir)
    summary["seconds"] = round(time.time() - started, 1)
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
