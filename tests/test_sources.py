"""The dataset adapters on tiny copies of each dataset in its official layout (tests/dataset_fixtures.py):
the samples, boxes and labels each one makes, and the malformed record each one reports."""

from collections import Counter

import numpy as np
import pytest

import dataset_fixtures as F
from m4cxr.boxes import to_relative
from m4cxr.data.prepare import PrepareContext, run_adapters
from m4cxr.data.sources import siim as siim_source
from m4cxr.config import DataConfig
from m4cxr.data.sources.common import Collector, SourceError
from m4cxr.data.sources.mimic_reports import clean_report
from m4cxr.tasks import count_images


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    sources = F.all_sources(tmp_path_factory.mktemp("datasets"))
    return sources, {c.dataset: c for c in run_adapters(sources, DataConfig(image_size=64), progress=False)}


def by_task(c, task, split=None):
    return [s for s in c.samples if s.task == task and (split is None or s.split == split)]


def counts(c):
    return Counter((s.task, s.split) for s in c.samples)


# Each fixture plants one malformed record: it is reported with the record's place and why.
MALFORMED = {
    "mimic_cxr": ("metadata.csv.gz line 22", "not-a-date"), "ms_cxr": ("line 6", "empty box"),
    "imagenome": ("train.csv line 5", "no scene graph"), "mimic_cxr_vqa": ("train.json[3]", "question"),
    "mimic_diff_vqa": ("line 6", "holdout"), "radialog": ("[5]", "human/gpt"),
    "vindr_cxr": ("annotations_train.csv line 5", "Bogus finding"), "chestx_ray14": ("line 6", "Bogus"),
    "chestx_det10": ("train.json[2]", "1 syms but 0 boxes"), "jsrt": ("CLNDAT_EN.txt line 3", "abc"),
    "siim": ("train-rle.csv line 5", "odd number"), "rsna": ("line 6", "Target 'x'"),
    "covid19_radiography": ("Lung_Opacity-1.png", "no mask"), "covid_qu_ex": ("covid_9.png", "no infection mask"),
    "qata_cov19": ("covid_12.png", "no mask"), "brax": ("line 4", "'2'"), "chexpert": ("train.csv line 4", "'yes'"),
    "slake": ("test.json[5]", "missing"),
}


@pytest.mark.parametrize("dataset", sorted(MALFORMED))
def test_every_adapter_reports_its_malformed_record(collected, dataset):
    _, by_name = collected
    where, why = MALFORMED[dataset]
    skipped = by_name[dataset].skipped
    assert len(skipped) == 1, skipped
    assert where in skipped[0]["record"] and why in skipped[0]["reason"], skipped[0]
    assert by_name[dataset].samples, "the good records still make samples"


