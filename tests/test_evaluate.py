"""Evaluation: scoring of predictions, baselines, paper-shaped tables, pictures, and the Ray Data
inference path on a checkpoint. (CheXbert loading: test_chexbert.py.)"""


import copy
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from m4cxr.config import load_experiment
from m4cxr.data.schema import read_sample_table
from m4cxr.eval.inference import PREDICTION_SCHEMA, Predictor
from m4cxr.eval.run import evaluate
from m4cxr.eval.scoring import score_predictions
from m4cxr.labeler.prior_references import mentions_prior
from m4cxr.eval.tables import render_tables

from conftest import ROOT

TASKS = ["single_image", "multi_image", "multi_study", "phrase_grounding", "vqa"]


def predictions_from(corpus, answer_of, per_task=20, modes=("cot",)):
    """A predictions table for the first samples of each evaluated task, answers from `answer_of`."""
    rows = []
    samples = read_sample_table(corpus, "test").to_pylist()
    for task in TASKS:
        chosen = [s for s in samples if s["task"] == task][:per_task]
        for s in chosen:
            for mode in (modes if s["task_type"] == "mrg" else ("",)):
                rows.append({"sample_id": s["sample_id"], "task": task, "task_type": s["task_type"],
                             "dataset": s["dataset"], "mode": mode, "findings": "", "prediction": answer_of(s),
                             "reference": s["answer"], "error": ""})
    return pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA)


@pytest.fixture(scope="module")
def exp():
    return load_experiment(ROOT / "experiments/quickstart.yaml", ["eval.bootstrap_samples=50"])


