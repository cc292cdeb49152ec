"""The paper's metrics against known answers and hand-computed cases."""

import json

import numpy as np
import pytest

from m4cxr.cli import main
from m4cxr.eval.metrics import (
    bootstrap_ci, chexpert_scores, grounding_scores, nlg_scores, tokenize_report, vqa_scores,
)

from conftest import REAL

KNOWN = REAL / "nlg_known_answers"
NAMES = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4", "ROUGE_L": "ROUGE-L"}


@pytest.mark.parametrize("case", json.loads((KNOWN / "cases.json").read_text())["cases"], ids=lambda c: c["id"])
def test_nlg_known_answers(case):
    scores = nlg_scores(case["hypotheses"], case["references"], tokenize=False)
    for key, name in NAMES.items():
        assert abs(scores[name] - case["expected"][key]) < 1e-6, (key, scores[name], case["expected"][key])


def test_score_nlg_command(capsys):
    assert main(["score", "nlg", "--hyps", str(KNOWN / "examples_hyp.txt"), "--refs", str(KNOWN / "examples_ref1.txt"),
                 "--refs", str(KNOWN / "examples_ref2.txt"), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"}
    assert abs(scores["BLEU-4"] - 0.201143) < 1e-6 and abs(scores["ROUGE-L"] - 0.522104) < 1e-6


def test_report_tokenisation():
    assert tokenize_report("Small left effusion. No pneumothorax!") == "small left effusion . no pneumothorax !"


def test_chexpert_f1_by_hand():
    ref = [{"Cardiomegaly": 1, "Edema": 1}, {"Pleural Effusion": -1}, {"No Finding": 1}]
    gen = [{"Cardiomegaly": 1, "Atelectasis": 1}, {"Pleural Effusion": 1}, {"No Finding": 1}]
    s = chexpert_scores(gen, ref)
    neg, pos = s["uncertain_as_negative"], s["uncertain_as_positive"]
    # uncertain as negative: TP cardiomegaly + no finding = 2, FP atelectasis + effusion = 2, FN edema = 1
    assert neg["mF1-14"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    # the uncertain effusion becomes a true positive when uncertain counts as positive
    assert pos["mF1-14"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    # macro over 14 labels: cardiomegaly 1, no finding 1, effusion 0 or 1, the rest 0
    assert neg["MF1-14"] == pytest.approx(2 / 14) and pos["MF1-14"] == pytest.approx(3 / 14)
    # example-based: report 1 F1 = 2*1/(2+1+1) = 0.5, report 2 0 or 1, report 3 1
    assert neg["eF1-14"] == pytest.approx((0.5 + 0 + 1) / 3) and pos["eF1-14"] == pytest.approx((0.5 + 1 + 1) / 3)
    # the -5 set: cardiomegaly TP; edema FN; atelectasis and (uncertain) effusion FP
    assert neg["mF1-5"] == pytest.approx(2 * 1 / (2 * 1 + 2 + 1))


def test_grounding_and_vqa():
    g = grounding_scores(["[0,0,10,10]", "[0,0,10,20]", "Not found.", "[5,5,1,1]"], [(0, 0, 10, 10)] * 4)
    assert g["iou"] == [1.0, 0.5, 0.0, 0.0]  # unparseable and malformed answers score 0
    assert g["mIoU"] == pytest.approx(0.375) and g["acc@0.5"] == pytest.approx(0.5)
    v = vqa_scores(["Yes.", "left lower lung", "no"], ["yes", "right lower lung", "yes"])
    assert v["accuracy"] == pytest.approx(1 / 3)
    assert v["recall"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert v["per_sample"]["bleu1"][0] == pytest.approx(1.0, abs=1e-6)


def test_bootstrap_interval():
    values = np.random.default_rng(0).random(400)
    lo, hi = bootstrap_ci(lambda idx: values[idx].mean(), len(values), resamples=500, seed=1)
    assert lo < values.mean() < hi and hi - lo < 0.1
    assert (lo, hi) == bootstrap_ci(lambda idx: values[idx].mean(), len(values), resamples=500, seed=1)
