"""A sweep's outputs: the results table, Optuna's plots of its study, and the winning experiment.

    results.csv / results.md     one row per trial (Tune's results): status, parameters, objectives,
                                 validation loss, Pareto membership
    pareto.png                   Optuna's Pareto-front plot of the study (multi-objective sweeps;
                                 the first three objectives where there are more)
    optimization_history.png     Optuna's optimisation history of the weighted sum (single-objective sweeps)
    importance.png               Optuna's parameter importances (PED-ANOVA) for the first objective, or
                                 the weighted sum in single-objective sweeps
    parallel_coordinate.png      Optuna's parallel-coordinate plot for the same target
    timeline.png                 when each trial trained, by status: trials side by side, early stops
    best_experiment.yaml         the experiment with the winner's settings, at full training length:
                                 `m4cxr train` and serving take it as it is
The Pareto front and the winner come from the sweep's Optuna study, read back from its storage:
the front is the study's best trials; the winner of a multi-objective sweep is the Pareto trial
with the best weighted sum (tune.weights), of a single-objective sweep the study's best trial.
"""

from __future__ import annotations

import csv
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import FrozenTrial  # noqa: E402
from optuna.visualization import matplotlib as ovm  # noqa: E402

from m4cxr.config import Experiment, save_experiment  # noqa: E402
from m4cxr.sweep.space import apply_params, distributions  # noqa: E402
from m4cxr.sweep.study import SINGLE, TUNE_TRIAL, load_study, weighted_objective  # noqa: E402

logger = logging.getLogger(__name__)


def trial_rows(exp: Experiment, grid) -> list[dict[str, Any]]:
    params = list(distributions(exp.tune.space))
    objectives = list(exp.tune.objectives)
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        done = all(metrics.get(k) is not None for k in objectives)
        status = "error" if result.error else "completed" if done else "stopped early"
        rows.append({"trial": Path(result.path).name if result.path else metrics.get("trial_id", "?"),
                     "status": status, **{p: result.config.get(p) for p in params},
                     **{k: metrics.get(k) if done else None for k in objectives},
                     "val_loss": metrics.get("val_loss"), "steps": metrics.get("step"),
                     SINGLE: metrics.get(SINGLE) if done else None, "checkpoint": metrics.get("trial_checkpoint")})
    return sorted(rows, key=lambda r: r["trial"])


def study_trials(study: optuna.Study, rows: list[dict], params: list[str]) -> dict[str, FrozenTrial]:
    """The study's trials by the name of their Tune trial (a row's "trial"): the name the searcher
    recorded with each, or for a trial recorded without it, the row with the same parameters."""
    names = {r["trial"] for r in rows}
    out = {}
    for t in study.get_trials(deepcopy=False):
        name = t.user_attrs.get(TUNE_TRIAL) or next(
            (r["trial"] for r in rows if t.params and all(r[p] == t.params.get(p) for p in params)), None)
        if name in names:  # a study in shared storage may hold trials of an earlier sweep of that name
            out[name] = t
    return out


