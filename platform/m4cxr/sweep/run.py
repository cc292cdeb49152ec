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
import logging
import os
import time
from pathlib import Path
from typing import Any

import optuna
import ray
import ray.data
from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.logger import TBXLoggerCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from m4cxr.config import Experiment, experiment_from_dict, to_dict
from m4cxr.eval.inference import run_inference
from m4cxr.eval.scoring import score_predictions
from m4cxr.ray_cluster import init_ray
from m4cxr.sweep.report import write_outputs
from m4cxr.sweep.space import DefineByRun, apply_params, distributions
from m4cxr.sweep.study import OBJECTIVES, SINGLE, TUNE_TRIAL, optuna_storage, tune_trial_name, weighted_objective
from m4cxr.tasks import headline_task, result_group
from m4cxr.tracking import flat_params, metric_key, mlflow_experiment, mlflow_uri
from m4cxr.train.run import run_stage

logger = logging.getLogger(__name__)


def check_objectives(exp: Experiment) -> None:
    t = exp.tune
    for name in list(t.objectives) + list(t.weights):
        if name not in OBJECTIVES:
            raise ValueError(f"{exp.source}: tune objective {name!r} is not known; choose from {list(OBJECTIVES)}")
    if t.objective == "single" and not any(t.weights.get(k) for k in t.objectives):
        raise ValueError(f"{exp.source}: a single-objective sweep needs tune.weights for its objectives")
    if t.objective == "single" and t.early_stopping and not 0 < t.grace_period < t.trial_steps:
        raise ValueError(f"{exp.source}: tune.grace_period ({t.grace_period}) must be between 0 and tune.trial_steps "
                         f"({t.trial_steps}) for ASHA to stop trials early; or set tune.early_stopping=false")


def trial_experiment(base: Experiment, params: dict[str, Any]) -> Experiment:
    """The experiment one trial trains: the parameters applied, stage 2 cut to tune.trial_steps."""
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
    report, box, answer = (headline_task(kind) for kind in ("report", "box", "answer"))
    ev = copy.deepcopy(exp)
    ev.eval.split, ev.eval.cot, ev.eval.both_cot_modes, ev.eval.radgraph = "validate", True, False, False
    ev.eval.grounded_reports = False  # not an objective: its questions would only slow the trial
    ev.eval.tasks = [task for task in (report, box, answer) if task in exp.eval.tasks]
    ev.eval.samples_per_task = exp.tune.eval_samples_per_task
    ev.eval.bootstrap_samples = 10
    results = score_predictions(ev, run_inference(ev, checkpoint, corpus_dir, out), corpus_dir)
    reports = results[result_group(report)].get(report, {}).get("cot", {})
    boxes = results[result_group(box)].get(box, {})
    answers = results[result_group(answer)].get(answer, {})
    out_metrics = {f"mrg_{k}": reports.get("uncertain_as_negative", {}).get(k, reports.get(k))
                   for k in ("mF1-14", "MF1-14", "BLEU-4", "ROUGE-L")}
    out_metrics |= {f"grounding_{k}": boxes.get(k) for k in ("mIoU", "acc@0.5")}
    out_metrics |= {f"vqa_{k}": answers.get(k) for k in ("accuracy", "recall", "BLEU-1")}
    return {k: float(v) for k, v in out_metrics.items() if v is not None}


def run_trial(params: dict[str, Any], base: dict, source: str, corpus_dir: str, sweep_dir: str) -> None:
    """One trial, run by Tune: fine-tune with the trial's settings, then measure the objectives."""
    exp = trial_experiment(experiment_from_dict(copy.deepcopy(base), source), params)
    exp.train.output_dir = str(Path(sweep_dir) / "trials")
    name = tune.get_context().get_trial_name()
    init = exp.tune.init_checkpoint or None
    # Tune's own callback takes the Train reports to Tune (ASHA's signal). When ASHA stops the
    # trial, Tune ends this actor and with it the Train controller; Ray Train's placement-group
    # cleaner (through the State API of the dashboard) then frees the workers' CPUs or GPUs for
    # the next trial.
    summary = run_stage(exp, "instruction", corpus_dir, init_checkpoint=init, run_name=name,
                        callbacks=[TuneReportCallback()], track=False)
    metrics = validation_objectives(exp, summary["checkpoint"], corpus_dir,
                                    Path(summary["run_dir"]) / "validation_predictions.parquet")
    metrics["val_loss"] = float(summary["val_loss_last"])
    metrics[SINGLE] = weighted_objective(exp, metrics)
    tune.report({**metrics, "step": summary["steps"], "trial_checkpoint": summary["checkpoint"]})


