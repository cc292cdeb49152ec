"""The rule-based CheXpert-14 labeler against the upstream labeler's expected output and the
synthetic world's known labels."""

import csv

import pytest

from m4cxr.cli import main
from m4cxr.data.schema import read_samples
from m4cxr.labeler import OBSERVATIONS, label_report

from conftest import REAL

UPSTREAM = REAL / "chexpert_labeler"


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
