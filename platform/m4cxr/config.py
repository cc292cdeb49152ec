"""Experiment files: YAML -> a typed, validated config.

An experiment file has the sections data, model, train, eval, tune, tracking and serve. Every key is
checked against the dataclasses below: an unknown key or a value of the wrong type is an error
that names the key, the file and (for unknown keys) the closest valid key. Command-line
overrides use dotted paths: `--set train.instruction.lr=2e-4`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# the authors' system message: their model was trained with it before every first question
DEFAULT_SYSTEM_PROMPT = (
    "The following is a conversation between a curious human and an AI medical assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class ConfigError(ValueError):
    """A problem in an experiment file or an override, naming the key and where it came from."""


# ----------------------------------------------------------------------------- sections


@dataclass
class PairWeight:
    weight: float
    size: int = 0  # training instances of the task-dataset (Table 10); used by the per-size strategies


@dataclass
class MixtureConfig:
    # empirical: the weights as written; d1: uniform over pairs; d2: by size;
    # d3: equal per task type, then uniform; d4: equal per task type, then by size (Table 7).
    strategy: Literal["empirical", "d1", "d2", "d3", "d4"] = "empirical"
    seed: int = 0
    # A pair with no samples in the corpus: drop it and renormalise, or stop with an error.
    on_missing_pair: Literal["renormalise", "error"] = "renormalise"
    # Leave whole task types out (the ablations of Table 5: Exp3 without image understanding,
    # Exp4 without VQA).
    drop_task_types: list[Literal["mrg", "image_understanding", "vqa"]] = field(default_factory=list)
    # "task/dataset" -> weight and size. Empty means the paper's Table 10 shipped with the package.
    pairs: dict[str, PairWeight] = field(default_factory=dict)


@dataclass
class SyntheticConfig:
    patients: int = 200
    seed: int = 0
    image_size: int = 256
    prior_share: float = 0.5  # share of patients with a prior study
    split_shares: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])  # train/validate/test


@dataclass
class DataConfig:
    corpus_dir: str = "runs/corpus"
    image_size: int = 518  # the vision encoder's input side; boxes are relative to this frame
    box_convention: Literal["resize", "center_crop"] = "resize"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_images_multi_image: int = 5
    max_images_multi_study: int = 10
    # Ray Data preprocessing: actors that load, resize, normalise and tokenise samples
    preprocess_actors: int = 1
    preprocess_cpus: float = 0.5
    # share of streamed samples that may fail (corrupt image, malformed row) before the run stops
    error_budget: float = 0.01
    length_grouping: bool = True  # sort each step's samples by length into micro-batches
    # pack each step's samples into rows of up to train.max_seq_len tokens, each sample attending
    # only to itself (position ids restart per sample): the same loss, far less padding. Then
    # train.micro_batch_size counts packed rows, and length_grouping must stay on
    packing: bool = False
    # How report generation is trained (Table 5): "cot" asks for the findings, then the report;
    # "single_turn" asks for the report at once (Exp1); "separate" trains the report question and
    # the findings question as two separate single-turn tasks (Exp2).
    mrg_format: Literal["cot", "single_turn", "separate"] = "cot"
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ProjectorConfig:
    kind: Literal["c_abstractor"] = "c_abstractor"
    depth: int = 3
    mlp_depth: int = 2
    hidden_size: int = 1024
    num_query_tokens: int = 361  # a square grid: 19 x 19


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class ModelConfig:
    vision_encoder: str = "microsoft/rad-dino"  # hub id or local folder (ignored when vision_config is set)
    llm: str = "mistralai/Mistral-7B-Instruct-v0.2"  # hub id or local folder (ignored when llm_config is set)
    # Architecture fields (Dinov2Config / MistralConfig) to build the model with random weights
    # instead of loading it: tiny runs, tests, and the full-size summary on the meta device.
    vision_config: dict[str, Any] = field(default_factory=dict)
    llm_config: dict[str, Any] = field(default_factory=dict)
    # "" = the LLM's own tokenizer; "train" = a BPE tokenizer trained on the corpus; or a folder.
    tokenizer: str = ""
    tokenizer_vocab_size: int = 2000
    image_mean: list[float] = field(default_factory=lambda: [0.5307, 0.5307, 0.5307])  # Rad-DINO's
    image_std: list[float] = field(default_factory=lambda: [0.2583, 0.2583, 0.2583])
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class StageConfig:
    trainable: list[str] = field(default_factory=list)
    training_steps: int = 1000  # steps actually run
    max_steps: int = 1000  # length of the cosine schedule
    warmup_steps: int = 0
    global_batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    micro_batch_size: int = 4  # per worker; accumulation = global batch / (micro batch x workers)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: validation loss at the start and the end only
    val_samples: int = 64
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_failures: int = 1  # worker or node failures a run survives (each restarts from the last checkpoint)
    # how long a (re)start waits for nodes that fit the workers, e.g. the autoscaler's replacement
    # for a lost node, before the run fails; 0 waits as long as it takes
    capacity_wait_s: float = 1800
    # Ray's placement of the workers: PACK fills a node first; SPREAD or STRICT_SPREAD put them
    # on different nodes
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    deepspeed: str = ""  # a DeepSpeed JSON config (experiments/deepspeed/zero2.json), or "" for plain DDP
    precision: Literal["bf16", "fp32"] = "bf16"
    max_seq_len: int = 4095
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0
    pretrain: StageConfig = field(default_factory=StageConfig)
    instruction: StageConfig = field(default_factory=StageConfig)


@dataclass
class EvalConfig:
    split: str = "test"
    # the paper's evaluated tasks: report generation in three scenarios, phrase grounding, VQA
    tasks: list[str] = field(default_factory=lambda: ["single_image", "multi_image", "multi_study",
                                                      "phrase_grounding", "vqa"])
    # task -> the datasets whose samples of that task are evaluated (a task not named: all of
    # them). experiments/m4cxr.yaml names the paper's test sets within a prepared corpus.
    datasets: dict[str, list[str]] = field(default_factory=dict)
    samples_per_task: int = 0  # 0: every test sample; otherwise the first N of each task
    max_new_tokens: int = 500
    decoding: Literal["greedy", "sample"] = "greedy"
    cot: bool = True  # the headline report-generation scores ask for the findings first (CoT)
    both_cot_modes: bool = True  # also generate reports the other way, for Table 5's CoT rows
    batch_size: int = 16
    actors: int = 1  # model replicas in the Ray Data actor pool
    use_gpu: bool = False
    cpus_per_actor: float = 1.0
    bootstrap_samples: int = 1000
    bootstrap_seed: int = 0
    overlays: int = 12  # grounding pictures drawn per run
    chexbert_weights: str = ""  # a local CheXbert checkpoint (chexbert.pth): used instead of the rule labeler
    chexbert_tokenizer: str = "bert-base-uncased"  # a local folder, or a hub id when online
    radgraph: bool = True  # RadGraph F1 when the radgraph package and its weights are installed


@dataclass
class SearchSpace:
    """What a sweep varies. Ranges are [low, high]; lists of choices are categorical. An empty
    entry is not searched (the experiment's own value is kept)."""
    # raw weights per task type (mrg, image_understanding, vqa), normalised onto the simplex:
    # each trial's shares sum to 1 and scale the weights of the task type's pairs
    task_type_shares: dict[str, list[float]] = field(default_factory=dict)
    pair_multipliers: dict[str, list[float]] = field(default_factory=dict)  # "task/dataset" -> [low, high]
    strategy: list[Literal["empirical", "d1", "d2", "d3", "d4"]] = field(default_factory=list)
    lora_r: list[int] = field(default_factory=list)
    lora_alpha: list[int] = field(default_factory=list)
    lora_dropout: list[float] = field(default_factory=list)  # [low, high]
    lora_target_modules: list[list[str]] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)  # [low, high], searched on a log scale


