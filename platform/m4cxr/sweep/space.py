"""The search space of a sweep (tune.space in an experiment file) for Optuna, and a trial's
parameters applied to the experiment.

Parameter names, as they appear in results tables:
    share_mrg, share_image_understanding, share_vqa   raw task-type weights; normalised to shares
    mult_<task>__<dataset>                            a pair's weight multiplier
    strategy, lora_r, lora_alpha, lora_dropout, lora_target_modules ("q_proj,v_proj"), lr
Shares and multipliers reshape the pair weights, which the empirical strategy samples by
(d1-d4 derive their own weights from the pairs, so they ignore them).
"""

from __future__ import annotations

import copy
from typing import Any

import optuna

from m4cxr.config import Experiment, PairWeight, SearchSpace
from m4cxr.data.mixture import TASK_TYPES, pairs_from_config


def pair_param(key: str) -> str:
    return "mult_" + key.replace("/", "__")  # Tune flattens nested names on "/"


def distributions(space: SearchSpace) -> dict[str, optuna.distributions.BaseDistribution]:
    """Every searched parameter with its Optuna distribution."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    def rng(name: str, values: list[float], log: bool = False) -> FloatDistribution:
        if len(values) != 2 or not values[0] < values[1]:
            raise ValueError(f"tune.space.{name} must be a range [low, high] with low < high, got {values}")
        return FloatDistribution(float(values[0]), float(values[1]), log=log)

    out: dict[str, Any] = {}
    for t, values in sorted(space.task_type_shares.items()):
        if t not in TASK_TYPES:
            raise ValueError(f"tune.space.task_type_shares: unknown task type {t!r}; the types are {TASK_TYPES}")
        if values[0] <= 0 and values[1] <= 0:
            raise ValueError(f"tune.space.task_type_shares.{t} must allow a positive weight")
        out[f"share_{t}"] = rng(f"task_type_shares.{t}", values)
    for key, values in sorted(space.pair_multipliers.items()):
        out[pair_param(key)] = rng(f"pair_multipliers.{key}", values)
    for name in ("strategy", "lora_r", "lora_alpha"):
        if getattr(space, name):
            out[name] = CategoricalDistribution(list(getattr(space, name)))
    if space.lora_dropout:
        out["lora_dropout"] = rng("lora_dropout", space.lora_dropout)
    if space.lora_target_modules:
        out["lora_target_modules"] = CategoricalDistribution([",".join(m) for m in space.lora_target_modules])
    if space.lr:
        out["lr"] = rng("lr", space.lr, log=True)
    if not out:
        raise ValueError("tune.space is empty: name at least one thing to search")
    return out


class DefineByRun:
    """OptunaSearch's define-by-run space: one suggest call per searched parameter. A class,
    not a closure, so that the searcher's state can be saved with the sweep."""

    def __init__(self, space: SearchSpace):
        self.dists = distributions(space)

    def __call__(self, trial: optuna.Trial) -> None:
        for name, dist in self.dists.items():
            if isinstance(dist, optuna.distributions.FloatDistribution):
                trial.suggest_float(name, dist.low, dist.high, log=dist.log)
            else:
                trial.suggest_categorical(name, dist.choices)


def apply_params(exp: Experiment, params: dict[str, Any]) -> Experiment:
    """A copy of the experiment with a trial's parameters in place."""
    exp = copy.deepcopy(exp)
    mixture = exp.data.mixture
    pairs = pairs_from_config(mixture, exp.source)
    shares = {t: float(params[f"share_{t}"]) for t in TASK_TYPES if f"share_{t}" in params}
    weights = {p.key: p.weight * float(params.get(pair_param(p.key), 1.0)) for p in pairs}
    if shares:
        types = {p.key: p.task_type for p in pairs}
        present = [t for t in shares if any(types[k] == t for k in weights)]
        # task types not searched keep their current share of the total
        total = sum(weights.values())
        fixed = {t: sum(w for k, w in weights.items() if types[k] == t) / total for t in TASK_TYPES if t not in shares}
        free = 1.0 - sum(fixed.values())
        norm = sum(shares[t] for t in present)
        target = {**fixed, **{t: free * shares[t] / norm for t in present}}
        type_sum = {t: sum(w for k, w in weights.items() if types[k] == t) for t in TASK_TYPES}
        weights = {k: w / type_sum[types[k]] * target[types[k]] if type_sum[types[k]] else 0.0
                   for k, w in weights.items()}
    mixture.pairs = {p.key: PairWeight(weight=round(weights[p.key], 6), size=p.size) for p in pairs}
    if "strategy" in params:
        mixture.strategy = params["strategy"]
    lora = exp.model.lora
    if "lora_r" in params:
        lora.r = int(params["lora_r"])
    if "lora_alpha" in params:
        lora.alpha = int(params["lora_alpha"])
    if "lora_dropout" in params:
        lora.dropout = float(params["lora_dropout"])
    if "lora_target_modules" in params:
        lora.target_modules = str(params["lora_target_modules"]).split(",")
    if "lr" in params:
        exp.train.instruction.lr = float(params["lr"])
    return exp
