"""The data path pieces without a cluster: the resumable draw, preprocessing, micro-batches."""


import numpy as np
import pytest

from m4cxr.config import load_experiment
from m4cxr.data.pipeline import (
    PrepareSamples, draw_rows, pair_rows, prepare_args, stage_mixture, step_batches, validation_rows, worker_positions,
)
from m4cxr.data.schema import read_sample_table
from m4cxr.train.loop import DataBudgetExceeded, check_error_budget, warmup_cosine
from m4cxr.train.run import prepare_tokenizer

from conftest import ROOT


@pytest.fixture(scope="module")
def setup(synthetic_corpus):
    corpus, _ = synthetic_corpus
    exp = load_experiment(ROOT / "experiments/quickstart.yaml", [f"data.corpus_dir={corpus}"])
    tok_dir = prepare_tokenizer(exp, corpus)
    return exp, str(corpus), tok_dir


def test_draw_is_resumable_and_workers_share_each_step(setup, tmp_path):
    exp, corpus, _ = setup
    mixture = stage_mixture(exp, "instruction", corpus)
    rows_by_pair = pair_rows(corpus, mixture)
    full = draw_rows({"positions": [np.arange(0, 100)]}, mixture, rows_by_pair)
    assert (full["position"] == np.arange(100)).all()
    tasks = read_sample_table(corpus, "train").column("task").to_pylist()
    drawn_tasks = {tasks[r] for r in full["row"]}
    assert len(drawn_tasks) > 8  # the stream mixes many tasks
    # a stream resumed at position 40 draws the same samples as the full stream did there
    resumed = draw_rows({"positions": [np.arange(40, 100)]}, mixture, rows_by_pair)
    assert (resumed["row"] == full["row"][40:]).all()
    # step s trains positions [8s, 8s+8): worker r of 2 the r-th half; resumed after step 3
    assert worker_positions(3, 5, 8, 0, 2).tolist() == [24, 25, 26, 27, 32, 33, 34, 35]
    assert worker_positions(3, 5, 8, 1, 2).tolist() == [28, 29, 30, 31, 36, 37, 38, 39]
    assert sorted(np.concatenate([worker_positions(0, 5, 8, r, 4) for r in range(4)])) == list(range(40))
    with pytest.raises(ValueError, match="not a multiple of 3 workers"):
        worker_positions(0, 5, 8, 0, 3)
    # stage 1 draws report samples only
    pre = stage_mixture(exp, "pretrain", corpus)
    rows = draw_rows({"positions": [np.arange(50)]}, pre, pair_rows(corpus, pre))["row"]
    assert {tasks[r] for r in rows} == {"single_image"}