def test_mimic_cxr_scenarios_rules_and_time_order(collected):
    c = collected[1]["mimic_cxr"]
    # Worked out by hand from tests/dataset_fixtures.py MIMIC_STUDIES (studies with usable FINDINGS:
    # train 50000001 (2 images), 50000002 (5), 50000003 (6); test 50000013 (2), 50000011 (2);
    # validate 50000022 (1)):
    # single-image, every image: train 2 + 5 + 6 = 13, test 2 + 2 = 4, validate 1.
    # multi-image, studies of 1 to 5 images: train 50000001, 50000002 (50000003 has 6); validate
    # 50000022 (one image counts); test: one per frontal image, 50000013 and 50000011 have one each.
    # multi-study: train 50000002 after 50000001 (7 images; 50000003 after 50000002 has 11); validate
    # 50000022's prior has no FINDINGS: none; test: 50000011 after 50000013, and 50000013 whose
    # prior has no FINDINGS, alone, asked as multi-image.
    assert counts(c) == {("single_image", "train"): 13, ("multi_image", "train"): 2, ("multi_study", "train"): 1,
                         ("single_image", "test"): 4, ("multi_image", "test"): 2, ("multi_study", "test"): 2,
                         ("single_image", "validate"): 1, ("multi_image", "validate"): 1}
    assert c.excluded == {"report without a FINDINGS section": 1, "FINDINGS shorter than 5 characters": 1,
                          "multi-image: study of more than 5 images": 1,
                          "multi-study: more than 10 images in the two studies": 1,
                          "multi-study: the previous study has no usable FINDINGS": 1}
    one_image = by_task(c, "multi_image", "validate")[0]
    assert one_image.study_id == "50000022" and count_images(one_image.turns) == 1
    # Two studies on one day: StudyTime 80556.875 (08:05) comes before 134500.0 (13:45).
    train_pair = by_task(c, "multi_study", "train")[0]
    assert [i["role"] for i in train_pair.images] == ["prior"] * 2 + ["current"] * 5
    assert train_pair.images[0]["image_id"] == f"mimic_{F.dicom_id(1)}"
    assert train_pair.report == "small left pleural effusion is unchanged . no pneumothorax ."
    # Study ids are random: 50000013 (January) is the prior of 50000011 (March).
    alone, test_pair = by_task(c, "multi_study", "test")
    assert alone.study_id == "50000013" and alone.prior_report is None and alone.turns[1:] == \
        by_task(c, "multi_image", "test")[0].turns[1:]  # no prior study: the multi-image question
    assert test_pair.study_id == "50000011"
    assert test_pair.prior_report == clean_report("There is mild pulmonary edema. Right basilar atelectasis.")
    assert count_images(test_pair.turns) == 4
    # Chain-of-thought answers: the label file (uncertain counts as absent), else the labeler.
    answers = {s.study_id: s.turns[2]["content"] for s in by_task(c, "single_image")}
    assert answers["50000001"] == "pleural effusion."
    assert answers["50000011"] == "edema."  # Atelectasis is -1 in the file
    assert answers["50000013"] == "edema, atelectasis."  # not in the file: the labeler
    assert answers["50000022"] == "Not found."
    multi = by_task(c, "multi_image", "train")
    assert all(s.images[0]["image_id"] in {f"mimic_{F.dicom_id(1)}", f"mimic_{F.dicom_id(3)}"} for s in multi)
    assert [i["image_id"][6:14] for i in multi[1].images] == ["00000003", "00000005", "00000004", "00000006", "00000007"]
    assert {s.patient_id for s in c.samples} == {"mimic_10000001", "mimic_10000002", "mimic_10000003"}
    assert c.images[f"mimic_{F.dicom_id(F.MIMIC_DICOM)}"].path.endswith(".dcm")  # no JPG: the DICOM release


def test_mimic_cxr_test_study_with_two_frontal_views_is_two_instances(tmp_path, monkeypatch):
    """The paper's test set has one multi-image and one multi-study instance per frontal image:
    a test study with a PA, an AP and a lateral view gives two of each, each led by its own
    frontal view, the rest in study order; its single-image instances are its three images. A test
    study without a frontal view is in no multi-image or multi-study instance, and is counted."""
    studies = {**F.MIMIC_STUDIES, "10000002": F.MIMIC_STUDIES["10000002"] + [
        ("50000014", 21900501, "100000.0", [(22, "PA"), (23, "AP"), (24, "LATERAL")],
         "Mild pulmonary edema persists. No pleural effusion.", "test"),
        ("50000015", 21900601, "100000.0", [(25, "LATERAL")], "No pleural effusion.", "test")]}
    monkeypatch.setattr(F, "MIMIC_STUDIES", studies)
    (c,) = run_adapters({"mimic_cxr": F.mimic_cxr(tmp_path)}, DataConfig(image_size=64), progress=False)
    # the other test studies as in the test above (4 single-image, 2 + 2 multi): 3 + 2 + 2 more for
    # 50000014; 50000015, a lateral view alone, is one single-image instance and no other
    assert {k: v for k, v in counts(c).items() if k[1] == "test"} == \
        {("single_image", "test"): 8, ("multi_image", "test"): 4, ("multi_study", "test"): 4}
    assert c.excluded["test multi-image and multi-study: study without a frontal image"] == 1
    ids = lambda s: [i["image_id"].removeprefix("mimic_")[:8] for i in s.images]  # noqa: E731
    new = [s for s in by_task(c, "multi_image", "test") if s.study_id == "50000014"]
    assert [ids(s) for s in new] == [["00000016", "00000017", "00000018"], ["00000017", "00000016", "00000018"]]
    pairs = [s for s in by_task(c, "multi_study", "test") if s.study_id == "50000014"]
    assert [ids(s) for s in pairs] == [["0000000e", "0000000f", "00000016", "00000017", "00000018"],
                                       ["0000000e", "0000000f", "00000017", "00000016", "00000018"]]
    assert all(s.prior_report == clean_report("Edema has improved. Right basilar atelectasis may be present.")
               for s in pairs)  # the prior is 50000011, the study before it in time
    assert len({s.sample_id for s in new + pairs}) == 4


