"""Removing references to prior studies from report text (m4cxr.labeler.prior_references)."""

from __future__ import annotations

import numpy as np
import pytest

from m4cxr.data.synthetic import evolve, sample_findings
from m4cxr.data.synthetic_reports import write_report
from m4cxr.labeler.prior_references import (
    Rewrite, join_sentences, mentions_prior, remove_prior_references, split_sentences,
)
from m4cxr.labeler.rules import label_report


def rewritten(text: str) -> str:
    return remove_prior_references(text).text


@pytest.mark.parametrize("before, after", [
    ("Stable moderate cardiomegaly.", "Moderate cardiomegaly."),
    ("Unchanged right pleural effusion.", "Right pleural effusion."),
    ("The left pleural effusion has increased compared to the prior study.", "Left pleural effusion."),
    ("The previously seen right pneumothorax has resolved.", "No right pneumothorax."),
    ("Interval resolution of the left pleural effusion.", "No left pleural effusion."),
    ("New moderate left pleural effusion.", "Moderate left pleural effusion."),
    ("Worsening right consolidation.", "Right consolidation."),
    ("Improving left basilar atelectasis.", "Left basilar atelectasis."),
    ("Persistent small left pleural effusion.", "Small left pleural effusion."),
    ("The heart remains mildly enlarged.", "The heart is mildly enlarged."),
    ("A small right effusion is again seen.", "A small right effusion is seen."),
    ("Mild cardiomegaly, unchanged from the prior exam.", "Mild cardiomegaly."),
    ("There is a calcified granuloma in the left apex, unchanged since XXXX.",
     "There is a calcified granuloma in the left apex."),
    ("Bibasilar opacities are slightly worse than on the prior radiograph.", "Bibasilar opacities."),
    ("In the interval, a moderate right pleural effusion has developed.",
     "A moderate right pleural effusion is present."),
    ("Heart size is normal and unchanged.", "Heart size is normal."),
    ("The cardiomediastinal silhouette is stable and within normal limits.",
     "The cardiomediastinal silhouette is within normal limits."),
    ("A pacemaker is in stable position.", "A pacemaker."),
    ("Stable appearance of the chest without acute cardiopulmonary process.", "No acute cardiopulmonary process."),
])
def test_a_finding_stated_through_a_comparison_keeps_the_finding(before, after):
    result = remove_prior_references(before)
    assert result.text == after
    assert result.changed == 1 and result.removed == 0
    assert not mentions_prior(result.text)


@pytest.mark.parametrize("sentence", [
    "Compared to the previous radiograph, there is no relevant change.",
    "No interval change.",
    "Comparison is made to the prior study.",
    "Comparison: XXXX, XXXX.",
    "Stable chest.",
    "Unchanged.",
    "These findings are similar to the prior exam.",
])
def test_a_sentence_that_only_compares_goes(sentence):
    result = remove_prior_references("No pneumothorax. " + sentence + " The lungs are clear.")
    assert result.text == "No pneumothorax. The lungs are clear."
    assert (result.changed, result.removed) == (1, 1)


def test_a_comparison_clause_goes_and_the_finding_stays():
    text = "As compared to the previous radiograph, the patient has received a nasogastric tube."
    result = rewritten(text)
    assert not mentions_prior(result)
    assert "nasogastric tube" in result and result[0].isupper()


def test_a_structure_only_called_stable_keeps_its_name_and_its_label():
    # the labeler reads a named structure that is not called enlarged as normal: the name stays
    result = remove_prior_references("The mediastinum is stable. No pneumothorax.")
    assert result.text == "Mediastinum. No pneumothorax."
    assert label_report(result.text) == label_report("The mediastinum is stable. No pneumothorax.")


@pytest.mark.parametrize("text", [
    "The heart is mildly enlarged. There is a small left pleural effusion.",
    "Evidence of prior granulomatous disease.",
    "Prior sternotomy and CABG.",
    "Postsurgical changes of prior surgery are noted.",
    "The patient is hemodynamically stable per the request.",
    "There is increased opacity at the right base compared to the left.",
    "Increased interstitial markings throughout both lungs.",
    "Right effusion, worse than the left.",
    "Recommend follow-up radiograph to ensure resolution.",
    "Degenerative changes of the thoracic spine.",
    "1. No acute cardiopulmonary process.  2. Mild cardiomegaly.\nNo pneumothorax.",
    "",
])
def test_text_without_a_prior_study_is_left_exactly_as_it_is(text):
    assert not mentions_prior(text)
    result = remove_prior_references(text)
    assert result == Rewrite(text, 0, 0, 0)
    assert not result.changed_report


def test_untouched_sentences_keep_their_case_spacing_and_punctuation():
    text = ("FINDINGS: Heart size is NORMAL.  Stable left apical pleural thickening!\n"
            "1. No pneumothorax. 2. Unchanged XXXX opacity in the right base. 3. Lungs are clear")
    result = remove_prior_references(text)
    assert result.text == ("FINDINGS: Heart size is NORMAL.  Left apical pleural thickening!\n"
                           "1. No pneumothorax. 2. XXXX opacity in the right base. 3. Lungs are clear")
    assert result.changed == 2