class FinalResultOptunaSearch(OptunaSearch):
    """OptunaSearch that learns from each trial's final report only (the reports before it are
    training metrics, without the objectives)."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, str) and self.metric in result:
            super().on_trial_result(trial_id, result)

    def suggest(self, trial_id: str) -> dict | None:
        """The trial's parameters; its Optuna trial records the Tune trial's name, by which the
        report finds it."""
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL, tune_trial_name(trial_id))
        return config


def trial_name(trial) -> str:
    """Tune's name and folder for a trial (short: Tune's default lists every parameter)."""
    return tune_trial_name(trial.trial_id)


def searcher_and_scheduler(exp: Experiment, sweep_dir: Path):
    """The Optuna searcher, its study in Optuna's own storage under the sweep's name, and ASHA
    for single-objective sweeps."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    study = {"storage": optuna.storages.RDBStorage(optuna_storage(exp, sweep_dir)), "study_name": sweep_dir.name}
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
                                         mode=list(t.objectives.values()), sampler=sampler, **study)
        return search, None
    search = FinalResultOptunaSearch(space=DefineByRun(t.space), metric=SINGLE, mode="max", sampler=sampler, **study)
    if not t.early_stopping:
        return search, None
    # ASHA's rungs sit at grace_period x reduction_factor^k below max_t. max_t one step short of
    # the trial's length keeps every rung before its last step, so a trial that trained to the
    # end is always validated; stop_last_trials=False keeps Tune from ending it at max_t.
    scheduler = ASHAScheduler(time_attr="step", metric="val_loss", mode="min", grace_period=t.grace_period,
                              reduction_factor=t.reduction_factor, max_t=t.trial_steps - 1, stop_last_trials=False)
    return search, scheduler


class TrialsToMLflow(MLflowLoggerCallback):
    """Tune's MLflow logger, with metric names MLflow accepts (acc@0.5 -> acc_0.5)."""

    def log_trial_result(self, iteration, trial, result):
        super().log_trial_result(iteration, trial, {metric_key(k): v for k, v in result.items()})


def logger_callbacks(exp: Experiment, sweep_dir: Path) -> list:
    """Tune's own loggers for tracking.log_to: each trial a run of the MLflow experiment named
    after the sweep, and TensorBoard event files in the trials' folders."""
    out = []
    for name in exp.tracking.log_to:
        # tensorboardX and mlflow are optional: imported only when asked for
        if name == "tensorboard":
            try:
                import tensorboardX  # noqa: F401
            except ImportError as err:
                raise ImportError("tracking.log_to has tensorboard but tensorboardX is not installed: "
                                  "pip install tensorboardX") from err
            out.append(TBXLoggerCallback())
        elif name == "mlflow":
            try:
                from mlflow import MlflowClient
            except ImportError as err:
                raise ImportError("tracking.log_to has mlflow but mlflow is not installed: pip install mlflow") from err
            mlflow_experiment(MlflowClient(tracking_uri=mlflow_uri(exp)), exp, sweep_dir.name)
            out.append(TrialsToMLflow(tracking_uri=mlflow_uri(exp), experiment_name=sweep_dir.name))
    return out


class Passthrough:
    def __call__(self, batch):
        return batch


def start_ray_data_helpers() -> None:
    """Run one tiny Ray Data actor job from the sweep's driver before any trial starts.

    Ray Data makes its cluster-wide helper actors (ActorLocationTracker, _StatsActor, detached)
    from whichever process first runs a dataset. Made from inside a trial they join the trial's
    placement group (Tune captures child tasks), so the first trial that ASHA stops takes them
    down and every running trial's data stream fails with ActorUnschedulableError (seen on Ray
    2.60 with two trials side by side). Made here, they live outside every trial.
    """
    ray.data.range(1).map_batches(Passthrough, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.01).take_all()


