import json
import re

import numpy as np
from PIL import Image

from m4cxr.cli import main
from m4cxr.boxes import parse_box, parse_boxes, to_relative
from m4cxr.data.schema import ImageStore, read_samples
from m4cxr.tasks import cot_candidates, count_images, task_names



def test_all_17_tasks_in_all_splits_without_leakage(synthetic_corpus, capsys):
    out, _ = synthetic_corpus
    assert main(["data", "stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert set(stats["tasks"]) == set(task_names())
    for task, by_split in stats["tasks"].items():
        assert all(by_split.get(s, 0) > 0 for s in ("train", "validate", "test")), task
    assert stats["leakage"]["patients_in_several_splits"] == 0
    assert sum(stats["patients"].values()) == 200
    assert stats["patients"]["train"] == 140


def test_samples_are_consistent_with_their_images_and_targets(synthetic_corpus):
    out, _ = synthetic_corpus
    store = ImageStore(out)
    samples = read_samples(out)
    for s in samples:
        assert count_images(s.turns) == len(s.images), s.sample_id
        for ref in s.images:
            assert store.path(ref["image_id"]).exists()
        if s.task in ("finding_grounding", "organ_grounding", "phrase_grounding", "anatomical_region_grounding") and s.boxes:
            w, h = store.size(s.images[0]["image_id"])
            assert parse_box(s.answer) == to_relative(s.boxes[0]["box"], w, h)
        if s.task == "abnormality_detection":
            assert len(parse_boxes(s.answer)) == len(s.boxes)
    # every patient's samples stay in one split; follow-up studies have a prior study
    multi_study = [s for s in samples if s.task == "multi_study"]
    assert all(s.prior_report and [i["role"] for i in s.images][0] == "prior" for s in multi_study)


def test_reports_labels_and_comparisons(synthetic_corpus):
    out, _ = synthetic_corpus
    reports = [s for s in read_samples(out, "train") if s.task == "single_image"]
    compare = re.compile(r"prior study|previously|[Uu]nchanged|[Ii]nterval|^New |\. New ")
    followups = [s for s in reports if s.study_id.endswith("_s2")]
    firsts = [s for s in reports if s.study_id.endswith("_s1")]
    assert followups and firsts
    assert not any(compare.search(s.report) for s in firsts)  # only follow-up reports compare
    assert sum(bool(compare.search(s.report)) for s in followups) > 0.5 * len(followups)
    for s in reports:
        if "No pleural effusion" in s.report:
            assert s.labels["Pleural Effusion"] == 0
        if "may represent pneumonia" in s.report:
            assert s.labels["Pneumonia"] == -1
        if s.labels.get("No Finding") == 1:
            assert not any(v in (1, -1) for k, v in s.labels.items() if k not in ("No Finding", "Support Devices"))
        # the CoT answer lists the positive observations (never uncertain ones) in candidate order
        positives = [c for c in cot_candidates() if s.labels.get(c) == 1]
        assert s.turns[2]["content"] == (", ".join(positives).lower() + "." if positives else "Not found.")
    by_study = {s.study_id: s.report for s in reports}
    assert len(set(by_study.values())) > 0.8 * len(by_study)  # varied phrasing
    assert any(v == -1 for s in reports for v in s.labels.values())  # hedges exist


def test_same_seed_same_world(tmp_path):
    from m4cxr.config import SyntheticConfig
    from m4cxr.data.synthetic import synthesize

    a = synthesize(tmp_path / "a", SyntheticConfig(patients=6, seed=3, image_size=64), progress=False)
    b = synthesize(tmp_path / "b", SyntheticConfig(patients=6, seed=3, image_size=64), progress=False)
    assert a["tasks"] == b["tasks"]
    sa = {s.sample_id: s for s in read_samples(tmp_path / "a")}
    sb = {s.sample_id: s for s in read_samples(tmp_path / "b")}
    assert sa == sb
    img = sorted((tmp_path / "a/images").iterdir())[0].name
    assert (np.asarray(Image.open(tmp_path / "a/images" / img)) == np.asarray(Image.open(tmp_path / "b/images" / img))).all()


def test_finding_boxes_sit_on_what_was_drawn():
    """A nodule's box holds brighter pixels than the same place in the same patient without it."""
    from m4cxr.data.synthetic_xray import Finding, draw_frontal, sample_anatomy

    anat = sample_anatomy(np.random.default_rng(1))
    plain = draw_frontal(anat, [], 128, np.random.default_rng(2))
    with_nodule = draw_frontal(anat, [Finding("mass", "right", "mid", 0.8)], 128, np.random.default_rng(2))
    (_, box), = with_nodule.finding_boxes
    x1, y1, x2, y2 = (int(v) for v in box)
    inside = with_nodule.pixels[y1:y2, x1:x2].astype(float).mean() - plain.pixels[y1:y2, x1:x2].astype(float).mean()
    assert inside > 20
    # the patient's right lung is on the image's left
    assert with_nodule.organ_boxes["right lung"][2] <= 64 < with_nodule.organ_boxes["left lung"][0] + 10
    assert len(with_nodule.region_boxes) == 29