def test_a_removed_sentence_keeps_the_paragraph_break():
    text = "No effusion. No change since the prior exam.\nMild cardiomegaly."
    assert rewritten(text) == "No effusion.\nMild cardiomegaly."
    assert rewritten("No change from prior.\nClear lungs.") == "Clear lungs."


def test_sentences_split_with_their_case_kept():
    text = " 1. Heart NORMAL. 2. XXXX opacity.Clear lungs!\n\nNo effusion"
    sentences, gaps = split_sentences(text)
    assert sentences == ["1. Heart NORMAL.", "2. XXXX opacity.", "Clear lungs!", "No effusion"]
    assert join_sentences(sentences, gaps) == text
    assert join_sentences([None] * 4, gaps) == ""


def test_a_multi_sentence_report():
    text = ("Comparison: XXXX. Stable mild cardiomegaly. The previously seen left pleural effusion has resolved. "
            "New right lower lobe consolidation. No pneumothorax.")
    result = remove_prior_references(text)
    assert result.text == "Mild cardiomegaly. No left pleural effusion. Right lower lobe consolidation. No pneumothorax."
    assert (result.changed, result.removed, result.kept_for_labels) == (4, 1, 0)
    assert result.changed_report
    assert label_report(result.text) == label_report(text)


def test_a_rewrite_that_would_change_the_labels_is_kept_and_counted():
    # a stub labeler that reads "stable" as a finding: the rewrite would drop it
    def labeler(text: str) -> dict:
        return {"Stability": 1} if "stable" in text.lower() else {}

    text = "Stable small left effusion. Mild cardiomegaly, unchanged."
    guarded = remove_prior_references(text, labeler=labeler)
    assert guarded.text == "Stable small left effusion. Mild cardiomegaly."
    assert (guarded.changed, guarded.kept_for_labels) == (1, 1)
    unguarded = remove_prior_references(text, labeler=labeler, check_labels=False)
    assert unguarded.text == "Small left effusion. Mild cardiomegaly."
    assert unguarded.kept_for_labels == 0


def test_the_rule_labeler_guards_a_real_label_change():
    # the rule labeler reads "no change in X" as a negation of X; "X" alone would be positive
    text = "No change in the small calcified right upper lobe nodule. Lungs are otherwise clear."
    result = remove_prior_references(text)
    assert result.text == text
    assert (result.changed, result.kept_for_labels) == (0, 1)
    assert label_report(remove_prior_references(text, check_labels=False).text) != label_report(text)


def test_synthetic_follow_up_reports_lose_every_comparison_and_keep_their_labels():
    forms = set()
    for seed in range(300):
        rng = np.random.default_rng(seed)
        findings = evolve(sample_findings(rng), rng)
        report, labels, _ = write_report(findings, rng, follow_up=True)
        result = remove_prior_references(report)
        assert result.kept_for_labels == 0, report
        assert not mentions_prior(result.text), (report, result.text)
        assert label_report(result.text) == label_report(report), (report, result.text)
        forms.update(f.change for f in findings)
    assert forms >= {"new", "increased", "decreased", "unchanged", "resolved"}


def test_the_rewrite_is_deterministic_and_idempotent():
    text = "Stable cardiomegaly. Interval resolution of the right effusion. No change."
    once = rewritten(text)
    assert once == rewritten(text)
    assert rewritten(once) == once


def test_remove_priors_command_writes_one_row_per_input_row(tmp_path, capsys):
    """`m4cxr data remove-priors`: every input row out, in order, its other columns as they are, the
    text column rewritten and the counts appended; a missing column or a ragged row is an error
    that names it."""
    import csv

    from m4cxr.cli import main

    reports = tmp_path / "reports.csv"
    rows = [{"id": "a", "text": "Stable moderate cardiomegaly. No pneumothorax.", "site": "x"},
            {"id": "b", "text": "", "site": "y"},
            {"id": "c", "text": "The lungs are clear.", "site": "z"},
            {"id": "d", "text": "No interval change.\nInterval resolution of the left pleural effusion.", "site": "w"}]
    with reports.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "text", "site"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "clean.csv"
    assert main(["data", "remove-priors", str(reports), "--column", "text", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "4 rows (1 with an empty 'text'); 2 reports rewritten: 3 sentences changed, 1 of them removed" in said
    with out.open(newline="") as f:
        written = list(csv.DictReader(f))
    assert [r["id"] for r in written] == ["a", "b", "c", "d"] and [r["site"] for r in written] == ["x", "y", "z", "w"]
    assert [r["text"] for r in written] == ["Moderate cardiomegaly. No pneumothorax.", "", "The lungs are clear.",
                                            "No left pleural effusion."]
    assert [r["prior_sentences_changed"] for r in written] == ["1", "0", "0", "2"]
    assert [r["prior_sentences_removed"] for r in written] == ["0", "0", "0", "1"]

    assert main(["data", "remove-priors", str(reports), "--column", "report", "--out", str(out)]) == 2
    assert "no column 'report'; its columns are ['id', 'text', 'site']" in capsys.readouterr().err
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("id,text\n1,Stable cardiomegaly.\n2,No change.,extra\n")
    assert main(["data", "remove-priors", str(ragged), "--column", "text", "--out", str(out)]) == 2
    assert "line 3: 1 cells more than the header's columns" in capsys.readouterr().err