def test_ms_cxr_phrases_with_several_boxes(collected):
    c = collected[1]["ms_cxr"]
    train = by_task(c, "phrase_grounding", "train")[0]
    assert train.turns[-1]["content"] == "[25,25,50,50], [50,50,75,75]."  # 64 x 80 image, two boxes
    assert [b["box"] for b in train.boxes] == [[16, 20, 32, 40], [32, 40, 48, 60]]
    generation = by_task(c, "grounded_phrase_generation", "train")[0]
    assert "[25,25,75,75]" in generation.turns[1]["content"] and generation.answer == "Left pleural effusion."
    assert {s.split for s in c.samples} == {"train", "validate", "test"}
    assert by_task(c, "phrase_grounding", "test")[0].patient_id == "mimic_10000002"


def test_imagenome_regions_are_clamped_and_limited_to_the_29(collected):
    c = collected[1]["imagenome"]
    expected = {"right lung": [4, 10, 30, 70], "left lung": [34, 10, 62, 70], "cardiac silhouette": [20, 40, 44, 70],
                "trachea": [0, 0, 40, 20]}
    for task in ("anatomical_region_grounding", "grounded_anatomical_region"):
        for s in by_task(c, task):
            assert s.boxes[0]["box"] == expected[s.boxes[0]["label"]]
    phrases = {"small left pleural effusion": "left lung", "heart size is normal": "cardiac silhouette"}
    for s in by_task(c, "phrase_grounding"):
        assert s.boxes[0]["box"] == expected[phrases[s.boxes[0]["label"]]]
    assert c.excluded == {"gold-standard image (images_to_avoid.csv)": 1}
    assert Counter(s.split for s in by_task(c, "phrase_grounding")) == {"train": 2, "validate": 1, "test": 1}


def test_vqa_datasets(collected):
    _, by_name = collected
    vqa = by_name["mimic_cxr_vqa"]
    assert sorted(s.answer for s in by_task(vqa, "vqa", "train")) == ["lung opacity, pleural effusion.", "yes."]
    assert vqa.excluded == {"question without an answer": 1}
    diff = by_name["mimic_diff_vqa"]
    pair = by_task(diff, "difference_vqa", "train")[0]
    assert [(i["image_id"], i["role"]) for i in pair.images] == [(f"mimic_{F.dicom_id(1)}", "reference"),
                                                                  (f"mimic_{F.dicom_id(3)}", "main")]
    assert by_task(diff, "vqa", "validate")[0].answer == "PA view"
    radialog = by_name["radialog"]
    assert radialog.excluded == {"report generation (task RG)": 1, "image not from MIMIC-CXR": 1}
    multi_turn = [s for s in radialog.samples if len(s.turns) == 5][0]
    assert [t["content"] for t in multi_turn.turns[3:]] == ["Which side?", "The left side."]
    assert all(count_images(s.turns) == 1 for s in radialog.samples)
    assert by_task(radialog, "visual_instruction_following", "test")  # the MIMIC split of its image
    slake = by_name["slake"]
    assert [(s.answer, s.split) for s in slake.samples] == [("Yes.", "test"), ("No.", "test")]
    assert slake.excluded == {"not English": 1, "not an X-ray": 1, "open-ended question": 1}


def test_vindr_merges_overlapping_boxes_and_takes_the_majority_label(collected):
    c = collected[1]["vindr_cxr"]
    v1 = f"vindr_cxr_{'a' * 32}"
    detection = [s for s in by_task(c, "abnormality_detection") if s.images[0]["image_id"] == v1][0]
    assert sorted((b["label"], b["box"]) for b in detection.boxes) == [
        ("Aortic enlargement", [50, 30, 60, 45]), ("Cardiomegaly", [30, 60, 72, 92])]  # two readers' boxes merged
    labels = [s for s in by_task(c, "disease_classification") if s.images[0]["image_id"] == v1][0].labels
    assert labels["Cardiomegaly"] == 1 and labels["Aortic enlargement"] == 1 and labels["COPD"] == 0  # 2 of 3, 1 of 3
    test_labels = by_task(c, "disease_classification", "test")[0]
    assert test_labels.labels["Lung tumor"] == 1 and "Other disease" in test_labels.labels
    normal = [s for s in by_task(c, "multi_finding_grounding") if s.images[0]["image_id"] == f"vindr_cxr_{'b' * 32}"]
    assert normal[0].answer == "Not found."


