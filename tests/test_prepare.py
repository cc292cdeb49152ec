"""`m4cxr data prepare` over every dataset's fixture at once: all 50 task-dataset pairs of Table 10
and the test sets, images resized once on Ray Data with their boxes, the manifest, and the leakage
checks (clean, and failing loudly on planted leaks)."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import dataset_fixtures as F
from m4cxr.cli import main
from m4cxr.config import MixtureConfig
from m4cxr.data.mixture import build_mixture, paper_pairs
from m4cxr.data.schema import read_samples
from m4cxr.data.stats import pair_counts

SIZE = 32  # shortest edge of the stored images: MIMIC's 64 x 80 fixtures are halved


def prepare_args(sources: dict, out: Path) -> list[str]:
    args = ["data", "prepare", "--config", "experiments/quickstart.yaml", "--set", f"data.image_size={SIZE}",
            "--out", str(out)]
    for name, path in sources.items():
        args += ["--source", f"{name}={path}"]
    return args


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    sources = F.all_sources(root / "datasets")
    code = main(prepare_args(sources, root / "corpus"))
    return code, root / "corpus", json.loads((root / "corpus" / "manifest.json").read_text())


@pytest.mark.slow
def test_prepare_yields_every_pair_of_table_10_and_the_test_sets(prepared):
    code, corpus, manifest = prepared
    assert code == 0
    train = pair_counts(corpus, "train")
    missing = [p.key for p in paper_pairs() if train.get(p.key, 0) == 0]
    assert missing == []
    mixture = build_mixture(MixtureConfig(on_missing_pair="error"), train)  # trainable as the paper's mixture
    assert len(mixture.pairs) == 50
    counts = manifest["counts"]
    for task, dataset in [("single_image", "mimic_cxr"), ("multi_image", "mimic_cxr"), ("multi_study", "mimic_cxr"),
                          ("phrase_grounding", "ms_cxr"), ("vqa", "mimic_cxr_vqa"), ("vqa", "slake")]:
        assert counts[task][dataset].get("test", 0) > 0, (task, dataset)
    assert counts["vqa"]["slake"] == {"test": 2}


@pytest.mark.slow
def test_stats_count_report_generation_by_the_papers_rules(prepared, capsys):
    """The MIMIC fixture's report-generation samples by rule (worked out in test_sources.py)."""
    from m4cxr.data.stats import corpus_stats

    _, corpus, _ = prepared
    assert corpus_stats(corpus)["report_scenarios"] == {
        "multi_image, 1 image(s)": {"validate": 1}, "multi_image, 2 image(s)": {"train": 1, "test": 2},
        "multi_image, 5 image(s)": {"train": 1}, "multi_study, no prior study (test)": {"test": 1},
        "multi_study, with the prior study": {"train": 1, "test": 1}}
    assert main(["data", "stats", str(corpus)]) == 0
    assert "multi_study, no prior study (test)" in capsys.readouterr().out


@pytest.mark.slow
def test_manifest_reports_skipped_records_rules_and_leakage(prepared):
    _, _, manifest = prepared
    # One planted malformed record per dataset, and a corrupt JPEG found when it is resized.
    assert len(manifest["skipped"]) == 19
    assert all(set(item) == {"dataset", "record", "reason"} for item in manifest["skipped"])
    corrupt = [item for item in manifest["skipped"] if item["record"].endswith(F.CORRUPT_JPEG)]
    assert len(corrupt) == 1 and "unreadable image" in corrupt[0]["reason"]
    assert manifest["samples_lost_to_unreadable_images"] == {"chexpert": 1}
    assert manifest["excluded"]["mimic_cxr"]["training sample with an MS-CXR image"] == 1  # the paper's rule
    assert manifest["excluded"]["qata_cov19"] == {"also in COVID-QU-Ex": 1}
    assert manifest["leakage"]["patients_in_several_splits"] == 0
    assert manifest["leakage"]["ms_cxr_test_images_in_training"] == 0


@pytest.mark.slow
def test_boxes_preview_shows_every_dataset_with_boxes(prepared):
    _, corpus, manifest = prepared
    assert manifest["boxes_preview"]["datasets"] == [
        "chestx_det10", "chestx_ray14", "covid19_radiography", "covid_qu_ex", "imagenome", "jsrt", "ms_cxr",
        "qata_cov19", "rsna", "siim", "vindr_cxr"]  # every dataset whose samples carry boxes
    with Image.open(corpus / "boxes_preview.png") as im:
        assert im.width >= 1000 and im.height >= 900  # 4 columns, 3 rows