def trial_resources(exp: Experiment) -> dict[str, float]:
    """What one trial holds at its peak. Tune reserves only the trial's driver
    (tune.cpus_per_trial); its Train workers and their preprocessing actors reserve their own
    while it trains, then its evaluation actors while it validates."""
    t, train, data, ev = exp.tune, exp.train, exp.data, exp.eval
    training = train.num_workers * (train.cpus_per_worker + data.preprocess_actors * data.preprocess_cpus)
    need = {"CPU": t.cpus_per_trial + max(training, ev.actors * ev.cpus_per_actor)}
    if train.use_gpu or ev.use_gpu:
        need["GPU"] = float(max(train.num_workers if train.use_gpu else 0, ev.actors if ev.use_gpu else 0))
    return need


def trials_side_by_side(exp: Experiment) -> int:
    """tune.max_concurrent_trials, or for 0 as many trials as the cluster's CPUs and GPUs hold
    now. A fixed number larger than that is kept (an autoscaling cluster adds nodes for the
    waiting trials), with a warning: on a fixed cluster they wait for each other."""
    need, have = trial_resources(exp), ray.cluster_resources()
    fit = int(min(have.get(k, 0.0) // v for k, v in need.items()))
    held = f"{need} each, the cluster has { {k: have.get(k, 0.0) for k in need} }"
    if exp.tune.max_concurrent_trials > 0:
        if exp.tune.max_concurrent_trials > fit:
            logger.warning(f"sweep: tune.max_concurrent_trials={exp.tune.max_concurrent_trials}, but only {fit} "
                           f"trial(s) fit now ({held}); the others wait for resources unless the cluster grows")
        return exp.tune.max_concurrent_trials
    logger.info(f"sweep: {max(1, fit)} trial(s) side by side ({held})")
    return max(1, fit)


def check_same_sweep(exp: Experiment, sweep_dir: Path) -> None:
    """A sweep continued under its name must be the same sweep: Tune would go on with the
    settings it started with, whatever the experiment file says now."""
    saved_file = sweep_dir / "sweep_experiment.json"
    if not saved_file.is_file():
        return
    saved = flat_params(json.loads(saved_file.read_text()))
    now = flat_params(json.loads(json.dumps(to_dict(exp))))
    changed = sorted(k for k in saved.keys() | now.keys()
                     if saved.get(k) != now.get(k) and not k.startswith(("tracking.", "source")))
    if changed:
        shown = ", ".join(f"{k}: {saved.get(k, '-')} -> {now.get(k, '-')}" for k in changed[:5])
        raise ValueError(f"{sweep_dir} is a sweep with other settings ({len(changed)} differ: {shown}); "
                         f"continue it with the same experiment, or give this one another --name")


def run_sweep(exp: Experiment, name: str | None = None) -> dict:
    """Run (or continue) the sweep of an experiment's `tune` section; returns its summary."""
    check_objectives(exp)
    distributions(exp.tune.space)  # a bad space fails here, before any trial starts
    init_ray()
    start_ray_data_helpers()
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
        check_same_sweep(exp, sweep_dir)
        logger.info(f"sweep: continuing {sweep_dir} (finished trials are kept)")
        tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True, resume_errored=True)
    else:
        search, scheduler = searcher_and_scheduler(exp, sweep_dir)
        (sweep_dir / "sweep_experiment.json").write_text(json.dumps(to_dict(exp), indent=1, sort_keys=True))
        logger.info(f"sweep: {exp.tune.num_trials} trials of {exp.tune.trial_steps} steps, "
                    f"{exp.tune.objective}-objective over {list(exp.tune.objectives)} -> {sweep_dir}")
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=exp.tune.num_trials,
                                        max_concurrent_trials=trials_side_by_side(exp),
                                        trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(name=name, storage_path=str(storage),
                                      callbacks=logger_callbacks(exp, sweep_dir)),
        )
    grid = tuner.fit()
    summary = write_outputs(exp, grid, sweep_dir)
    summary["optuna_storage"], summary["study_name"] = optuna_storage(exp, sweep_dir), name
    summary["seconds"] = round(time.time() - started, 1)
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