def pareto_and_winner(exp: Experiment, study: optuna.Study,
                      trials: dict[str, FrozenTrial]) -> tuple[list[str], str | None]:
    """The Pareto front (multi-objective sweeps: the study's best trials) and the winning trial:
    the Pareto trial with the best weighted sum, or in a single-objective sweep the study's best
    trial; None where no trial completed."""
    name_of = {t.number: name for name, t in trials.items()}
    if exp.tune.objective == "multi":
        front = sorted(name_of[t.number] for t in study.best_trials if t.number in name_of)
        values = {name: dict(zip(exp.tune.objectives, trials[name].values)) for name in front}
        return front, max(front, key=lambda name: weighted_objective(exp, values[name]), default=None)
    try:
        return [], name_of.get(study.best_trial.number)
    except ValueError:  # no trial completed
        return [], None


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_table(rows: list[dict], pareto: list[str], out: Path) -> None:
    header = list(rows[0]) + ["pareto"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in rows:
            writer.writerow([*r.values(), r["trial"] in pareto])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r.values()) + f" | {'yes' if r['trial'] in pareto else ''} |"
              for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def save_plot(ax, path: Path, size: tuple[float, float] | None = None) -> str:
    fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    if size:
        fig.set_size_inches(*size)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def optuna_plots(exp: Experiment, study: optuna.Study, out: Path) -> dict[str, str]:
    """Optuna's plots of the study: its Pareto front (multi-objective) or optimisation history
    (single), and parameter importances and parallel coordinates for one target: the first
    objective, or the weighted sum that a single-objective study holds."""
    objectives = list(exp.tune.objectives)
    if exp.tune.objective == "multi":
        first = objectives[0]
        # PED-ANOVA ranks parameters by how they reach LOW target values: flip objectives to maximise
        sign = -1.0 if exp.tune.objectives[first] == "max" else 1.0
        # Optuna draws 2 or 3 objectives; with more, the first three (the front is still the study's)
        front = {"target_names": objectives[:3]} | ({"targets": lambda t: t.values[:3]} if len(objectives) > 3 else {})
        plots = {"pareto": (ovm.plot_pareto_front, front),
                 "parallel_coordinate": (ovm.plot_parallel_coordinate,
                                         {"target": lambda t: t.values[0], "target_name": first}),
                 "importance": (ovm.plot_param_importances,
                                {"target": lambda t: sign * t.values[0],
                                 "target_name": first if sign > 0 else f"{first} (negated: higher is better)"})}
    else:  # the study's own value, which its direction (maximise) ranks
        plots = {"optimization_history": (ovm.plot_optimization_history, {"target_name": SINGLE}),
                 "parallel_coordinate": (ovm.plot_parallel_coordinate, {"target_name": SINGLE}),
                 "importance": (ovm.plot_param_importances, {"target_name": SINGLE})}
    with warnings.catch_warnings():
        # Optuna's matplotlib plots and PED-ANOVA are marked experimental; PED-ANOVA's note on
        # low target values is handled by `sign`
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes")
        # PED-ANOVA named: it is Optuna 5's default, Optuna 4's (fANOVA) needs scikit-learn
        plots["importance"][1]["evaluator"] = optuna.importance.PedAnovaImportanceEvaluator()
        drawn = {name: draw(plot, study, kwargs, out / f"{name}.png") for name, (plot, kwargs) in plots.items()}
    return {name: path for name, path in drawn.items() if path}


def draw(plot: Callable, study: optuna.Study, kwargs: dict, path: Path) -> str | None:
    """One of Optuna's matplotlib plots of the study, saved to path; None where it cannot be drawn."""
    with plt.rc_context():  # Optuna's plots switch matplotlib to their own style (ggplot): kept to them
        try:
            ax = plot(study, **kwargs)
        except (ValueError, RuntimeError) as err:  # too few completed trials, or no variation
            logger.warning(f"sweep: no {path.stem} plot ({err})")
            return None
        return save_plot(ax, path, None if path.stem == "pareto" else (8, 4.5))


def trial_spans(grid, out: Path) -> dict[str, dict[str, Any]]:
    """When each trial ran and when it trained, in seconds since the epoch: its iterations as
    Tune timed them (its result frame: each report's time, less the time since the one before,
    so the first one includes its start-up and a continued sweep's pause falls between them),
    and its first to last training step (its metrics.jsonl)."""
    spans = {}
    for result in grid:
        name, reports = Path(result.path).name, result.metrics_dataframe
        train_file = out / "trials" / name / "metrics.jsonl"
        steps = [json.loads(line)["time"] for line in train_file.open() if line.strip()] if train_file.is_file() else []
        if reports is None or "time_this_iter_s" not in reports or not steps:
            continue
        ran = reports[reports["time_this_iter_s"] > 1]
        if len(ran):
            # Tune's timestamp is whole seconds (the true end lies in [t, t + 1)): keep what is
            # surely inside each iteration, so that trials one after the other never count as side by side
            spans[name] = {"iterations": list(zip((ran["timestamp"] + 1 - ran["time_this_iter_s"]).tolist(),
                                                  ran["timestamp"].tolist())),
                           "training": (min(steps), max(steps))}
    return spans


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals that overlap at one moment."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])  # an end before a start
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