@pytest.mark.slow
def test_images_are_stored_once_resized_with_their_boxes(prepared):
    _, corpus, _ = prepared
    index = {r["image_id"]: r for r in pq.read_table(corpus / "images.parquet").to_pylist()}
    samples = read_samples(corpus)
    used = {i["image_id"] for s in samples for i in s.images}
    assert used == set(index)  # every image used is stored, once
    assert all(min(r["width"], r["height"]) == SIZE for r in index.values())
    mimic = index[f"mimic_{F.dicom_id(8)}"]
    assert (mimic["width"], mimic["height"]) == (32, 40)
    phrase = [s for s in samples if s.task == "phrase_grounding" and s.dataset == "ms_cxr" and s.split == "train"][0]
    assert [b["box"] for b in phrase.boxes] == [[8, 10, 16, 20], [16, 20, 24, 30]]  # halved with the image
    jsrt = [s for s in samples if s.task == "abnormality_detection" and s.dataset == "jsrt"]
    assert all(0 <= v <= SIZE for s in jsrt for b in s.boxes for v in b["box"])


@pytest.mark.slow
def test_dicom_is_read_with_its_photometric_interpretation_and_no_patient_tag_is_kept(prepared):
    _, corpus, _ = prepared
    for path in corpus.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert F.PATIENT_NAME.encode() not in data and F.PATIENT_TAG_ID.encode() not in data, path
    stored = np.asarray(Image.open(corpus / "images" / f"vindr_cxr_{'a' * 32}.png"), dtype=float)
    original = np.asarray(Image.fromarray(F.picture((96, 128), seed=1)).resize(stored.shape[::-1]), dtype=float)
    assert np.corrcoef(stored.ravel(), original.ravel())[0, 1] > 0.9  # MONOCHROME1 inverted back


@pytest.mark.slow
def test_leakage_command_on_a_clean_corpus(prepared, capsys):
    _, corpus, _ = prepared
    assert main(["data", "leakage", str(corpus)]) == 0
    assert "(ok)" in capsys.readouterr().out


@pytest.mark.slow
def test_planted_leaks_fail_loudly(ray_local, tmp_path, capsys):
    sources = F.all_sources(tmp_path / "datasets", leak=True)
    code = main(prepare_args(sources, tmp_path / "corpus"))
    err = capsys.readouterr().err
    assert code == 1
    assert "LEAKAGE" in err and "mimic_10000001" in err and f"mimic_{F.dicom_id(14)}" in err
    leakage = json.loads((tmp_path / "corpus" / "manifest.json").read_text())["leakage"]
    # MIMIC patient 10000001 has a study in train and one in test; the MS-CXR phrase put in training
    # brings test patient 10000002 into train too.
    assert leakage["patients_in_several_splits"] == 2
    assert leakage["examples"] == ["mimic_10000001", "mimic_10000002"]
    assert leakage["ms_cxr_test_images_in_training"] == 1  # one MS-CXR phrase of a test image in training
    assert main(["data", "leakage", str(tmp_path / "corpus")]) == 1
    assert main(prepare_args(sources, tmp_path / "corpus2") + ["--allow-leakage"]) == 0


def test_adapters_spool_their_samples_in_chunks_instead_of_holding_them(tmp_path):
    """With a spool, no collector keeps its samples: each dataset's are on disk in row groups of at
    most `chunk_rows`, all of them, in the order they were made."""
    from m4cxr.config import DataConfig
    from m4cxr.data.prepare import run_adapters

    sources = F.all_sources(tmp_path / "datasets")
    kept = {c.dataset: c for c in run_adapters(sources, DataConfig(image_size=SIZE), progress=False)}
    spooled = run_adapters(sources, DataConfig(image_size=SIZE), progress=False, spool=tmp_path / "spool", chunk_rows=4)
    for c in spooled:
        assert c.samples == [] and c.added == len(kept[c.dataset].samples) > 0, c.dataset
        spool = pq.ParquetFile(tmp_path / "spool" / f"{c.dataset}.parquet")
        sizes = [spool.metadata.row_group(n).num_rows for n in range(spool.num_row_groups)]
        assert max(sizes) <= 4 and sum(sizes) == c.added, (c.dataset, sizes)
        assert spool.read().column("sample_id").to_pylist() == [s.sample_id for s in kept[c.dataset].samples]
    mimic = pq.ParquetFile(tmp_path / "spool" / "mimic_cxr.parquet")
    assert mimic.num_row_groups == 7  # its 26 samples