def test_chestx_ray14_boxes_and_negatives(collected):
    c = collected[1]["chestx_ray14"]
    multi = {s.images[0]["image_id"]: s for s in by_task(c, "multi_finding_grounding")}
    assert multi["chestx_ray14_00000001_000"].answer == "cardiomegaly [31,47,94,78], effusion [62,78,88,94]."
    assert multi["chestx_ray14_00000002_000"].answer == "Not found."
    assert "chestx_ray14_00000004_000" not in multi  # Mass has no box
    grounding = {s.images[0]["image_id"]: s for s in by_task(c, "finding_grounding")}
    assert grounding["chestx_ray14_00000004_000"].boxes[0]["label"] == "Infiltration"  # "Infiltrate" in the box list
    assert grounding["chestx_ray14_00000003_000"].split == "test"
    labels = {s.images[0]["image_id"]: s.labels for s in by_task(c, "disease_classification")}
    assert labels["chestx_ray14_00000004_000"]["Mass"] == 1 and labels["chestx_ray14_00000004_000"]["Edema"] == 0


def test_chestx_det10(collected):
    c = collected[1]["chestx_det10"]
    detection = by_task(c, "abnormality_detection", "train")[0]
    assert [(b["label"], b["box"]) for b in detection.boxes] == [("Nodule", [10, 12, 18, 20]), ("Effusion", [40, 50, 60, 62])]
    assert by_task(c, "disease_classification", "test")[0].labels["Fracture"] == 1


def test_jsrt_circles_become_boxes(collected):
    c = collected[1]["jsrt"]
    boxes = {s.images[0]["image_id"]: s.boxes[0]["box"] for s in by_task(c, "abnormality_detection")}
    radius = 14 / 0.175 / 2  # 14 mm at 0.175 mm per pixel
    assert boxes["jsrt_JPCLN001"] == [1634 - radius, 692 - radius, 1634 + radius, 692 + radius]
    normal = [s for s in by_task(c, "finding_grounding") if s.images[0]["image_id"] == "jsrt_JPCNN001"][0]
    assert normal.answer == "Not present."


def test_siim_rle_masks_become_boxes(collected):
    c = collected[1]["siim"]
    detection = by_task(c, "abnormality_detection")[0]
    assert [b["box"] for b in detection.boxes] == [list(map(float, b)) for b in F.SIIM_BOXES]
    assert {s.labels.get("Pneumothorax") for s in by_task(c, "disease_classification")} == {0, 1}


def test_siim_rle_decoding_both_variants():
    mask = np.zeros((6, 5), dtype=bool)  # height 6, width 5
    mask[1:3, 2] = True
    mask[4, 0:2] = True
    # Column-major runs at flat positions 4, 10 and 13-14: absolute (1-based) starts 5, 11, 14;
    # relative starts count from the previous run's end: 4, 5, 2.
    assert siim_source.runs(F.relative_rle(mask)) == [(4, 1), (5, 1), (2, 2)]
    relative, absolute = [(4, 1), (5, 1), (2, 2)], [(5, 1), (11, 1), (14, 2)]
    assert not siim_source.is_absolute(relative) and siim_source.is_absolute(absolute)
    assert (siim_source.decode(relative, 5, 6, absolute=False) == mask).all()
    assert (siim_source.decode(absolute, 5, 6, absolute=True) == mask).all()
    with pytest.raises(ValueError, match="outside"):
        siim_source.decode([(29, 5)], 5, 6, absolute=True)


def test_rsna_keeps_lung_opacity_and_normal(collected):
    c = collected[1]["rsna"]
    assert c.excluded == {"class 'No Lung Opacity / Not Normal' (only Lung Opacity and Normal are used)": 1}
    detection = by_task(c, "abnormality_detection")[0]
    assert detection.answer == f"[{16},{31},{39},{70}], [{62},{34},{84},{66}]."
    assert {b["label"] for b in detection.boxes} == {"Pneumonia"}
    normal = [s for s in by_task(c, "finding_grounding") if s.images[0]["image_id"] == "rsna_r2"][0]
    assert normal.answer == "Not present."


def test_covid19_radiography_lungs_and_the_region_rule(collected):
    c = collected[1]["covid19_radiography"]
    assert c.excluded == {"lung mask of more than 3 regions": 1}
    assert "covid19_radiography_Viral_Pneumonia-1" not in {s.images[0]["image_id"] for s in c.samples}
    organs = {s.boxes[0]["label"]: s.boxes[0]["box"] for s in c.samples
              if s.task.endswith("organ") and s.images[0]["image_id"] == "covid19_radiography_COVID-1"}
    expected = {"right lung": [6, 6, 21, 42], "left lung": [27, 6, 42, 42]}  # the 32 px mask scaled to 48 px
    assert organs and all(expected[name] == box for name, box in organs.items())
    labels = {s.images[0]["image_id"]: s.answer for s in by_task(c, "disease_classification")}
    assert labels["covid19_radiography_COVID-1"] == "covid-19."
    assert labels["covid19_radiography_Normal-1"] == "Not found."


