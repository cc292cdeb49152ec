import numpy as np
import pyarrow.parquet as pq
import pytest

from m4cxr.data.schema import SAMPLE_SCHEMA, ImageStore, Sample, read_samples, write_samples
from m4cxr.tasks import render_conversation


def make_sample(i, split="train"):
    turns = render_conversation("finding_grounding", {"finding": "Nodule", "bbox": [10, 20, 30, 40]})
    return Sample(
        sample_id=f"s{i}", task="finding_grounding", task_type="image_understanding", dataset="synthetic",
        split=split, patient_id=f"p{i}", study_id=f"st{i}", images=[{"image_id": "img0", "role": "current"}],
        turns=turns, labels={"Nodule": 1, "Mass": 0, "Edema": -1},
        boxes=[{"label": "Nodule", "image_index": 0, "box": [12.5, 25.0, 37.5, 50.0]}],
        report=None, answer=turns[-1]["content"],
    )


def test_samples_round_trip_through_parquet(tmp_path):
    samples = [make_sample(i, split) for i, split in enumerate(["train", "train", "validate", "test"])]
    counts = write_samples(samples, tmp_path)
    assert counts == {"train": 2, "validate": 1, "test": 1}
    assert pq.read_schema(tmp_path / "samples/train.parquet").equals(SAMPLE_SCHEMA)
    back = sorted(read_samples(tmp_path), key=lambda s: s.sample_id)
    assert back == samples
    assert [s.sample_id for s in read_samples(tmp_path, "validate")] == ["s2"]


def test_bad_split_and_foreign_file_are_errors(tmp_path):
    with pytest.raises(ValueError, match="split 'dev'"):
        write_samples([make_sample(0, "dev")], tmp_path)
    import pyarrow as pa
    (tmp_path / "samples").mkdir(exist_ok=True)
    pq.write_table(pa.table({"x": [1]}), tmp_path / "samples/train.parquet")
    with pytest.raises(ValueError, match="missing columns"):
        read_samples(tmp_path)


def test_image_store_keeps_each_image_once(tmp_path):
    store = ImageStore(tmp_path)
    pixels = (np.arange(64 * 48) % 255).astype(np.uint8).reshape(48, 64)
    store.put("a", pixels, view="PA", patient_id="p1")
    store.put("a", np.zeros((10, 10), np.uint8))  # same id: the first is kept
    store.write_index()
    again = ImageStore(tmp_path)
    assert list(again.index) == ["a"] and again.size("a") == (64, 48)
    assert (np.asarray(again.load("a")) == pixels).all()
    assert len(list((tmp_path / "images").iterdir())) == 1
    with pytest.raises(KeyError, match="not in the store"):
        again.path("missing")
