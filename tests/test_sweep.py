"""Sweeps: the search space applied to an experiment, the Pareto front and winner taken from the
Optuna study, ASHA's rungs, trial resources, and a real multi-objective sweep on Ray Tune + Optuna
whose winning experiment file trains and evaluates through the normal commands, tracked in MLflow
and TensorBoard."""

import csv
import json
import os
import subprocess
import sys

import optuna
import pytest

from m4cxr.config import ConfigError, load_experiment
from m4cxr.data.mixture import build_mixture, pairs_from_config
from m4cxr.sweep.report import optuna_plots, pareto_and_winner, study_trials
from m4cxr.sweep.run import check_objectives, check_same_sweep, searcher_and_scheduler, trial_resources
from m4cxr.sweep.space import apply_params, distributions, pair_param
from m4cxr.sweep.study import TUNE_TRIAL

from conftest import ROOT

SWEEP = ROOT / "experiments/sweeps/quickstart.yaml"


def test_shares_multipliers_and_lora_are_applied():
    exp = load_experiment(SWEEP)
    params = {"share_mrg": 0.6, "share_image_understanding": 0.3, "share_vqa": 0.3,
              pair_param("phrase_grounding/synthetic"): 2.0, "lora_r": 16, "lr": 5e-4}
    trial = apply_params(exp, params)
    pairs = pairs_from_config(trial.data.mixture)
    total = sum(p.weight for p in pairs)
    by_type = {t: sum(p.weight for p in pairs if p.task_type == t) / total for t in ("mrg", "image_understanding", "vqa")}
    assert by_type == pytest.approx({"mrg": 0.5, "image_understanding": 0.25, "vqa": 0.25}, abs=1e-4)
    weights = {p.key: p.weight for p in pairs}
    base = {p.key: p.weight for p in pairs_from_config(exp.data.mixture)}
    # within a task type, the multiplied pair doubles relative to its neighbours
    ratio = weights["phrase_grounding/synthetic"] / weights["finding_grounding/synthetic"]
    assert ratio == pytest.approx(2 * base["phrase_grounding/synthetic"] / base["finding_grounding/synthetic"], rel=1e-3)
    assert trial.model.lora.r == 16 and trial.train.instruction.lr == 5e-4
    assert exp.model.lora.r == 8  # the base experiment is left as it was
    mixture = build_mixture(trial.data.mixture, {p.key: 10 for p in pairs})
    assert sum(mixture.probabilities) == pytest.approx(1.0)


def test_bad_spaces_and_objectives_are_named():
    exp = load_experiment(SWEEP, ["tune.space.lr=[0.1, 0.01]"])
    with pytest.raises(ValueError, match=r"tune.space.lr must be a range"):
        distributions(exp.tune.space)
    with pytest.raises(ConfigError, match="did you mean 'tune.space.lora_r'"):
        load_experiment(SWEEP, ["tune.space.lora_rank=[4]"])
    with pytest.raises(ValueError, match="objective 'mrg_f1' is not known"):
        check_objectives(load_experiment(SWEEP, ["tune.objectives={mrg_f1: max}"]))


def sweep_study(exp, trials, named=True):
    """An Optuna study as a sweep leaves it: trials (name, lr, objective values, or None for a
    trial stopped early), each named after its Tune trial unless named=False."""
    directions = ["maximize" if m == "max" else "minimize" for m in exp.tune.objectives.values()]
    study = optuna.create_study(directions=directions if exp.tune.objective == "multi" else ["maximize"])
    fixed = {"share_mrg": 0.5, "share_image_understanding": 0.5, "share_vqa": 0.2,
             pair_param("phrase_grounding/synthetic"): 1.0, "lora_r": 8}
    for name, lr, values in trials:
        study.add_trial(optuna.trial.create_trial(
            params={**fixed, "lr": lr}, distributions=distributions(exp.tune.space), values=values,
            state=optuna.trial.TrialState.COMPLETE if values else optuna.trial.TrialState.PRUNED,
            user_attrs={TUNE_TRIAL: name} if named else {}))
    rows = [{"trial": name, **fixed, "lr": lr} for name, lr, _ in trials]
    return study, rows


TRIALS = [("trial_a", 1e-4, [0.5, 0.5, 0.5]), ("trial_b", 2e-4, [0.6, 0.1, 0.1]), ("trial_c", 3e-4, [0.4, 0.4, 0.4]),
          ("trial_d", 4e-4, None), ("trial_e", 5e-4, [0.1, 0.9, 0.45])]