def plot_timeline(rows: list[dict], spans: dict, path: Path) -> Path:
    """A bar per trial: its iterations light, its training steps dark, coloured by status."""
    colours = {"completed": "tab:green", "stopped early": "tab:orange", "error": "tab:red"}
    start = min(a for s in spans.values() for a, _ in s["iterations"])
    shown = sorted((r for r in rows if r["trial"] in spans), key=lambda r: spans[r["trial"]]["iterations"][0][0])
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(shown) + 1.6))
    for y, r in enumerate(shown):
        colour = colours.get(r["status"], "grey")
        iterations, (c, d) = spans[r["trial"]]["iterations"], spans[r["trial"]]["training"]
        ax.broken_barh([(a - start, b - a) for a, b in iterations], (y - 0.4, 0.8), color=colour, alpha=0.3)
        ax.barh(y, max(d - c, 0.5), left=c - start, color=colour, height=0.4)
        ax.annotate(f"{r['steps']} steps", (iterations[-1][1] - start, y), xytext=(3, -3), textcoords="offset points",
                    fontsize=7)
    ax.set_yticks(range(len(shown)), [r["trial"] for r in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the sweep's first trial started (dark: training steps; light: start-up, validation)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(handles, list(colours), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(f"{len(shown)} trials, at most {most_at_once([i for s in spans.values() for i in s['iterations']])} "
                 f"side by side")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def winner(exp: Experiment, row: dict, trial: FrozenTrial, out: Path) -> dict[str, Any]:
    """The winning trial's part of the summary, and its experiment file at full training length."""
    params = {p: trial.params[p] for p in distributions(exp.tune.space)}
    best = apply_params(exp, params)
    best.name = f"{exp.name}-best"
    best.description = f"{exp.name} with the settings of sweep trial {row['trial']}: {params}"
    return {"best_trial": row["trial"], "best_params": params,
            "best_objectives": {k: row[k] for k in exp.tune.objectives},
            "best_checkpoint": row["checkpoint"],  # the trial's own short fine-tune
            "best_experiment": str(save_experiment(best, out / "best_experiment.yaml"))}


def write_outputs(exp: Experiment, grid, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(exp, grid)
    study = load_study(exp, out)
    trials = study_trials(study, rows, list(distributions(exp.tune.space)))
    pareto, best = pareto_and_winner(exp, study, trials)
    write_table(rows, pareto, out)
    summary: dict[str, Any] = {"trials": len(rows), "completed": sum(r["status"] == "completed" for r in rows),
                               "stopped_early": sum(r["status"] == "stopped early" for r in rows),
                               "errors": sum(r["status"] == "error" for r in rows), "pareto_size": len(pareto),
                               "table": str(out / "results.md")}
    spans = trial_spans(grid, out)
    if spans:
        summary["most_trials_at_once"] = most_at_once([i for s in spans.values() for i in s["iterations"]])
        summary["most_trials_training_at_once"] = most_at_once([s["training"] for s in spans.values()])
        summary["timeline"] = str(plot_timeline(rows, spans, out / "timeline.png"))
    if best is None:
        logger.warning(f"sweep: no trial completed; see {out / 'results.md'}")
        return summary
    summary |= winner(exp, next(r for r in rows if r["trial"] == best), trials[best], out)
    plots = optuna_plots(exp, study, out)
    summary["plot"] = plots.pop("pareto", None) or plots.pop("optimization_history", None)
    summary["plots"] = plots
    logger.info("\n" + (out / "results.md").read_text())
    logger.info(f"sweep: best trial {summary['best_trial']} -> {summary['best_experiment']}")
    return summary