def test_perfect_answers_score_full_marks_and_beat_every_baseline(synthetic_corpus, exp):
    corpus, _ = synthetic_corpus
    results = score_predictions(exp, predictions_from(corpus, lambda s: s["answer"]), corpus)
    single = results["mrg"]["single_image"]["cot"]
    assert single["uncertain_as_negative"]["mF1-14"] == pytest.approx(1.0)
    assert single["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and single["ROUGE-L"] == pytest.approx(1.0)
    lo, hi = single["ci"]["mF1-14"]
    assert lo <= 1.0 <= hi + 1e-9
    ground = results["grounding"]["phrase_grounding"]
    assert ground["acc@0.5"] == 1.0 and ground["mIoU"] > 0.85 and ground["malformed"] == 0
    assert results["vqa"]["vqa"]["accuracy"] == 1.0
    # the image-blind baselines stay well below
    assert results["baselines"]["single_image"]["mF1-14"] < 0.8
    assert results["baselines"]["phrase_grounding"]["mIoU"] < ground["mIoU"] - 0.3
    assert results["baselines"]["vqa"]["accuracy"] < 0.7
    assert results["datasets"]["mrg"] == ["synthetic"]


def test_wrong_answers_score_low_and_malformed_boxes_count_as_zero(synthetic_corpus, exp):
    corpus, _ = synthetic_corpus
    wrong = {"phrase_grounding": "the box is [1,2,3", "vqa": "banana"}
    results = score_predictions(exp, predictions_from(corpus, lambda s: wrong.get(
        s["task"], "Large right pneumothorax. Severe cardiomegaly. Displaced rib fracture.")), corpus)
    ground = results["grounding"]["phrase_grounding"]
    assert ground["mIoU"] == 0.0 and ground["malformed"] == ground["samples"] == 20
    assert results["vqa"]["vqa"]["accuracy"] == 0.0
    assert results["mrg"]["single_image"]["cot"]["uncertain_as_negative"]["mF1-14"] < 0.3


def test_failed_samples_are_counted_not_dropped(synthetic_corpus, exp):
    corpus, _ = synthetic_corpus
    table = predictions_from(corpus, lambda s: s["answer"]).to_pylist()
    table[0]["error"] = "OSError: cannot identify image file"
    results = score_predictions(exp, pa.Table.from_pylist(table, schema=PREDICTION_SCHEMA), corpus)
    counts = results["counts"]["single_image/cot"]
    assert counts == {"samples": 20, "errors": 1, "error_examples": [f"{table[0]['sample_id']}: {table[0]['error']}"]}
    assert results["mrg"]["single_image"]["cot"]["samples"] == 19


def test_grounded_report_sentences_are_scored_against_the_box_of_the_finding_they_state(synthetic_corpus, exp):
    """A sentence boxed exactly on its finding scores IoU ~1, one whose answer is no box scores 0
    and counts as unboxed, a sentence stating no finding is not scored, and a finding the image
    does not hold is counted apart."""
    from m4cxr.boxes import format_box, to_relative
    from m4cxr.data.schema import ImageStore
    from m4cxr.eval.scoring import Scoring
    from m4cxr.report_grounding import grounded_sentence

    corpus, _ = synthetic_corpus
    scoring = Scoring(exp, corpus)
    truth = scoring.finding_boxes()
    sample = next(s for s in read_sample_table(corpus, "test").to_pylist()
                  if s["task"] == "single_image" and len(truth.get(s["images"][0]["image_id"], [])) >= 2)
    image_id = sample["images"][0]["image_id"]
    (first, box), (second, _) = truth[image_id][:2]
    absent = next(o for o in ("Fracture", "Pneumothorax", "Cardiomegaly", "Edema") if all(o not in obs for obs, _ in truth[image_id]))
    relative = format_box(to_relative(box, *ImageStore(corpus).size(image_id), exp.data.box_convention))
    sentences = [grounded_sentence("on the box", sorted(first), relative),
                 grounded_sentence("not boxed", sorted(second), "I cannot tell."),
                 grounded_sentence("No pneumothorax.", [], None),
                 grounded_sentence("elsewhere", [absent], "[1,1,5,5]")]
    row = {"sample_id": sample["sample_id"], "grounded": json.dumps(sentences)}
    scored = scoring.grounded_reports([row])
    assert scored["reports"] == 1 and scored["sentences"] == 2 and scored["boxed"] == 1
    assert scored["box_rate"] == 0.5 and scored["acc@0.5"] == 0.5 and 0.45 < scored["mIoU"] <= 0.5
    assert scored["sentences_without_truth"] == 1
    assert scored["finding_coverage"] == pytest.approx(
        sum(bool(obs & first) for obs, _ in truth[image_id]) / len(truth[image_id]))
    no_truth = next(s for s in read_sample_table(corpus, "test").to_pylist()
                    if s["task"] == "single_image" and s["images"][0]["image_id"] not in truth)
    assert scoring.grounded_reports([{"sample_id": no_truth["sample_id"], "grounded": json.dumps(sentences)}]) is None


def test_hallucinated_comparison_words():
    assert mentions_prior("The left effusion has increased compared to the prior study.")
    assert mentions_prior("Heart size is unchanged.")
    assert mentions_prior("Interval placement of a right chest tube.")
    assert not mentions_prior("The lungs are clear. No pleural effusion or pneumothorax.")
    assert not mentions_prior("Heart size is normal. There is mild pulmonary edema.")


def test_tables_have_the_papers_shape_and_show_paper_figures_only_on_its_test_set(synthetic_corpus, exp):
    corpus, _ = synthetic_corpus
    results = score_predictions(exp, predictions_from(corpus, lambda s: s["answer"], modes=("cot", "no_cot")), corpus)
    synthetic = render_tables(results, exp)
    for title in ("Table 1", "Table 2", "Table 3", "Table 4", "Table 5", "Table 7"):
        assert f"## {title}" in synthetic
    assert "| test set | mF1-14 | mF1-5 | MF1-14 | MF1-5 | eF1-14 | RadGraph F1 | BLEU-1 | BLEU-4 | ROUGE-L |" in synthetic
    assert "| this run (20 images, cot) | 100.0 | 100.0 |" in synthetic
    assert "LLaVA-Rad" not in synthetic and "not the paper's test set" in synthetic
    assert "RadGraph F1 skipped" in synthetic and "CheXbert skipped" in synthetic
    results["datasets"] = {"mrg": ["mimic_cxr"], "grounding": ["ms_cxr"], "vqa": ["mimic_cxr_vqa"]}
    paper = render_tables(results, exp)
    assert "| M4CXR, 2,461 images (frontal) | 60.6 | 61.8 | 40.0 | 49.5 | 53.6 | 21.8 | 33.9 | 10.3 | 28.5 |" in paper
    assert "| MedRPG | 69.9 | 59.4 |" in paper and "| paper d3 | 59.0 / 37.1 / 10.0 / 28.2 / 57.9 / 78.3 |" in paper


def test_overlay_and_report_page(synthetic_corpus, exp, tmp_path):
    from PIL import Image

    from m4cxr.eval.pictures import grounding_overlays, write_report_page

    corpus, _ = synthetic_corpus
    predictions = predictions_from(corpus, lambda s: s["answer"])
    results = score_predictions(exp, predictions, corpus)
    paths = grounding_overlays(predictions, results, corpus, tmp_path / "overlays", 3, exp.data.box_convention)
    assert len(paths) == 3
    with Image.open(paths[0]) as im:
        r, g, b = np.asarray(im.convert("RGB")).astype(int).transpose(2, 0, 1)
        assert ((r > 200) & (g > 200) & (b < 80)).any()  # the yellow reference box
        assert ((r > 200) & (g < 60) & (b < 60)).any()  # the red prediction
    page = write_report_page(tmp_path, render_tables(results, exp), paths, predictions)
    text = page.read_text()
    assert "## Table 1" in text and "![" in text and "- reference:" in text


@pytest.mark.slow  # starts a vLLM engine
def test_both_engines_answer_alike_and_report_bad_requests_as_errors(synthetic_corpus, tmp_path):
    """The inference actors of both engines on a saved checkpoint: answers for good rows (equal
    between the engines: greedy, float32), an error for a missing image and for a prompt over
    the context, never a dropped row."""
    import asyncio

    from m4cxr.model.checkpoint import save_checkpoint
    from m4cxr.model.m4cxr import build_model
    from m4cxr.model.tokenizer import corpus_texts, train_tiny_tokenizer
    from m4cxr.model.vllm_engine import vllm_installed

    corpus, _ = synthetic_corpus
    exp = load_experiment(ROOT / "experiments/quickstart.yaml")
    table = read_sample_table(corpus, "train")
    tok = train_tiny_tokenizer(corpus_texts(table.column("turns").to_pylist()[:500]), 500)
    torch.manual_seed(0)
    ckpt = save_checkpoint(build_model(exp, tok), exp, tmp_path / "ckpt")
    test = read_sample_table(corpus, "test").to_pylist()
    rows = [next(i for i, s in enumerate(test) if s["task"] == t) for t in ("single_image", "vqa", "phrase_grounding")]
    bad = dict(test[rows[1]])
    bad["images"] = [{"image_id": "no_such_image", "role": "main"}]
    long = dict(test[rows[1]])  # a question longer than the checkpoint's max_seq_len (1024)
    long["turns"] = [dict(long["turns"][0], content=long["turns"][0]["content"] + " lung" * 1100), long["turns"][1]]
    (tmp_path / "corpus/samples").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([test[r] for r in rows] + [bad, long],
                                        schema=read_sample_table(corpus, "test").schema),
                   tmp_path / "corpus/samples/test.parquet")
    (tmp_path / "corpus/images").symlink_to(corpus / "images")
    (tmp_path / "corpus/images.parquet").symlink_to(corpus / "images.parquet")
    batch = {"row": [0, 0, 1, 2, 3, 4], "mode": ["cot", "no_cot", "", "", "", ""], "checkpoint": ["default"] * 6,
             "request": list(range(6))}
    args = dict(checkpoints={"default": str(ckpt)}, corpus_dir=str(tmp_path / "corpus"), split="test",
                max_new_tokens=5, decoding="greedy", use_gpu=False)
    out = Predictor(**args)(batch).to_pylist()
    assert [r["error"] for r in out[:4]] == ["", "", "", ""]
    assert out[0]["findings"] and out[0]["prediction"] and not out[1]["findings"]
    assert out[0]["generated_tokens"] == 10 and out[2]["generated_tokens"] == 5  # random weights: never EOS
    assert "no_such_image" in out[4]["error"] and out[4]["prediction"] == ""
    assert "over the context of 1029" in out[5]["error"] and out[5]["prediction"] == ""
    if not vllm_installed():
        pytest.skip("vLLM is not installed: the transformers engine alone was checked")
    from m4cxr.eval.inference import VLLMPredictor

    predictor = VLLMPredictor(**args)
    try:
        on_vllm = asyncio.run(predictor(batch)).to_pylist()
    finally:
        predictor.close()
    assert on_vllm == out