@dataclass
class TuneConfig:
    num_trials: int = 4
    # trials side by side. A trial holds its driver (cpus_per_trial), then its Train workers
    # (train.num_workers x train.cpus_per_worker, 1 GPU each on GPU) with their preprocessing
    # actors, then its evaluation actors; N trials need N x that. 0: as many as the cluster
    # holds when the sweep starts
    max_concurrent_trials: int = 1
    # multi: NSGA-II over `objectives` at once (a Pareto front); single: TPE on their weighted
    # sum, with ASHA stopping trials early on validation loss
    objective: Literal["multi", "single"] = "multi"
    objectives: dict[str, Literal["max", "min"]] = field(default_factory=lambda: {
        "mrg_mF1-14": "max", "grounding_mIoU": "max", "vqa_BLEU-1": "max"})
    # weights of the single objective, and of the pick of the winner from the Pareto front
    weights: dict[str, float] = field(default_factory=lambda: {
        "mrg_mF1-14": 1.0, "grounding_mIoU": 1.0, "vqa_BLEU-1": 1.0})
    sampler: Literal["auto", "tpe", "nsga2"] = "auto"  # auto: NSGA-II for multi, TPE for single
    seed: int = 0
    trial_steps: int = 100  # stage-2 steps of one trial
    eval_every: int = 25  # validation loss every N steps (ASHA's signal)
    eval_samples_per_task: int = 16  # validation samples per task for the objectives
    init_checkpoint: str = ""  # each trial fine-tunes from here (the stage-1 model); "" = fresh
    early_stopping: bool = True  # ASHA, single-objective sweeps only
    grace_period: int = 25  # steps before ASHA may stop a trial
    reduction_factor: int = 2
    cpus_per_trial: float = 0.05  # the trial's driver only: its workers and actors ask for their own
    # where the Optuna study lives (any SQLAlchemy URL); "" = an SQLite file optuna.db in the
    # sweep's folder, which optuna-dashboard and optuna.load_study read
    optuna_storage: str = ""
    output_dir: str = "runs/sweeps"
    space: SearchSpace = field(default_factory=SearchSpace)


