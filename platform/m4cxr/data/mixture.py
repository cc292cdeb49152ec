"""The task mixture: sampling weights of task-dataset pairs and the strategies of Table 7.

Every training sample is drawn in two steps (as the authors do): a task-dataset pair with
probability from the strategy, then a sample of that pair uniformly. Strategies:
    empirical  the weights as written (Table 10 by default: 50 pairs, 54% / 35% / 11%)
    d1         per task-dataset: uniform over pairs
    d2         per size: proportional to each pair's number of training instances
    d3         per task type (equal thirds), then uniform over the type's pairs
    d4         per task type (equal thirds), then by size within the type
"""

from __future__ import annotations

import csv
import typing
import logging
from dataclasses import dataclass
from importlib import resources
from typing import Mapping

import numpy as np

from m4cxr.config import MixtureConfig, Strategy
from m4cxr.tasks import task_names, task_type

log = logging.getLogger(__name__)

STRATEGIES = typing.get_args(Strategy)  # the paper's sampling strategies (config.py)
TASK_TYPES = ("mrg", "image_understanding", "vqa")
DRAW_CHUNK = 4096  # draws are generated in seeded chunks, so any position is reachable at once


@dataclass(frozen=True)
class Pair:
    task: str
    dataset: str
    task_type: str
    weight: float
    size: int

    @property
    def key(self) -> str:
        return f"{self.task}/{self.dataset}"


def paper_pairs() -> list[Pair]:
    """Table 10 of the paper (resources/mixture_table10.csv)."""
    text = resources.files("m4cxr").joinpath("resources/mixture_table10.csv").read_text()
    return [
        Pair(r["task"], r["dataset"], r["task_type"], float(r["ratio"]), int(r["train_instances"]))
        for r in csv.DictReader(text.splitlines())
    ]


def pairs_from_config(cfg: MixtureConfig, source: str = "config") -> list[Pair]:
    if not cfg.pairs:
        return paper_pairs()
    pairs = []
    for key, pw in cfg.pairs.items():
        task, sep, dataset = key.partition("/")
        if not sep or not dataset:
            raise ValueError(f"{source}: mixture pair {key!r} must be written 'task/dataset'")
        if task not in task_names():
            raise ValueError(f"{source}: mixture pair {key!r}: unknown task {task!r}")
        if pw.weight < 0:
            raise ValueError(f"{source}: mixture pair {key!r}: weight must be >= 0")
        pairs.append(Pair(task, dataset, task_type(task), pw.weight, pw.size))
    return pairs


def strategy_weights(pairs: list[Pair], strategy: str) -> np.ndarray:
    """Unnormalised weights of each pair under a strategy."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown mixture strategy {strategy!r}; choose one of {STRATEGIES}")
    if strategy == "empirical":
        return np.array([p.weight for p in pairs], dtype=float)
    if strategy == "d1":
        return np.ones(len(pairs))
    sizes = np.array([p.size for p in pairs], dtype=float)
    if strategy in ("d2", "d4") and (sizes <= 0).any():
        missing = [p.key for p, s in zip(pairs, sizes) if s <= 0]
        raise ValueError(
            f"strategy {strategy} needs the size of every pair; no size for {missing} "
            "(write size: N in the experiment file, or give a corpus to count them)"
        )
    if strategy == "d2":
        return sizes
    within = np.ones(len(pairs)) if strategy == "d3" else sizes
    types = [p.task_type for p in pairs]
    present = sorted(set(types))
    out = np.zeros(len(pairs))
    for t in present:
        idx = [i for i, tt in enumerate(types) if tt == t]
        out[idx] = within[idx] / within[idx].sum() / len(present)
    return out


@dataclass
class Mixture:
    pairs: list[Pair]
    probabilities: np.ndarray
    strategy: str
    seed: int
    dropped: list[str]  # pairs without data at hand, reported and left out

    def task_type_shares(self) -> dict[str, float]:
        shares = {t: 0.0 for t in TASK_TYPES}
        for p, prob in zip(self.pairs, self.probabilities):
            shares[p.task_type] = shares.get(p.task_type, 0.0) + float(prob)
        return shares

    def draw(self, count: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Draws number start .. start+count-1 of the stream: (pair index, uniform in [0,1)
        that picks the sample within the pair). The same seed gives the same stream, and a
        stream resumed at position k continues exactly where it stopped."""
        return self.draw_at(np.arange(start, start + count, dtype=np.int64))

    def draw_at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The draws at any stream positions; each chunk of DRAW_CHUNK positions has its own
        seeded generator, so a position's draw never depends on where reading started."""
        positions = np.asarray(positions, dtype=np.int64)
        pair_idx = np.empty(len(positions), dtype=np.int64)
        within = np.empty(len(positions), dtype=np.float64)
        chunks, offsets = np.divmod(positions, DRAW_CHUNK)
        for chunk in np.unique(chunks):
            rng = np.random.default_rng([self.seed, int(chunk)])
            chunk_pairs = rng.choice(len(self.pairs), size=DRAW_CHUNK, p=self.probabilities)
            chunk_within = rng.random(DRAW_CHUNK)
            sel = chunks == chunk
            pair_idx[sel] = chunk_pairs[offsets[sel]]
            within[sel] = chunk_within[offsets[sel]]
        return pair_idx, within

    def to_json(self) -> dict:
        return {
            "strategy": self.strategy,
            "seed": self.seed,
            "pairs": len(self.pairs),
            "probabilities": {p.key: round(float(q), 6) for p, q in zip(self.pairs, self.probabilities)},
            "task_type_shares": {k: round(v, 4) for k, v in self.task_type_shares().items()},
            "dropped": self.dropped,
        }


def build_mixture(
    cfg: MixtureConfig,
    available: Mapping[str, int] | None = None,
    strategy: str | None = None,
    source: str = "config",
    tasks: tuple[str, ...] | None = None,
) -> Mixture:
    """The mixture of a config. With `available` ("task/dataset" -> number of samples at hand),
    pairs without data are reported and dropped (weights renormalised) or raise, as
    cfg.on_missing_pair says; sizes missing from the config are taken from the data at hand.
    `tasks` keeps only those tasks' pairs (stage 1 trains on report generation alone)."""
    strategy = strategy or cfg.strategy
    pairs = [p for p in pairs_from_config(cfg, source)
             if p.task_type not in cfg.drop_task_types and (tasks is None or p.task in tasks)]
    if not pairs:
        raise ValueError(f"{source}: no mixture pair left" + (f" for the tasks {list(tasks)}" if tasks else ""))
    dropped: list[str] = []
    if available is not None:
        missing = [p.key for p in pairs if available.get(p.key, 0) == 0]
        if missing and cfg.on_missing_pair == "error":
            raise ValueError(
                f"{source}: {len(missing)} mixture pair(s) have no data at hand: {', '.join(missing)} "
                "(set data.mixture.on_missing_pair=renormalise to drop them)"
            )
        if missing:
            log.warning("mixture: %d pair(s) without data dropped, weights renormalised: %s", len(missing),
                        ", ".join(missing))
        dropped = missing
        pairs = [
            Pair(p.task, p.dataset, p.task_type, p.weight, p.size or int(available[p.key]))
            for p in pairs if p.key not in missing
        ]
    if not pairs:
        raise ValueError(f"{source}: no mixture pair has data at hand")
    weights = strategy_weights(pairs, strategy)
    if weights.sum() <= 0:
        raise ValueError(f"{source}: the mixture weights sum to zero")
    return Mixture(pairs, weights / weights.sum(), strategy, cfg.seed, dropped)