def test_covid_qu_ex_and_qata_overlap(collected):
    _, by_name = collected
    qu = by_name["covid_qu_ex"]
    detection = by_task(qu, "abnormality_detection", "train")[0]
    assert detection.boxes[0]["box"] == [20, 30, 32, 44]
    assert {s.split for s in qu.samples} == {"train", "validate", "test"}
    qata = by_name["qata_cov19"]
    assert qata.excluded == {"also in COVID-QU-Ex": 1}  # covid_13 is covid_1 at another size
    assert {s.images[0]["image_id"] for s in qata.samples} == {"qata_cov19_covid_10", "qata_cov19_covid_11"}
    assert by_task(qata, "abnormality_detection", "train")[0].boxes[0]["box"] == [30, 30, 50, 50]


def test_brax_and_chexpert_labels(collected):
    _, by_name = collected
    brax = {s.patient_id: s for s in by_name["brax"].samples}
    assert brax["brax_P1"].answer == "cardiomegaly."  # Edema is uncertain: absent
    assert by_name["brax"].images["brax_Study_2_Series_2_image-2"].path.endswith(".dcm")  # no PNG: the DICOM
    chexpert = {s.patient_id: s for s in by_name["chexpert"].samples}
    assert chexpert["chexpert_patient00001"].answer == "cardiomegaly."
    assert chexpert["chexpert_patient64541"].split == "validate"


def test_missing_layouts_and_sources_are_named(tmp_path):
    with pytest.raises(SourceError, match="MS_CXR_Local_Alignment"):
        from m4cxr.data.sources import ms_cxr

        ms_cxr.read(Collector("ms_cxr", tmp_path, context=PrepareContext({})))
    F.ms_cxr(tmp_path)
    with pytest.raises(SourceError, match="--source mimic_cxr=PATH"):
        ms_cxr.read(Collector("ms_cxr", tmp_path, context=PrepareContext({})))
    (tmp_path / "chexpert").mkdir()
    from m4cxr.data.sources import chexpert
    with pytest.raises(SourceError, match=r"train\.csv"):
        chexpert.read(Collector("chexpert", tmp_path / "chexpert"))


def test_relative_boxes_use_the_original_size(collected):
    _, by_name = collected
    c = by_name["covid_qu_ex"]
    sample = by_task(c, "grounded_finding", "train")[0]
    assert list(to_relative(sample.boxes[0]["box"], 64, 64)) == [31, 47, 50, 69]
    assert "[31,47,50,69]" in sample.turns[1]["content"]


def test_chestx_det_polygons_become_their_enclosing_boxes(tmp_path):
    from m4cxr.data.sources import chestx_det10

    F.write_json(tmp_path / "ChestX_Det_train.json", [
        {"file_name": "1.png", "syms": ["Nodule"], "boxes": [[0, 0, 1, 1]], "polygons": [[[10, 12], [20, 8], [16, 30]]]}])
    F.write_json(tmp_path / "ChestX_Det_test.json", [])
    F.write_png(tmp_path / "images" / "1.png", (64, 64))
    c = Collector("chestx_det10", tmp_path)
    chestx_det10.read(c)
    assert by_task(c, "abnormality_detection")[0].boxes[0]["box"] == [10, 8, 20, 30]  # the polygon, not "boxes"


def test_ms_cxr_without_a_split_column_takes_the_mimic_split(tmp_path):
    from m4cxr.data.sources import ms_cxr

    mimic = F.mimic_cxr(tmp_path / "mimic")
    F.write_csv(tmp_path / "ms" / "MS_CXR_Local_Alignment_v1.0.0.csv",
                ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height"],
                [[F.dicom_id(14), "Atelectasis", "Right basilar atelectasis", "", 8, 48, 20, 16, 64, 80],
                 [F.dicom_id(1), "Pleural Effusion", "Left effusion", "", 30, 40, 20, 20, 64, 80]])
    c = Collector("ms_cxr", tmp_path / "ms", context=PrepareContext({"mimic_cxr": mimic}))
    ms_cxr.read(c)
    splits = {s.answer: s.split for s in by_task(c, "grounded_phrase_generation")}
    assert splits == {"Right basilar atelectasis.": "test", "Left effusion.": "train"}
    assert any("no split column" in note for note in c.notes)