@dataclass
class TrackingConfig:
    # where training runs, evaluations and sweep trials are logged (pip install -e '.[dev]'):
    # MLflow runs and/or TensorBoard event files
    log_to: list[Literal["mlflow", "tensorboard"]] = field(default_factory=list)
    mlflow_tracking_uri: str = ""  # "" = a local SQLite store: <train.output_dir>/mlflow.db


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # the LLM's engine: vLLM where it is installed (auto), or transformers (hf); serve/model_server.py
    engine: Literal["auto", "vllm", "hf"] = "auto"


@dataclass
class Experiment:
    name: str = "experiment"
    description: str = ""  # which paper table row the file reproduces
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    source: str = field(default="", metadata={"internal": True})  # the file it was read from


# ----------------------------------------------------------------------------- loading


def read_yaml(path: Path, seen: tuple = ()) -> dict:
    """A file's mapping, with `extends: other.yaml` (relative to the file) merged underneath."""
    if not path.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = raw.pop("extends", None)
    if base:
        raw = deep_merge(read_yaml(path.parent / base, seen + (path.resolve(),)), raw)
    return raw


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    """Read an experiment YAML (and the file it extends), apply `a.b=c` overrides, validate."""
    path = Path(path)
    raw = read_yaml(path)
    for item in overrides:
        raw = apply_override(raw, item, path)
    exp = _build(Experiment, raw, "", str(path))
    exp.source = str(path)
    return exp


def experiment_from_dict(raw: dict, source: str = "<dict>") -> Experiment:
    exp = _build(Experiment, raw, "", source)
    exp.source = source
    return exp


def apply_override(raw: dict, item: str, path: Path | str = "") -> dict:
    """Set one dotted key from `a.b=c` (the value parsed as YAML) in the raw mapping."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    dotted, value_text = item.split("=", 1)
    keys = dotted.strip().split(".")
    # Check the path against the schema first, so a typo gets the same helpful message.
    _check_path(keys, f"--set {dotted}")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section in {path}")
    node[keys[-1]] = yaml.safe_load(value_text) if value_text.strip() else ""
    return raw


def to_dict(exp: Any) -> Any:
    """The config as plain data (what `m4cxr config show` prints and checkpoints store)."""
    if dataclasses.is_dataclass(exp):
        return {
            f.name: to_dict(getattr(exp, f.name))
            for f in dataclasses.fields(exp)
            if not f.metadata.get("internal")
        }
    if isinstance(exp, dict):
        return {k: to_dict(v) for k, v in exp.items()}
    if isinstance(exp, (list, tuple)):
        return [to_dict(v) for v in exp]
    return exp


def dump_experiment(exp: Experiment) -> str:
    return yaml.safe_dump(to_dict(exp), sort_keys=False, width=100)


def save_experiment(exp: Experiment, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_experiment(exp))
    return path


# ----------------------------------------------------------------------------- validation


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


# Other names people write for a key, so that a typo of the long name still finds the short key.
KEY_ALIASES = {"lr": ["learning_rate"], "global_batch_size": ["batch_size"], "weight_decay": ["wd"],
               "num_workers": ["workers"], "grad_clip": ["gradient_clipping", "max_grad_norm"]}


def closest_key(key: str, valid: list[str]) -> str | None:
    best, best_score = None, 0.0
    for name in valid:
        for spelling in [name, *KEY_ALIASES.get(name, [])]:
            score = difflib.SequenceMatcher(None, key, spelling).ratio()
            if score > best_score:
                best, best_score = name, score
    return best if best_score >= 0.6 else None


def _unknown_key(key: str, where: str, valid: list[str], source: str) -> ConfigError:
    full = f"{where}.{key}" if where else key
    close = closest_key(key, valid)
    hint = f"; did you mean '{where + '.' if where else ''}{close}'?" if close else ""
    return ConfigError(
        f"{source}: unknown key '{full}'{hint} (valid keys here: {', '.join(valid)})"
    )


def _check_path(keys: list[str], source: str) -> None:
    cls: Any = Experiment
    where = ""
    for key in keys:
        if typing.get_origin(cls) is dict:  # free keys (e.g. mixture pairs)
            cls = typing.get_args(cls)[1]
        elif dataclasses.is_dataclass(cls):
            fields = _fields(cls)
            if key not in fields:
                raise _unknown_key(key, where, list(fields), source)
            cls = fields[key]
        else:
            raise ConfigError(f"{source}: '{where}' is a value, not a section")
        where = f"{where}.{key}" if where else key


def _build(cls, raw: Any, where: str, source: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{where or 'top level'}' must be a mapping, got {raw!r}")
    fields = _fields(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise _unknown_key(str(key), where, list(fields), source)
        kwargs[key] = _coerce(fields[key], value, f"{where}.{key}" if where else key, source)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{source}: '{where}': {err}") from err


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(tp, value, where: str, source: str):
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, source)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"{source}: '{where}' must be one of {list(choices)}, got {value!r}{hint}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where, source)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{where}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{where}' must be a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _coerce(item, v, f"{where}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(
        f"{source}: '{where}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )
