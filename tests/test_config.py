import copy
import pickle

import pytest
import yaml

from m4cxr.cli import main
from m4cxr.config import (
    ConfigError, EvalConfig, PairWeight, apply_override, experiment_from_dict, load_experiment, save_experiment, to_dict,
)

from conftest import ROOT


def test_paper_experiment_holds_table6_and_model_ids():
    exp = load_experiment(ROOT / "experiments/m4cxr.yaml")
    assert exp.model.vision_encoder == "microsoft/rad-dino"
    assert exp.model.llm == "mistralai/Mistral-7B-Instruct-v0.2"
    assert (exp.model.lora.r, exp.model.lora.alpha, exp.model.lora.dropout) == (8, 32, 0.05)
    assert exp.model.projector.num_query_tokens == 361
    pre, inst = exp.train.pretrain, exp.train.instruction
    assert (pre.lr, pre.weight_decay, pre.global_batch_size, pre.max_steps, pre.warmup_steps) == (3e-4, 1e-2, 256, 10000, 500)
    assert (inst.lr, inst.weight_decay, inst.global_batch_size, inst.max_steps) == (1e-4, 1e-4, 64, 100000)
    assert pre.trainable == ["projector"] and inst.trainable == ["vision_encoder", "projector", "llm_lora"]
    assert exp.train.betas == [0.9, 0.999] and exp.train.eps == 1e-8 and exp.train.grad_clip == 1.0
    assert len(exp.data.mixture.pairs) == 50
    assert exp.data.mixture.pairs["single_image/mimic_cxr"].weight == 200.0


def test_overrides_are_typed():
    exp = load_experiment(ROOT / "experiments/quickstart.yaml",
                          ["train.instruction.lr=2e-4", "data.mixture.strategy=d3", "train.num_workers=2"])
    assert exp.train.instruction.lr == 2e-4 and isinstance(exp.train.instruction.lr, float)
    assert exp.data.mixture.strategy == "d3"
    assert exp.train.num_workers == 2


def test_mistyped_key_in_file_names_key_file_and_closest(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  instruction:\n    lerning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    msg = str(err.value)
    assert "train.instruction.lerning_rate" in msg and str(path) in msg
    assert "did you mean 'train.instruction.lr'" in msg


def test_mistyped_section_and_override(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("modle:\n  llm: x\n")
    with pytest.raises(ConfigError, match=r"unknown key 'modle'; did you mean 'model'"):
        load_experiment(path)
    with pytest.raises(ConfigError, match=r"--set data.mixtur.*did you mean 'data.mixture'"):
        load_experiment(ROOT / "experiments/quickstart.yaml", ["data.mixtur.seed=1"])


def test_wrong_types_and_choices_are_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  num_workers: two\n")
    with pytest.raises(ConfigError, match=r"'train.num_workers' must be int, got 'two'"):
        load_experiment(path)
    path.write_text("data:\n  mixture:\n    strategy: d5\n")
    with pytest.raises(ConfigError, match=r"'data.mixture.strategy' must be one of"):
        load_experiment(path)


def test_config_show_prints_resolved_yaml(capsys):
    assert main(["config", "show", str(ROOT / "experiments/quickstart.yaml"), "--set", "train.pretrain.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "name: quickstart" in out
    assert main(["config", "show", str(ROOT / "experiments/quickstart.yaml"), "--set", "train.pretrain.lrr=0.5"]) == 2
    assert "did you mean 'train.pretrain.lr'" in capsys.readouterr().err


def test_resolved_config_round_trips(tmp_path):
    exp = load_experiment(ROOT / "experiments/m4cxr.yaml")
    again = load_experiment(save_experiment(exp, tmp_path / "again.yaml"))
    assert to_dict(again) == to_dict(exp)
    assert yaml.safe_load((tmp_path / "again.yaml").read_text())["model"]["lora"]["r"] == 8


@pytest.mark.parametrize("name", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "experiments").rglob("*.yaml")))
def test_every_experiment_loads_and_round_trips(name, tmp_path):
    exp = load_experiment(ROOT / name)
    again = load_experiment(save_experiment(exp, tmp_path / "again.yaml"))
    assert to_dict(again) == to_dict(exp)


def test_errors_name_list_items_missing_keys_and_empty_sections():
    with pytest.raises(ConfigError, match=r"'train.betas\[1\]' must be float, got 'y' \(str\)"):
        experiment_from_dict({"train": {"betas": [0.9, "y"]}}, "f.yaml")
    with pytest.raises(ConfigError, match=r"f.yaml: 'data.mixture.pairs.vqa/x': the key 'weight' is required"):
        experiment_from_dict({"data": {"mixture": {"pairs": {"vqa/x": {"size": 3}}}}}, "f.yaml")
    with pytest.raises(ConfigError, match=r"f.yaml: unknown key 'source'"):
        experiment_from_dict({"source": "x"}, "f.yaml")
    with pytest.raises(ConfigError, match=r"'train.seed' is a value, not a section"):
        apply_override({}, "train.seed.x=1")
    exp = experiment_from_dict({"train": None, "tune": {"weights": {"a": "1e-2"}}})
    assert exp.train.num_workers == 1 and exp.tune.weights == {"a": 0.01} and exp.source == "<dict>"


def test_configs_are_plain_objects_that_copy_and_pickle():
    exp = load_experiment(ROOT / "experiments/quickstart.yaml")
    exp.eval.tasks = ["vqa"]  # code sets fields freely; only files are validated
    for other in (copy.deepcopy(exp), pickle.loads(pickle.dumps(exp))):
        assert other == exp and other.source == exp.source and other.eval.tasks == ["vqa"]
    assert PairWeight(2.0) == PairWeight(weight=2.0, size=0)
    assert EvalConfig().tasks == ["single_image", "multi_image", "multi_study", "phrase_grounding", "vqa"]
