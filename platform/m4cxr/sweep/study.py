"""What a sweep's trials are judged by and where its Optuna study is kept: the names the sweep
(run.py) and its report (report.py) share.

The study is Optuna's own record of the sweep, in RDB storage (optuna.db in the sweep's folder,
or tune.optuna_storage), named after the sweep. Each of its trials carries the name of its Tune
trial (the user attribute TUNE_TRIAL), which is also the trial's folder in the sweep.
"""

from __future__ import annotations

from pathlib import Path

import optuna

from m4cxr.config import Experiment

# What a trial can be judged by: "<task type>_<metric>" from the validation evaluation.
OBJECTIVES = ("mrg_mF1-14", "mrg_MF1-14", "mrg_BLEU-4", "mrg_ROUGE-L", "grounding_mIoU", "grounding_acc@0.5",
              "vqa_accuracy", "vqa_recall", "vqa_BLEU-1", "val_loss")
SINGLE = "objective"  # the weighted sum, in single-objective sweeps
TUNE_TRIAL = "tune_trial"  # an Optuna trial's user attribute: its Tune trial's name


def weighted_objective(exp: Experiment, metrics: dict[str, float]) -> float:
    t = exp.tune
    return sum(t.weights.get(k, 0.0) * (1 if mode == "max" else -1) * metrics.get(k, 0.0)
               for k, mode in t.objectives.items())


def tune_trial_name(trial_id: str) -> str:
    """A Tune trial's name and folder."""
    return f"trial_{trial_id}"


def optuna_storage(exp: Experiment, sweep_dir: Path) -> str:
    return exp.tune.optuna_storage or f"sqlite:///{sweep_dir / 'optuna.db'}"


def load_study(exp: Experiment, sweep_dir: Path) -> optuna.Study:
    """The sweep's study, read back from its storage."""
    return optuna.load_study(study_name=sweep_dir.name, storage=optuna_storage(exp, sweep_dir))
