"""Training on Ray: recovery from a worker failure, the quickstart, and the cluster file."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from m4cxr.config import load_experiment
from m4cxr.train.lineage import lineage_problems, read_metrics
from m4cxr.train.run import run_stage

from conftest import ROOT
from faults import Killer, at_step


@pytest.mark.slow
def test_rerun_with_the_same_name_resumes_a_failed_run(ray_local, synthetic_corpus, tmp_path):
    corpus, _ = synthetic_corpus
    args = [f"train.output_dir={tmp_path}", "train.instruction.training_steps=8", "train.instruction.max_steps=8",
            "train.instruction.global_batch_size=4", "train.micro_batch_size=2", "train.checkpoint_every=3",
            "train.log_every=3", "train.val_samples=8"]
    failing = load_experiment(ROOT / "experiments/quickstart.yaml", args + ["train.max_failures=0"])
    killer = Killer(tmp_path / "stopped", [(at_step(5), "RayTrainWorker")])
    killer.start()
    with pytest.raises(Exception, match="(?i)died|actor|worker"):
        run_stage(failing, "instruction", corpus, run_name="stopped")
    assert killer.killed
    summary = run_stage(load_experiment(ROOT / "experiments/quickstart.yaml", args), "instruction", corpus,
                        run_name="stopped")
    rows = read_metrics(tmp_path / "stopped")
    assert lineage_problems(rows, 8, 4) == []
    # the rerun continues from a checkpoint (step 3, or step 0 if the controller had not taken in
    # step 3's report when the worker died), not from the start
    assert summary["steps"] == 8 and summary["restarts"] == 1
    assert summary["restart_costs"][0]["resumed_from_step"] in (0, 3)


@pytest.mark.slow
def test_quickstart_learns(ray_local, quickstart_run):
    out, summary = quickstart_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    train = summary["train"]
    assert train["steps"] == 300
    assert train["val_loss_last"] < 0.6 * train["val_loss_first"], train
    assert 0.5 < train["nonpad_token_share"] <= 1.0
    ev = summary["eval"]  # the evaluation step ran end to end through Ray Data
    assert set(ev) >= {"mrg", "grounding", "vqa", "hallucinated_comparison_rate"}
    assert set(ev["mrg"]) == {"mF1-14", "MF1-14", "BLEU-4", "ROUGE-L", "baseline_mF1-14"}
    assert set(ev["grounding"]) == {"mIoU", "acc@0.5", "baseline_mIoU"}
    metrics = json.loads((out / "eval/metrics.json").read_text())
    assert metrics["counts"]["single_image/cot"] == {"samples": 6, "errors": 0, "error_examples": []}
    assert metrics["counts"]["single_image/no_cot"]["samples"] == 6
    assert len(list((out / "eval/overlays").glob("*.png"))) == 2
    assert "## Table 1" in (out / "eval/report.md").read_text()
    assert summary["sweep"]["trials"] == 2 and summary["sweep"]["completed"] == 2
    assert summary["serve"]["requests_ok"] == 5 and summary["serve"]["requests_failed"] == 0
    assert summary["serve"]["checkpoints"] == ["default", "sweep-best"]
    rewrites = summary["data"]["prior_references"]  # the quickstart trains without invented priors
    assert rewrites["setting"] == "remove" and 0 < rewrites["changed"] < rewrites["targets"]
    assert isinstance(summary["serve"]["answers"]["mrg"]["sentences"], list)  # its report request is grounded
    from m4cxr.model.checkpoint import load_checkpoint

    card = json.loads((Path(train["checkpoint"]) / "evaluation.json").read_text())  # the web page shows it
    assert card["experiment"] == "quickstart" and card["headline"]["mIoU"] == ev["grounding"]["mIoU"]
    model, exp = load_checkpoint(train["checkpoint"])
    assert exp.name == "quickstart" and model.tokens_per_image == 16


def test_cluster_file_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    workers = cfg["available_node_types"]["h100_worker"]
    assert workers["resources"]["GPU"] >= 1 and workers["max_workers"] > workers["min_workers"]
    assert cfg["docker"]["image"].startswith("rayproject/ray:") and "ray-ml" not in cfg["docker"]["image"]
    assert any("[gpu]" in c for c in cfg["setup_commands"])
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["h100_worker"]["min_worker"] = 1
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(broken))