@pytest.mark.parametrize("named", [True, False])  # a trial without its Tune trial's name is found by its parameters
def test_pareto_front_and_winner_come_from_the_study(named):
    exp = load_experiment(SWEEP)
    study, rows = sweep_study(exp, TRIALS, named)
    trials = study_trials(study, rows, list(distributions(exp.tune.space)))
    assert sorted(trials) == [name for name, _, _ in TRIALS]
    # the winner: the Pareto trial with the best weighted sum (a: 1.5, e: 1.45, b: 0.8)
    assert pareto_and_winner(exp, study, trials) == (["trial_a", "trial_b", "trial_e"], "trial_a")
    exp = load_experiment(SWEEP, ["tune.objectives={mrg_mF1-14: min, grounding_mIoU: max, vqa_BLEU-1: max}"])
    study, rows = sweep_study(exp, TRIALS, named)
    assert pareto_and_winner(exp, study, study_trials(study, rows, ["lr"])) == (["trial_a", "trial_e"], "trial_e")


def test_a_single_objective_winner_is_the_studys_best_trial(tmp_path):
    exp = load_experiment(SWEEP, ["tune.objective=single"])
    study, rows = sweep_study(exp, [("trial_a", 1e-4, [1.0]), ("trial_b", 2e-4, [2.0]), ("trial_c", 3e-4, None),
                                    ("trial_d", 4e-4, [1.5])])
    assert pareto_and_winner(exp, study, study_trials(study, rows, ["lr"])) == ([], "trial_b")
    plots = optuna_plots(exp, study, tmp_path)
    assert sorted(plots) == ["importance", "optimization_history", "parallel_coordinate"]
    assert all((tmp_path / f"{name}.png").stat().st_size > 0 for name in plots)
    study, rows = sweep_study(exp, [("trial_a", 1e-4, None)])
    assert pareto_and_winner(exp, study, study_trials(study, rows, ["lr"])) == ([], None)