@pytest.mark.slow  # the quickstart, then a vLLM engine
def test_m4cxr_eval_writes_the_same_predictions_and_scores_on_vllm_as_on_transformers(ray_local, quickstart_run,
                                                                                      tmp_path):
    """The quickstart's trained checkpoint, evaluated on vLLM through Ray Data: every evaluated
    task's answers equal the quickstart's own evaluation on transformers, and so do the scores.
    A sweep trial's validation takes the engine its experiment names."""
    from m4cxr.model.checkpoint import read_experiment
    from m4cxr.model.vllm_engine import vllm_installed
    from m4cxr.sweep.run import validation_objectives

    if not vllm_installed():
        pytest.skip("vLLM is not installed (the cpu-engine extra)")
    out, summary = quickstart_run
    checkpoint = summary["train"]["checkpoint"]
    exp = read_experiment(checkpoint)
    on_hf = json.loads((out / "eval/metrics.json").read_text())
    assert on_hf["engine"] == "hf"  # auto on CPU
    exp.eval.engine = "vllm"
    on_vllm = evaluate(exp, checkpoint, tmp_path / "eval", summary["data"]["corpus"])
    assert on_vllm["engine"] == "vllm"
    key = ["task", "mode", "sample_id"]
    columns = ["task", "mode", "sample_id", "findings", "prediction", "error", "generated_tokens", "grounded"]
    hf_rows = pq.read_table(out / "eval/predictions.parquet").select(columns).sort_by([(k, "ascending") for k in key])
    vllm_rows = pq.read_table(tmp_path / "eval/predictions.parquet").select(columns).sort_by([(k, "ascending") for k in key])
    assert set(hf_rows.column("task").to_pylist()) == set(exp.eval.tasks)
    assert vllm_rows.to_pylist() == hf_rows.to_pylist()
    on_vllm = json.loads((tmp_path / "eval/metrics.json").read_text())
    grounded = [s for g in hf_rows.column("grounded").to_pylist() for s in json.loads(g or "[]")]
    assert any(s["findings"] and s["answer"] for s in grounded)  # grounding questions asked and answered
    assert all(s["answer"] is None for s in grounded if not s["findings"])
    for section in ("mrg", "grounding", "vqa", "counts", "grounded_reports"):  # as text: NaN equals itself there
        assert json.dumps(on_vllm.get(section), sort_keys=True) == json.dumps(on_hf.get(section), sort_keys=True), section
    objectives = {}
    for engine in ("vllm", "hf"):
        trial = copy.deepcopy(exp)
        trial.eval.engine = engine
        objectives[engine] = validation_objectives(trial, checkpoint, summary["data"]["corpus"],
                                                   tmp_path / f"val-{engine}.parquet")
    assert objectives["vllm"] == objectives["hf"]
    assert {pq.read_schema(tmp_path / f"val-{e}.parquet").metadata[b"engine"].decode() for e in ("vllm", "hf")} == {"vllm", "hf"}