@pytest.mark.slow
def test_a_small_chunk_size_writes_the_same_corpus_in_more_row_groups(prepared, tmp_path):
    from m4cxr.config import load_experiment
    from m4cxr.data.prepare import prepare

    _, corpus, manifest = prepared
    exp = load_experiment(Path(__file__).resolve().parents[1] / "experiments/quickstart.yaml",
                          [f"data.image_size={SIZE}"])
    chunked = prepare(exp, F.all_sources(tmp_path / "datasets"), tmp_path / "corpus", progress=False, chunk_rows=4)
    for split in ("train", "validate", "test"):
        whole, parts = (pq.ParquetFile(c / "samples" / f"{split}.parquet") for c in (corpus, tmp_path / "corpus"))
        assert whole.num_row_groups == 1
        sizes = [parts.metadata.row_group(n).num_rows for n in range(parts.num_row_groups)]
        assert max(sizes) <= 4 and len(sizes) >= whole.metadata.num_rows / 4, (split, sizes)
        assert parts.read().equals(whole.read()), split  # the same rows in the same order
    assert pq.read_table(tmp_path / "corpus" / "images.parquet").equals(pq.read_table(corpus / "images.parquet"))
    assert pq.ParquetFile(tmp_path / "corpus" / "images.parquet").num_row_groups > 1
    for key in ("counts", "excluded", "samples_lost_to_unreadable_images", "leakage", "boxes_preview", "notes"):
        assert chunked[key] == manifest[key], key
    assert [(i["dataset"], i["reason"]) for i in chunked["skipped"]] == \
        [(i["dataset"], i["reason"].replace(str(corpus.parent), str(tmp_path))) for i in manifest["skipped"]]
    assert not (tmp_path / "corpus" / ".prepare-spool").exists()


def test_bad_source_arguments_are_named(capsys):
    assert main(["data", "prepare", "--source", "mimic=/nowhere", "--out", "x"]) == 2
    assert "unknown dataset 'mimic'" in capsys.readouterr().err
    assert main(["data", "prepare", "--source", "slake=/nowhere", "--out", "x"]) == 2
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_the_paper_test_sets_are_evaluated_from_a_prepared_corpus(prepared):
    import pyarrow as pa

    from m4cxr.config import load_experiment
    from m4cxr.data.schema import samples_path
    from m4cxr.eval.inference import PREDICTION_SCHEMA, eval_requests
    from m4cxr.eval.scoring import score_predictions
    from m4cxr.eval.tables import render_tables

    _, corpus, _ = prepared
    exp = load_experiment(Path(__file__).resolve().parents[1] / "experiments/m4cxr.yaml")
    table = pq.read_table(samples_path(corpus, "test"))
    chosen = table.take([r["row"] for r in eval_requests(exp, corpus)]).to_pylist()
    assert {(s["task"], s["dataset"]) for s in chosen} == {
        ("single_image", "mimic_cxr"), ("multi_image", "mimic_cxr"), ("multi_study", "mimic_cxr"),
        ("phrase_grounding", "ms_cxr"), ("vqa", "mimic_cxr_vqa"), ("vqa", "slake")}  # not ImaGenome's phrases
    # VQA is scored per test set, as Table 4 reports it: right answers on one, wrong on the other.
    exp.eval.tasks, exp.eval.bootstrap_samples = ["vqa"], 10
    vqa = [s for s in chosen if s["task"] == "vqa"]
    predictions = pa.Table.from_pylist([
        {"sample_id": s["sample_id"], "task": "vqa", "task_type": "vqa", "dataset": s["dataset"], "mode": "",
         "findings": "", "prediction": s["answer"] if s["dataset"] == "mimic_cxr_vqa" else "zzz",
         "reference": s["answer"], "error": ""} for s in vqa], schema=PREDICTION_SCHEMA)
    results = score_predictions(exp, predictions, corpus)
    per_set = results["vqa_by_dataset"]["vqa"]
    assert per_set["mimic_cxr_vqa"]["accuracy"] == 1.0 and per_set["slake"]["accuracy"] == 0.0
    assert "vqa on slake (2 samples)" in render_tables(results, exp)


def test_an_ms_cxr_test_image_in_another_datasets_training_file_is_a_leak(tmp_path):
    """The check reads every file's training samples, not only those of files that hold MS-CXR
    samples: here the training file has none, and still uses an MS-CXR test image."""
    from m4cxr.data.schema import SAMPLE_SCHEMA, samples_path
    from m4cxr.data.stats import corpus_stats

    def row(dataset, split, patient):
        return {**{f.name: None for f in SAMPLE_SCHEMA}, "sample_id": f"{dataset}-0", "task": "phrase_grounding",
                "task_type": "grounding", "dataset": dataset, "split": split, "patient_id": patient,
                "study_id": "s1", "images": [{"image_id": "mimic_d1", "role": "current"}], "turns": [], "boxes": []}

    samples_path(tmp_path).mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row("ms_cxr", "test", "p1")], schema=SAMPLE_SCHEMA), samples_path(tmp_path, "test"))
    pq.write_table(pa.Table.from_pylist([row("vindr_cxr", "train", "p2")], schema=SAMPLE_SCHEMA),
                   samples_path(tmp_path, "train"))
    leakage = corpus_stats(tmp_path)["leakage"]
    assert leakage["ms_cxr_test_images_in_training"] == 1 and leakage["ms_cxr_examples"] == ["mimic_d1"]
    assert leakage["patients_in_several_splits"] == 0
