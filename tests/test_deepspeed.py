"""DeepSpeed ZeRO-2 through the Ray Train loop (runs where the `gpu` extra is installed; on CPU
DeepSpeed uses gloo)."""

import json

import pytest

from m4cxr.config import load_experiment
from m4cxr.train.run import run_stage

from conftest import ROOT

pytest.importorskip("deepspeed")


def test_zero2_trains_and_checkpoints(ray_local, synthetic_corpus, tmp_path):
    corpus, _ = synthetic_corpus
    exp = load_experiment(ROOT / "experiments/quickstart.yaml", [
        f"train.output_dir={tmp_path}", "train.instruction.training_steps=8", "train.instruction.max_steps=8",
        "train.instruction.global_batch_size=4", "train.micro_batch_size=2", "train.checkpoint_every=4",
        "train.val_samples=8", f"train.deepspeed={ROOT / 'experiments/deepspeed/zero2.json'}"])
    summary = run_stage(exp, "instruction", corpus, run_name="zero2")
    log = [json.loads(line) for line in (tmp_path / "zero2/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log] == list(range(1, 9))
    assert log[-1]["loss"] < log[0]["loss"]
    assert summary["val_loss_last"] < summary["val_loss_first"]
    assert list(tmp_path.glob("zero2/checkpoint_*/engine/*optim_states.pt"))
