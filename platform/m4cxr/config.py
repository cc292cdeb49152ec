"""Experiment files: YAML -> a typed, validated config.

An experiment file has the sections data, model, train, eval, tune, tracking and serve, each a
pydantic model below. Pydantic checks every key: an unknown key or a value of the wrong type is
an error that names the key, the file and (for unknown keys) the closest valid key. Command-line
overrides use dotted paths: `--set train.instruction.lr=2e-4`.

The sections are plain mutable objects: what comes in (a file, a dict, DataConfig(image_size=64))
is validated; a field set afterwards (`exp.train.seed = 1`) is taken as it is.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

# DEFAULT_SYSTEM_PROMPT: the authors' system message (resources/tasks.yaml), the data default
from m4cxr.tasks import DEFAULT_SYSTEM_PROMPT, headline_task, report_scenarios


class ConfigError(ValueError):
    """A problem in an experiment file or an override, naming the key and where it came from."""


# ----------------------------------------------------------------------------- value types


def _number_from_text(value: Any) -> Any:
    # PyYAML reads 1e-4 (no dot) as a string: take it as the number it spells
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _text_keys(value: Any) -> Any:
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value


# A float (an int is taken as the float it is; "1e-4" too). Everything else is strict: no bool
# for an int, no 2.0 for an int, no number for a string, no tuple for a list.
Number = Annotated[float, BeforeValidator(_number_from_text)]
V = TypeVar("V")
Table = Annotated[dict[str, V], BeforeValidator(_text_keys)]  # free keys (YAML's 1: -> "1")
Strategy = Literal["empirical", "d1", "d2", "d3", "d4"]


class Section(BaseModel):
    """A part of an experiment file: its keys are the fields, nothing else."""
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_defaults(cls, value: Any) -> Any:
        return {} if value is None else value  # `train:` with nothing under it


# ----------------------------------------------------------------------------- sections


class PairWeight(Section):
    weight: Number
    size: int = 0  # training instances of the task-dataset (Table 10); used by the per-size strategies

    def __init__(self, *args: Any, **fields: Any):
        # positional too, as in PairWeight(2.0) or PairWeight(2.0, 500)
        super().__init__(**dict(zip(("weight", "size"), args)), **fields)


class MixtureConfig(Section):
    # empirical: the weights as written; d1: uniform over pairs; d2: by size;
    # d3: equal per task type, then uniform; d4: equal per task type, then by size (Table 7).
    strategy: Strategy = "empirical"
    seed: int = 0
    # A pair with no samples in the corpus: drop it and renormalise, or stop with an error.
    on_missing_pair: Literal["renormalise", "error"] = "renormalise"
    # Leave whole task types out (the ablations of Table 5: Exp3 without image understanding,
    # Exp4 without VQA).
    drop_task_types: list[Literal["mrg", "image_understanding", "vqa"]] = []
    # "task/dataset" -> weight and size. Empty means the paper's Table 10 shipped with the package.
    pairs: Table[PairWeight] = {}


class SyntheticConfig(Section):
    patients: int = 200
    seed: int = 0
    image_size: int = 256
    prior_share: Number = 0.5  # share of patients with a prior study
    split_shares: list[Number] = [0.7, 0.1, 0.2]  # train/validate/test


class DataConfig(Section):
    corpus_dir: str = "runs/corpus"
    image_size: int = 518  # the vision encoder's input side; boxes are relative to this frame
    box_convention: Literal["resize", "center_crop"] = "resize"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_images_multi_image: int = 5
    max_images_multi_study: int = 10
    # Ray Data preprocessing: actors that load, resize, normalise and tokenise samples
    preprocess_actors: int = 1
    preprocess_cpus: Number = 0.5
    # share of streamed samples that may fail (corrupt image, malformed row) before the run stops
    error_budget: Number = 0.01
    length_grouping: bool = True  # sort each step's samples by length into micro-batches
    # pack each step's samples into rows of up to train.max_seq_len tokens, each sample attending
    # only to itself (position ids restart per sample): the same loss, far less padding. Then
    # train.micro_batch_size counts packed rows, and length_grouping must stay on
    packing: bool = False
    # How report generation is trained (Table 5): "cot" asks for the findings, then the report;
    # "single_turn" asks for the report at once (Exp1); "separate" trains the report question and
    # the findings question as two separate single-turn tasks (Exp2).
    mrg_format: Literal["cot", "single_turn", "separate"] = "cot"
    # Report targets of the scenarios without a prior study (single-image, multi-image): "remove"
    # rewrites their references to a prior study away, keeping every finding and CheXpert label
    # ("Stable moderate cardiomegaly." -> "Moderate cardiomegaly."), so that the model does not
    # learn to compare with a study it is not given (data/prior_references.py); "keep" trains on
    # the reports as written.
    prior_references: Literal["keep", "remove"] = "keep"
    mixture: MixtureConfig = Field(default_factory=MixtureConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)


class ProjectorConfig(Section):
    kind: Literal["c_abstractor"] = "c_abstractor"
    depth: int = 3
    mlp_depth: int = 2
    hidden_size: int = 1024
    num_query_tokens: int = 361  # a square grid: 19 x 19


class LoraConfig(Section):
    r: int = 8
    alpha: int = 32
    dropout: Number = 0.05
    target_modules: list[str] = ["q_proj", "v_proj"]


class ModelConfig(Section):
    vision_encoder: str = "microsoft/rad-dino"  # hub id or local folder (ignored when vision_config is set)
    llm: str = "mistralai/Mistral-7B-Instruct-v0.2"  # hub id or local folder (ignored when llm_config is set)
    # Architecture fields (Dinov2Config / MistralConfig) to build the model with random weights
    # instead of loading it: tiny runs, tests, and the full-size summary on the meta device.
    vision_config: Table[Any] = {}
    llm_config: Table[Any] = {}
    # "" = the LLM's own tokenizer; "train" = a BPE tokenizer trained on the corpus; or a folder.
    tokenizer: str = ""
    tokenizer_vocab_size: int = 2000
    image_mean: list[Number] = [0.5307, 0.5307, 0.5307]  # Rad-DINO's
    image_std: list[Number] = [0.2583, 0.2583, 0.2583]
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    projector: ProjectorConfig = Field(default_factory=ProjectorConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)


class StageConfig(Section):
    trainable: list[str] = []
    training_steps: int = 1000  # steps actually run
    max_steps: int = 1000  # length of the cosine schedule
    warmup_steps: int = 0
    global_batch_size: int = 8
    lr: Number = 1e-4
    weight_decay: Number = 0.0


class TrainConfig(Section):
    output_dir: str = "runs/train"
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: Number = 1.0
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
    capacity_wait_s: Number = 1800
    # Ray's placement of the workers: PACK fills a node first; SPREAD or STRICT_SPREAD put them
    # on different nodes
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    deepspeed: str = ""  # a DeepSpeed JSON config (experiments/deepspeed/zero2.json), or "" for plain DDP
    precision: Literal["bf16", "fp32"] = "bf16"
    max_seq_len: int = 4095
    betas: list[Number] = [0.9, 0.999]
    eps: Number = 1e-8
    grad_clip: Number = 1.0
    pretrain: StageConfig = Field(default_factory=StageConfig)
    instruction: StageConfig = Field(default_factory=StageConfig)


def paper_eval_tasks() -> list[str]:
    """The paper's evaluated tasks: report generation in its three scenarios, phrase grounding,
    VQA (single_image, multi_image, multi_study, phrase_grounding, vqa)."""
    return [*report_scenarios(), headline_task("box"), headline_task("answer")]


class EvalConfig(Section):
    split: str = "test"
    tasks: list[str] = Field(default_factory=paper_eval_tasks)
    # task -> the datasets whose samples of that task are evaluated (a task not named: all of
    # them). experiments/m4cxr.yaml names the paper's test sets within a prepared corpus.
    datasets: Table[list[str]] = {}
    samples_per_task: int = 0  # 0: every test sample; otherwise the first N of each task
    max_new_tokens: int = 500
    decoding: Literal["greedy", "sample"] = "greedy"
    cot: bool = True  # the headline report-generation scores ask for the findings first (CoT)
    both_cot_modes: bool = True  # also generate reports the other way, for Table 5's CoT rows
    # ground every sentence of the headline mode's reports that states a present finding (the
    # model's own phrase-grounding turn, on the study's first image), scored against the finding's
    # ground-truth box where the test images have boxes (report_grounding.py)
    grounded_reports: bool = True
    # the LLM's engine (eval/inference.py): vllm, continuous batching from prompt embeddings; hf,
    # transformers' generate in static batches of batch_size. auto: vLLM where it is installed, on
    # GPU, for evaluations of at least vllm_from_requests requests, else transformers: on 2 CPU
    # cores the quickstart's model answers at 0.65x transformers' rate on vLLM, after a 30 s
    # start-up; on GPU vLLM's start-up is expected to pay back after a few hundred requests
    # (benchmarks/RESULTS.md, "Evaluation engines": measured on CPU, estimated on GPU)
    engine: Literal["auto", "vllm", "hf"] = "auto"
    vllm_from_requests: int = 400
    vllm_batch_size: int = 64  # requests per Ray Data batch to a vLLM actor, which works on 4 at once
    engine_args: Table[Any] = {}  # vLLM's own settings (AsyncEngineArgs), as they are
    batch_size: int = 16
    actors: int = 1  # model replicas in the Ray Data actor pool
    use_gpu: bool = False
    cpus_per_actor: Number = 1.0
    bootstrap_samples: int = 1000
    bootstrap_seed: int = 0
    overlays: int = 12  # grounding pictures drawn per run
    chexbert_weights: str = ""  # a local CheXbert checkpoint (chexbert.pth): used instead of the rule labeler
    chexbert_tokenizer: str = "bert-base-uncased"  # a local folder, or a hub id when online
    radgraph: bool = True  # RadGraph F1 when the radgraph package and its weights are installed


class SearchSpace(Section):
    """What a sweep varies. Ranges are [low, high]; lists of choices are categorical. An empty
    entry is not searched (the experiment's own value is kept)."""
    # raw weights per task type (mrg, image_understanding, vqa), normalised onto the simplex:
    # each trial's shares sum to 1 and scale the weights of the task type's pairs
    task_type_shares: Table[list[Number]] = {}
    pair_multipliers: Table[list[Number]] = {}  # "task/dataset" -> [low, high]
    strategy: list[Strategy] = []
    lora_r: list[int] = []
    lora_alpha: list[int] = []
    lora_dropout: list[Number] = []  # [low, high]
    lora_target_modules: list[list[str]] = []
    lr: list[Number] = []  # [low, high], searched on a log scale


class TuneConfig(Section):
    num_trials: int = 4
    # trials side by side. A trial holds its driver (cpus_per_trial), then its Train workers
    # (train.num_workers x train.cpus_per_worker, 1 GPU each on GPU) with their preprocessing
    # actors, then its evaluation actors; N trials need N x that. 0: as many as the cluster
    # holds when the sweep starts
    max_concurrent_trials: int = 1
    # multi: NSGA-II over `objectives` at once (a Pareto front); single: TPE on their weighted
    # sum, with ASHA stopping trials early on validation loss
    objective: Literal["multi", "single"] = "multi"
    objectives: Table[Literal["max", "min"]] = {"mrg_mF1-14": "max", "grounding_mIoU": "max", "vqa_BLEU-1": "max"}
    # weights of the single objective, and of the pick of the winner from the Pareto front
    weights: Table[Number] = {"mrg_mF1-14": 1.0, "grounding_mIoU": 1.0, "vqa_BLEU-1": 1.0}
    sampler: Literal["auto", "tpe", "nsga2"] = "auto"  # auto: NSGA-II for multi, TPE for single
    seed: int = 0
    trial_steps: int = 100  # stage-2 steps of one trial
    eval_every: int = 25  # validation loss every N steps (ASHA's signal)
    eval_samples_per_task: int = 16  # validation samples per task for the objectives
    init_checkpoint: str = ""  # each trial fine-tunes from here (the stage-1 model); "" = fresh
    early_stopping: bool = True  # ASHA, single-objective sweeps only
    grace_period: int = 25  # steps before ASHA may stop a trial
    reduction_factor: int = 2
    cpus_per_trial: Number = 0.05  # the trial's driver only: its workers and actors ask for their own
    # where the Optuna study lives (any SQLAlchemy URL); "" = an SQLite file optuna.db in the
    # sweep's folder, which optuna-dashboard and optuna.load_study read
    optuna_storage: str = ""
    output_dir: str = "runs/sweeps"
    space: SearchSpace = Field(default_factory=SearchSpace)


class TrackingConfig(Section):
    # where training runs, evaluations and sweep trials are logged (pip install -e '.[dev]'):
    # MLflow runs and/or TensorBoard event files
    log_to: list[Literal["mlflow", "tensorboard"]] = []
    mlflow_tracking_uri: str = ""  # "" = a local SQLite store: <train.output_dir>/mlflow.db


class ServeConfig(Section):
    host: str = "127.0.0.1"  # beyond loopback the services need API keys (M4CXR_API_KEYS) ...
    allow_unauthenticated: bool = False  # ... unless this says true
    port: int = 8000
    # the LLM's engine: vLLM where it is installed (auto), or transformers (hf); serve/model_server.py
    engine: Literal["auto", "vllm", "hf"] = "auto"


class Experiment(Section):
    name: str = "experiment"
    description: str = ""  # which paper table row the file reproduces
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    _source: str = PrivateAttr("")

    @property
    def source(self) -> str:
        """The file it was read from: not a key of the file, nor of to_dict."""
        return self._source

    @source.setter
    def source(self, value: str) -> None:
        self._source = value


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
    return experiment_from_dict(raw, str(path))


def experiment_from_dict(raw: dict, source: str = "<dict>") -> Experiment:
    try:
        exp = Experiment.model_validate(raw)
    except ValidationError as err:
        raise _config_error(err, source) from err
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
    if isinstance(exp, BaseModel):
        return {name: to_dict(getattr(exp, name)) for name in type(exp).model_fields}
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


# ----------------------------------------------------------------------------- error messages

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


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _declared(tp: Any) -> Any:
    """The type itself, without the validators Annotated attaches (Number -> float)."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


def _check_path(keys: list[str], source: str) -> None:
    """An override's dotted key must lead through sections (or free-key mappings) to a key."""
    tp: Any = Experiment
    where = ""
    for key in keys:
        tp = _declared(tp)
        if typing.get_origin(tp) is dict:  # free keys (e.g. mixture pairs)
            tp = typing.get_args(tp)[1]
        elif _is_section(tp):
            if key not in tp.model_fields:
                raise _unknown_key(key, where, list(tp.model_fields), source)
            tp = tp.model_fields[key].annotation
        else:
            raise ConfigError(f"{source}: '{where}' is a value, not a section")
        where = f"{where}.{key}" if where else key


def _locate(loc: tuple) -> tuple[str, Any]:
    """A pydantic error location as the dotted key people write (list items as [i]), and the
    type declared there."""
    tp: Any = Experiment
    where = ""
    for part in loc:
        tp = _declared(tp)
        if _is_section(tp):
            tp = tp.model_fields[part].annotation
        else:  # a list's item or a mapping's value
            tp = typing.get_args(tp)[-1]
        if isinstance(part, int):
            where = f"{where}[{part}]"
        else:
            where = f"{where}.{part}" if where else str(part)
    return where, _declared(tp)


def _config_error(err: ValidationError, source: str) -> ConfigError:
    """Pydantic's first complaint, said as the key, the file and what the key must be."""
    problems = err.errors()
    # an unknown key first: a typo is the likeliest cause of everything else
    problem = next((p for p in problems if p["type"] == "extra_forbidden"), problems[0])
    loc, value = problem["loc"], problem.get("input")
    if problem["type"] in ("extra_forbidden", "missing"):
        where, section = _locate(loc[:-1])
        if problem["type"] == "missing":
            return ConfigError(f"{source}: '{where}': the key '{loc[-1]}' is required")
        return _unknown_key(str(loc[-1]), where, list(section.model_fields), source)
    where, tp = _locate(loc)
    where = where or "top level"
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return ConfigError(f"{source}: '{where}' must be one of {list(choices)}, got {value!r}{hint}")
    if _is_section(tp) or typing.get_origin(tp) is dict:
        return ConfigError(f"{source}: '{where}' must be a mapping, got {value!r}")
    if typing.get_origin(tp) is list:
        return ConfigError(f"{source}: '{where}' must be a list, got {value!r}")
    name = getattr(tp, "__name__", str(tp))
    return ConfigError(f"{source}: '{where}' must be {name}, got {value!r} ({type(value).__name__})")
