"""A sweep's outputs: the results table, the Pareto front, plots, and the winning experiment.

    results.csv / results.md     one row per trial: status, parameters, objectives, validation loss
    pareto.png                   the objectives pairwise, the Pareto front in red
    importance.png               Optuna's parameter importances (its default, PED-ANOVA) for the first objective
    parallel_coordinate.png      Optuna's parallel-coordinate plot for the first objective
    timeline.png                 when each trial trained, by status: trials side by side, early stops
    best_experiment.yaml         the experiment with the winner's settings, at full training length:
                                 `m4cxr train` and serving take it as it is
The winner of a multi-objective sweep is the Pareto trial with the best weighted sum
(tune.weights); of a single-objective sweep, the trial with the best objective.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from m4cxr.config import Experiment, save_experiment  # noqa: E402
from m4cxr.sweep.run import SINGLE, weighted_objective  # noqa: E402
from m4cxr.sweep.space import apply_params, distributions  # noqa: E402


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


def pareto_front(rows: list[dict], objectives: dict[str, str]) -> list[int]:
    """Indices of the completed trials that no other completed trial dominates."""
    done = [i for i, r in enumerate(rows) if r["status"] == "completed"]
    sign = np.array([1.0 if m == "max" else -1.0 for m in objectives.values()])
    values = {i: sign * np.array([rows[i][k] for k in objectives], dtype=float) for i in done}
    return [i for i in done if not any(np.all(values[j] >= values[i]) and np.any(values[j] > values[i])
                                       for j in done if j != i)]


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_table(rows: list[dict], pareto: list[int], out: Path) -> None:
    header = list(rows[0]) + ["pareto"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i, r in enumerate(rows):
            writer.writerow([*r.values(), i in pareto])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r.values()) + f" | {'yes' if i in pareto else ''} |"
              for i, r in enumerate(rows)]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def plot_pareto(rows: list[dict], pareto: list[int], objectives: list[str], path: Path) -> Path:
    done = [i for i, r in enumerate(rows) if r["status"] == "completed"]
    pairs = [(a, b) for n, a in enumerate(objectives) for b in objectives[n + 1:]] or [(objectives[0], objectives[0])]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 4), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs):
        for i in done:
            on_front = i in pareto
            ax.scatter(rows[i][a], rows[i][b], c="red" if on_front else "grey", s=50 if on_front else 25, zorder=3)
            ax.annotate(rows[i]["trial"].split("_")[-1][:6], (rows[i][a], rows[i][b]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(a)
        ax.set_ylabel(b)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{len(done)} completed trials; Pareto front in red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def optuna_plots(exp: Experiment, rows: list[dict], out: Path) -> dict[str, str]:
    """Importance and parallel-coordinate plots from Optuna, on a study rebuilt from the table."""
    import optuna
    from optuna.visualization import matplotlib as ovm

    dists = distributions(exp.tune.space)
    objectives = list(exp.tune.objectives)
    directions = ["maximize" if m == "max" else "minimize" for m in exp.tune.objectives.values()]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes")  # handled by `sign`
    study = optuna.create_study(directions=directions)
    for r in rows:
        if r["status"] == "completed":
            study.add_trial(optuna.trial.create_trial(params={p: r[p] for p in dists}, distributions=dists,
                                                      values=[r[k] for k in objectives]))
    first = objectives[0]
    # PED-ANOVA ranks parameters by how they reach LOW target values: flip objectives to maximise
    sign = -1.0 if exp.tune.objectives[first] == "max" else 1.0
    paths = {}
    # PED-ANOVA named: it is Optuna 5's default, Optuna 4's (fANOVA) needs scikit-learn
    pedanova = {"evaluator": optuna.importance.PedAnovaImportanceEvaluator()}
    plots = {"parallel_coordinate": (ovm.plot_parallel_coordinate, lambda t: t.values[0], first, {}),
             "importance": (ovm.plot_param_importances, lambda t: sign * t.values[0],
                            first if sign > 0 else f"{first} (negated: higher is better)", pedanova)}
    for name, (plot, target, target_name, extra) in plots.items():
        try:
            ax = plot(study, target=target, target_name=target_name, **extra)
        except (ValueError, RuntimeError) as err:  # too few completed trials, or no variation
            print(f"sweep: no {name} plot ({err})")
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 4.5)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
        paths[name] = str(out / f"{name}.png")
    return paths


def trial_spans(rows: list[dict], out: Path) -> dict[str, dict[str, Any]]:
    """When each trial ran and when it trained, in seconds since the epoch: its iterations as
    Tune timed them (result.json: each report's time, less the time since the one before, so the
    first one includes its start-up and a continued sweep's pause falls between them), and its
    first to last training step (its metrics.jsonl)."""
    spans = {}
    for r in rows:
        tune_file, train_file = out / r["trial"] / "result.json", out / "trials" / r["trial"] / "metrics.jsonl"
        reports = [json.loads(line) for line in tune_file.open() if line.strip()] if tune_file.is_file() else []
        steps = [json.loads(line)["time"] for line in train_file.open() if line.strip()] if train_file.is_file() else []
        if reports and steps and any(x["time_this_iter_s"] > 1 for x in reports):
            # Tune's timestamp is whole seconds (the true end lies in [t, t + 1)): keep what is
            # surely inside each iteration, so that trials one after the other never count as side by side
            spans[r["trial"]] = {"iterations": [(x["timestamp"] + 1 - x["time_this_iter_s"], x["timestamp"])
                                                for x in reports if x["time_this_iter_s"] > 1],
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


def write_outputs(exp: Experiment, grid, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(exp, grid)
    objectives = exp.tune.objectives
    pareto = pareto_front(rows, objectives) if exp.tune.objective == "multi" else []
    write_table(rows, pareto, out)
    completed = [i for i, r in enumerate(rows) if r["status"] == "completed"]
    summary: dict[str, Any] = {"trials": len(rows), "completed": len(completed),
                               "stopped_early": sum(r["status"] == "stopped early" for r in rows),
                               "errors": sum(r["status"] == "error" for r in rows), "pareto_size": len(pareto),
                               "table": str(out / "results.md")}
    spans = trial_spans(rows, out)
    if spans:
        summary["most_trials_at_once"] = most_at_once([i for s in spans.values() for i in s["iterations"]])
        summary["most_trials_training_at_once"] = most_at_once([s["training"] for s in spans.values()])
        summary["timeline"] = str(plot_timeline(rows, spans, out / "timeline.png"))
    if not completed:
        print(f"sweep: no trial completed; see {out / 'results.md'}")
        return summary
    candidates = pareto or completed
    best = max(candidates, key=lambda i: weighted_objective(exp, rows[i]))
    params = {p: rows[best][p] for p in distributions(exp.tune.space)}
    winner = apply_params(exp, params)
    winner.name = f"{exp.name}-best"
    winner.description = f"{exp.name} with the settings of sweep trial {rows[best]['trial']}: {params}"
    summary["best_trial"] = rows[best]["trial"]
    summary["best_params"] = params
    summary["best_objectives"] = {k: rows[best][k] for k in objectives}
    summary["best_checkpoint"] = rows[best]["checkpoint"]  # the trial's own short fine-tune
    summary["best_experiment"] = str(save_experiment(winner, out / "best_experiment.yaml"))
    summary["plot"] = str(plot_pareto(rows, pareto or [best], list(objectives), out / "pareto.png"))
    summary["plots"] = optuna_plots(exp, rows, out)
    print((out / "results.md").read_text())
    print(f"sweep: best trial {summary['best_trial']} -> {summary['best_experiment']}")
    return summary