def test_prepare_samples_and_bad_rows(setup, tmp_path):
    exp, corpus, tok_dir = setup
    prep = PrepareSamples(**prepare_args(exp, corpus, "train", tok_dir, 16, "instruction"))
    table = prep.table.to_pylist()
    row = next(i for i, s in enumerate(table) if s["task"] == "multi_study")
    out = prep({"row": np.array([row]), "position": np.array([7])}).to_pydict()
    n_images = len(table[row]["images"])
    assert out["error"][0] == "" and out["n_images"][0] == n_images
    assert len(out["pixels"][0]) == n_images * 112 * 112  # one uint8 byte per pixel
    ids = np.frombuffer(out["input_ids"][0], np.int32)
    assert (ids == prep.tokenizer.convert_tokens_to_ids("<image>")).sum() == 16 * n_images
    # a corrupt image becomes an error row that names the sample, not a crash or a silent drop
    image = prep.store.path(table[row]["images"][0]["image_id"])
    saved = image.read_bytes()
    try:
        image.write_bytes(b"\x89PNG broken")
        bad = prep({"row": np.array([row]), "position": np.array([7])}).to_pydict()
    finally:
        image.write_bytes(saved)
    assert table[row]["sample_id"] == bad["sample_id"][0]
    assert "cannot identify image file" in bad["error"][0] and image.name in bad["error"][0]
    assert len(bad["input_ids"][0]) == 0 and bad["n_images"][0] == 0
    # single-turn report generation (Exp1) and the separate findings question (Exp2)
    single = PrepareSamples(**{**prepare_args(exp, corpus, "train", tok_dir, 16, "instruction"), "mrg_format": "single_turn"})
    turns, _ = single.conversation(table[row], 0)
    assert [t["role"] for t in turns] == ["system", "user", "assistant"] and turns[2]["content"] == table[row]["report"]
    separate = PrepareSamples(**{**prepare_args(exp, corpus, "train", tok_dir, 16, "instruction"), "mrg_format": "separate"})
    assert separate.conversation(table[row], 1)[0][-1]["content"] == table[row]["turns"][2]["content"]
    assert separate.conversation(table[row], 2)[0][-1]["content"] == table[row]["report"]
    # stage 1: the image and its report, no instruction
    pre = PrepareSamples(**prepare_args(exp, corpus, "train", tok_dir, 16, "pretrain"))
    single_row = next(i for i, s in enumerate(table) if s["task"] == "single_image")
    turns, images = pre.conversation(table[single_row], 0)
    assert turns == [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": table[single_row]["report"]}]


def test_length_grouping_cuts_padding(setup):
    exp, corpus, tok_dir = setup
    prep = PrepareSamples(**prepare_args(exp, corpus, "train", tok_dir, 16, "instruction"))
    rng = np.random.default_rng(0)
    rows = rng.choice(len(prep.table), size=64, replace=False)
    prepared = prep({"row": rows, "position": np.arange(64)}).to_pydict()
    prepared["error"][3] = "OSError: broken"
    norm = (exp.model.image_mean, exp.model.image_std)
    grouped, g = step_batches(prepared, 4, 0, 112, *norm, group_by_length=True)
    plain, p = step_batches(prepared, 4, 0, 112, *norm, group_by_length=False)
    assert g["tokens"] == p["tokens"]
    assert g["tokens"] / g["padded_tokens"] > p["tokens"] / p["padded_tokens"]
    assert g["tokens"] / g["padded_tokens"] > 0.9
    assert len(g["errors"]) == 1 and "OSError" in g["errors"][0] and g["rows"] == 64
    assert sum(len(b["task_type"]) for b in grouped) == 63
    assert grouped[0]["pixel_values"].shape[1:] == (3, 112, 112)
    # the worker's normalisation matches the model's own preprocessing of the same images
    from m4cxr.model.vision import pixel_values

    first = next(i for i in range(64) if not prepared["error"][i])
    sample = prep.table.slice(int(rows[first]), 1).to_pylist()[0]
    images = [prep.store.load(i["image_id"]) for i in sample["images"]]
    one, _ = step_batches({k: v[first:first + 1] for k, v in prepared.items()}, 4, 0, 112, *norm)
    import torch

    assert torch.allclose(one[0]["pixel_values"], pixel_values(images, 112, *norm), atol=1e-6)


def test_validation_rows_cover_all_tasks(setup):
    _, corpus, _ = setup
    rows = validation_rows(corpus, 34, "instruction")
    tasks = read_sample_table(corpus, "validate").column("task").to_pylist()
    assert len(rows) == 34 and len({tasks[r] for r in rows}) == 17


def test_schedule_and_error_budget():
    f = warmup_cosine(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    check_error_budget(2, 200, 0.01, ["a"])  # one bad sample early on does not stop a run
    with pytest.raises(DataBudgetExceeded, match="3 failed samples.*of the 200.*last: s9: OSError"):
        check_error_budget(3, 200, 0.01, ["s9: OSError: broken"])


def test_prior_references_removed_from_targets_without_a_prior_study(setup, tmp_path):
    """data.prior_references=remove: single- and multi-image report targets (report, CoT answer,
    single-turn and stage-1 targets) lose their comparisons and keep their labels; multi-study
    targets, whose prompt holds the prior, stay as written; the counts come with `data stats`."""
    from m4cxr.cli import main
    from m4cxr.data.prior_references import count_rewrites
    from m4cxr.labeler.prior_references import mentions_prior
    from m4cxr.labeler.rules import label_report

    exp, corpus, tok_dir = setup
    args = prepare_args(exp, corpus, "train", tok_dir, 16, "instruction")
    keep = PrepareSamples(**{**args, "prior_references": "keep"})
    remove = PrepareSamples(**{**args, "prior_references": "remove"})
    table = keep.table.to_pylist()
    comparing = [s for s in table if s["task"] in ("single_image", "multi_image") and mentions_prior(s["report"])]
    assert len(comparing) > 20  # the synthetic world's follow-up reports compare, as MIMIC-CXR's do
    for sample in comparing:
        turns, _ = remove.conversation(sample, 0)
        assert turns[:-1] == sample["turns"][:-1]  # the question and the CoT findings answer as they were
        assert not mentions_prior(turns[-1]["content"]), turns[-1]["content"]
        assert label_report(turns[-1]["content"]) == label_report(sample["report"])
        assert keep.conversation(sample, 0)[0] == sample["turns"]
    single_turn = PrepareSamples(**{**args, "prior_references": "remove", "mrg_format": "single_turn"})
    assert not mentions_prior(single_turn.conversation(comparing[0], 0)[0][-1]["content"])
    stage1 = PrepareSamples(**{**args, "stage": "pretrain", "prior_references": "remove"})
    single = next(s for s in comparing if s["task"] == "single_image")
    assert not mentions_prior(stage1.conversation(single, 0)[0][-1]["content"])
    study = next(s for s in table if s["task"] == "multi_study" and mentions_prior(s["report"]))
    assert remove.conversation(study, 0)[0] == study["turns"]
    counts = count_rewrites(corpus, "train")
    assert counts["changed"] == len(comparing) and counts["targets"] > counts["changed"]
    assert main(["data", "stats", corpus]) == 0