def test_asha_stops_weak_trials_before_their_last_step_only(tmp_path):
    """ASHA's rungs fall before a trial's last step: a weak trial is stopped at a rung, and a
    trial that trained to the end is never stopped there (it is always validated)."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    exp = load_experiment(ROOT / "experiments/sweeps/quickstart_asha.yaml")
    _, asha = searcher_and_scheduler(exp, tmp_path / "study")
    good, weak, late = (SimpleNamespace(trial_id=name) for name in ("good", "weak", "late"))
    for trial in (good, weak, late):
        asha.on_trial_add(None, trial)

    def report(trial, step, val_loss):
        return asha.on_trial_result(None, trial, {"step": step, "val_loss": val_loss})

    steps = exp.tune.trial_steps
    assert [report(good, s, 1.0) for s in range(exp.tune.eval_every, steps + 1, exp.tune.eval_every)] == \
        [TrialScheduler.CONTINUE] * (steps // exp.tune.eval_every)
    assert report(weak, exp.tune.grace_period, 9.0) == TrialScheduler.STOP
    # through the rungs, then worse than every other trial at its last step: it goes on to its
    # validation (a rung at the last step would stop it there, its training done for nothing)
    assert [report(late, s, 1.0) for s in range(exp.tune.eval_every, steps, exp.tune.eval_every)] == \
        [TrialScheduler.CONTINUE] * (steps // exp.tune.eval_every - 1)
    assert report(late, steps, 9.0) == TrialScheduler.CONTINUE
    with pytest.raises(ValueError, match="grace_period"):
        check_objectives(load_experiment(ROOT / "experiments/sweeps/quickstart_asha.yaml", ["tune.grace_period=40"]))


def test_two_quickstart_asha_trials_fit_on_two_cores():
    need = trial_resources(load_experiment(ROOT / "experiments/sweeps/quickstart_asha.yaml"))
    assert set(need) == {"CPU"} and 2 * need["CPU"] <= 2.0
    paper = trial_resources(load_experiment(ROOT / "experiments/sweeps/mixture_single.yaml"))
    assert paper["GPU"] == 4  # 4 trials of 4 GPUs on a 16-GPU cluster


def test_a_sweep_continued_with_other_settings_is_refused(tmp_path):
    from m4cxr.config import to_dict

    exp = load_experiment(SWEEP)
    (tmp_path / "sweep_experiment.json").write_text(json.dumps(to_dict(exp)))
    check_same_sweep(load_experiment(SWEEP, ["tracking.log_to=[mlflow]"]), tmp_path)  # tracking may change
    with pytest.raises(ValueError, match=r"1 differ: tune.trial_steps: 40 -> 80.*another --name"):
        check_same_sweep(load_experiment(SWEEP, ["tune.trial_steps=80"]), tmp_path)


@pytest.mark.slow
def test_sweep_pareto_winner_trains_evaluates_and_is_tracked(quickstart_run, tmp_path):
    """A multi-objective sweep end to end (the small quickstart's, from its stage-2 model; the
    command line's sweep, interrupted and continued, is in test_sweep_cluster.py), then its
    winning experiment file through the normal commands."""
    out, quickstart = quickstart_run
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ""}
    sweep_dir = out / "sweeps/quickstart-sweep"
    rows = list(csv.DictReader(open(sweep_dir / "results.csv")))
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows), rows
    assert len({(r["share_mrg"], r["lora_r"], r["lr"]) for r in rows}) == 2  # distinct settings
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["trials"] == 2 and summary["pareto_size"] >= 1
    assert summary["best_experiment"] == quickstart["sweep"]["best_experiment"]
    for name in ("pareto.png", "importance.png", "parallel_coordinate.png", "results.md", "timeline.png"):
        assert (sweep_dir / name).stat().st_size > 0, name
    # the table's Pareto front is the study's, in Optuna's own storage
    study = optuna.load_study(study_name="quickstart-sweep", storage=summary["optuna_storage"])
    assert {t.user_attrs[TUNE_TRIAL] for t in study.best_trials} == {r["trial"] for r in rows if r["pareto"] == "True"}

    # the winning experiment file trains and evaluates through the normal commands
    best = summary["best_experiment"]
    assert load_experiment(best).name == "quickstart-best"
    short = ["--set", "train.instruction.training_steps=3", "--set", "train.instruction.max_steps=3",
             "--set", f"train.output_dir={tmp_path / 'best'}", "--set", "train.val_samples=4",
             "--set", "tracking.log_to=[mlflow, tensorboard]"]
    train = subprocess.run([sys.executable, "-m", "m4cxr.cli", "train", "--stage", "instruction", "--config", best,
                            *short], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    checkpoint = tmp_path / "best/quickstart-best-instruction/final"
    assert (checkpoint / "m4cxr.json").is_file()
    ev = subprocess.run([sys.executable, "-m", "m4cxr.cli", "eval", "--config", best, "--checkpoint", str(checkpoint),
                         "--out", str(tmp_path / "best_eval"), "--set", "eval.samples_per_task=2",
                         "--set", "eval.max_new_tokens=8", "--set", "eval.bootstrap_samples=10",
                         "--set", f"train.output_dir={tmp_path / 'best'}", "--set", "tracking.log_to=[mlflow]"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stdout[-2000:] + ev.stderr[-2000:]
    assert "## Table 1" in (tmp_path / "best_eval/tables.md").read_text()

    # both runs are in MLflow's local store under train.output_dir, read back with its client
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'best/mlflow.db'}")
    experiment = client.get_experiment_by_name("quickstart-best")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    trained = runs["quickstart-best-instruction"]
    assert trained.data.params["train.instruction.training_steps"] == "3"
    assert trained.data.params["model.lora.r"] == str(load_experiment(best).model.lora.r)
    assert trained.data.tags["checkpoint"] == str(checkpoint.resolve())
    history = client.get_metric_history(trained.info.run_id, "loss")
    logged = [json.loads(line) for line in (tmp_path / "best/quickstart-best-instruction/metrics.jsonl").open()]
    assert sorted((m.step, round(m.value, 6)) for m in history) == [(r["step"], round(r["loss"], 6)) for r in logged]
    assert {"lr", "samples_per_s", "nonpad_token_share", "val_loss"} <= set(trained.data.metrics)
    by_type = {k for k in logged[-1] if k.startswith("loss_")}
    assert by_type and by_type <= set(trained.data.metrics)  # loss by task type
    # the same curve in TensorBoard's event files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "best/quickstart-best-instruction/tensorboard"))
    events.Reload()
    scalars = events.Scalars("loss")
    assert [e.step for e in scalars] == [r["step"] for r in logged]
    assert [e.value for e in scalars] == pytest.approx([r["loss"] for r in logged], rel=1e-5)  # float32
    scored = json.loads((tmp_path / "best_eval/metrics.json").read_text())
    evaluation = runs["eval-quickstart-best-instruction"]
    assert evaluation.data.params["checkpoint"] == str(checkpoint.resolve())
    grounding = scored["grounding"]["phrase_grounding"]["mIoU"]
    assert evaluation.data.metrics["grounding.phrase_grounding.mIoU"] == pytest.approx(grounding)
