"""The rule-based CheXpert-14 labeler against the upstream labeler's expected output, the
synthetic world's known labels, sentences of our own for each error seen on real reports, and
(when ../shared is beside the repository) the expert labels of the real development reports."""

import csv
import importlib.util
import json

import pytest

from m4cxr.cli import main
from m4cxr.data.schema import read_samples
from m4cxr.labeler import OBSERVATIONS, label_report, measured_agreement, rule_labeler_name

from conftest import REAL, ROOT

UPSTREAM = REAL / "chexpert_labeler"
DEV_GOLD = ROOT.parent / "shared/data/real/iu_reports_dev/reports_with_gold.csv"


def expected_rows():
    with open(UPSTREAM / "labeled_reports.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("row", expected_rows(), ids=lambda r: r["Reports"][:30])
def test_upstream_sample_reports(row):
    want = {k: int(float(v)) for k, v in row.items() if k != "Reports" and v != ""}
    assert label_report(row["Reports"]) == want


def test_agrees_with_the_synthetic_generator(synthetic_corpus):
    corpus, _ = synthetic_corpus
    reports = {s.study_id: s for s in read_samples(corpus) if s.task == "single_image"}
    agree = total = 0
    for s in reports.values():
        got = label_report(s.report)
        for obs in OBSERVATIONS:
            total += 1
            agree += got.get(obs) == s.labels.get(obs)
    assert len(reports) > 250 and agree / total >= 0.98, agree / total


def test_negation_uncertainty_and_scope():
    assert label_report("No pneumothorax. Small left effusion.") == {"Pneumothorax": 0, "Pleural Effusion": 1}
    assert label_report("Pneumothorax cannot be excluded.")["Pneumothorax"] == -1
    assert label_report("Consolidation in the left lower lobe, which may represent pneumonia.") == {
        "Consolidation": 1, "Pneumonia": -1}
    assert label_report("Plate-like atelectasis at the left base.") == {"Atelectasis": 1}
    assert label_report("Small pericardial effusion.").get("Pleural Effusion") is None  # an unmention
    assert label_report("") == {"No Finding": 1}


def test_label_command(tmp_path, capsys):
    out = tmp_path / "labels.csv"
    assert main(["label", str(UPSTREAM / "sample_reports.csv"), "--column", "Reports", "--out", str(out)]) == 2
    assert "no column 'Reports'" in capsys.readouterr().err  # the sample file has no header row
    src = tmp_path / "reports.csv"
    src.write_text("TEXT\n" + "\n".join('"' + r["Reports"].replace('"', '""') + '"' for r in expected_rows()) + "\n")
    assert main(["label", str(src), "--column", "TEXT", "--out", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and rows[0]["No Finding"] == "1.0" and rows[0]["Edema"] == "0.0" and rows[0]["Fracture"] == ""
    assert rows[2]["Consolidation"] == "-1.0"


# Sentences written for these tests, one group per error seen on real reports.
NEGATION_FAR_AFTER_THE_MENTION = [
    ("The heart size and the mediastinal silhouette are within normal limits.", "Cardiomegaly", 0),
    ("Cardiac silhouette and hilar contours are normal.", "Cardiomegaly", 0),
    ("The cardiac silhouette, mediastinum and pulmonary vessels appear within normal limits.", "Cardiomegaly", 0),
    ("Normal heart size.", "Cardiomegaly", 0),
    ("The heart is not enlarged.", "Cardiomegaly", 0),
    ("Stable heart size.", "Cardiomegaly", 0),
    ("Heart size at the upper limits of normal.", "Cardiomegaly", 0),
    ("Heart size normal with enlarged pulmonary arteries.", "Cardiomegaly", 0),
    ("Stable heart size, enlarged tortuous aorta.", "Cardiomegaly", 0),
]
ENLARGED_HEART = [
    ("The heart is mildly enlarged.", "Cardiomegaly", 1),
    ("Enlarged cardiac silhouette.", "Cardiomegaly", 1),
    ("Moderate enlargement of the cardiac silhouette.", "Cardiomegaly", 1),
    ("The cardiac silhouette is at least moderately enlarged.", "Cardiomegaly", 1),
    ("The heart and mediastinum are enlarged.", "Cardiomegaly", 1),
    ("Cardiomegaly with normal pulmonary vascularity.", "Cardiomegaly", 1),
    ("The heart may be enlarged.", "Cardiomegaly", -1),
]
BORDERLINE_COUNTS = [
    ("Borderline cardiomegaly.", "Cardiomegaly", 1),
    ("The heart size is borderline.", "Cardiomegaly", 1),
    ("Borderline enlargement of the cardiac silhouette.", "Cardiomegaly", 1),
]
DIFFERENTIAL_IS_UNCERTAIN = [
    ("Right basilar opacity; the differential includes pneumonia.", "Pneumonia", -1),
    ("Pneumonia is not excluded.", "Pneumonia", -1),
    ("Findings may represent early pneumonia.", "Pneumonia", -1),
    ("Cannot rule out a small pneumonia.", "Pneumonia", -1),
    ("Patchy opacity worrisome for pneumonia.", "Pneumonia", -1),
    ("Calcified granulomas from prior granulomatous infection.", "Pneumonia", None),
    ("History of pneumonia. The lungs are now clear.", "Pneumonia", 0),
]
ALTERNATIVES_AND_LIKELY_FINDINGS_COUNT = [  # as the expert labels count them
    ("Left basilar atelectasis or scarring.", "Atelectasis", 1),
    ("Streaky density at the right base, atelectasis versus scar.", "Atelectasis", 1),
    ("Probable small left pleural effusion.", "Pleural Effusion", 1),
]
SIGNS_ARE_NOT_THE_FINDING = [
    ("Mild pulmonary vascular congestion.", "Edema", -1),
    ("Pulmonary edema has resolved.", "Edema", 0),
    ("Swelling and soft tissue edema of the left chest wall.", "Edema", None),
    ("No effusion, consolidation or pneumothorax.", "Pneumothorax", 0),
    ("No effusion, consolidation or pneumothorax.", "Consolidation", 0),
]


@pytest.mark.parametrize("sentence,observation,expected",
                         NEGATION_FAR_AFTER_THE_MENTION + ENLARGED_HEART + BORDERLINE_COUNTS + DIFFERENTIAL_IS_UNCERTAIN
                         + ALTERNATIVES_AND_LIKELY_FINDINGS_COUNT + SIGNS_ARE_NOT_THE_FINDING,
                         ids=lambda v: v if isinstance(v, str) else repr(v))
def test_sentences_of_the_errors_seen_on_real_reports(sentence, observation, expected):
    assert label_report(sentence).get(observation) == expected


@pytest.mark.parametrize("report", [
    "Heart size and mediastinal contours are within normal limits. The lungs are clear. No pleural effusion or "
    "pneumothorax.",
    "The cardiac silhouette and mediastinum are normal in size. Clear lungs. No acute disease.",
    "Normal heart size. No focal consolidation, effusion or pneumothorax. No acute cardiopulmonary abnormality.",
])
def test_normal_reports_are_no_finding(report):
    labels = label_report(report)
    assert labels["No Finding"] == 1 and not [k for k, v in labels.items() if v != 0 and k != "No Finding"], labels


@pytest.mark.parametrize("report", [
    "Normal heart size. Low lung volumes with bronchovascular crowding.",
    "Lungs are clear. Degenerative changes of the thoracic spine.",
    "Heart size is normal. Old calcified granuloma in the right upper lobe.",
    "Clear lungs. Borderline heart size.",
])
def test_reports_naming_something_abnormal_are_not_no_finding(report):
    assert "No Finding" not in label_report(report)


def test_support_devices_alone_keep_no_finding():  # CheXpert's convention
    assert label_report("Right PICC line with its tip in the SVC. Lungs are clear.") == {
        "Support Devices": 1, "No Finding": 1}


def test_packaged_agreement_holds_figures_only():
    agreement = measured_agreement()
    assert agreement is not None and 0 <= agreement["micro_f1"] <= 1 and agreement["reports"] > 0
    assert set(agreement["per_observation_f1"]) <= set(OBSERVATIONS)
    text = json.dumps(agreement)
    assert len(text) < 2000 and "heart" not in text.lower()  # no report text in the package
    assert f"micro-F1 {agreement['micro_f1']:.3f}" in rule_labeler_name() and "not CheXbert" in rule_labeler_name()


@pytest.mark.skipif(not DEV_GOLD.is_file(), reason="the real development reports are not beside the repository")
def test_agreement_with_expert_labels_on_the_development_reports():
    spec = importlib.util.spec_from_file_location("labeler_agreement", ROOT / "benchmarks/labeler_agreement.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.read_gold(DEV_GOLD)
    figures = bench.agreement(rows, [label_report(r["report"]) for r in rows], (1,))
    assert figures["micro_f1"] >= 0.90, figures
    assert all(v["f1"] >= 0.80 for v in figures["per_observation"].values()), figures
