"""Real radiographs with radiologist-drawn lung boxes (tests/data/real/cc_by, CC BY licences,
see tests/data/real/SOURCES.md) become organ-grounding samples through the common code."""

import json
import shutil

from m4cxr.cli import main
from m4cxr.boxes import parse_box, to_pixels
from m4cxr.data.schema import ImageStore, read_samples

from conftest import REAL

CC_BY = REAL / "cc_by"


def test_coco_lung_boxes_become_organ_grounding_samples(tmp_path, capsys):
    out = tmp_path / "real"
    assert main(["data", "real-organs", "--coco", str(CC_BY / "lung_boxes_coco.json"), "--images", str(CC_BY),
                 "--out", str(out), "--set", "data.image_size=224"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"] == 13 and manifest["skipped"] == []
    assert manifest["tasks"] == {"organ_grounding": {"test": 26}, "grounded_organ": {"test": 26}}
    store = ImageStore(out)
    coco = json.loads((CC_BY / "lung_boxes_coco.json").read_text())
    originals = {f"covid_chestxray_lungs_{i['id']}": i for i in coco["images"]}
    for s in read_samples(out):
        image_id = s.images[0]["image_id"]
        w, h = store.size(image_id)
        assert min(w, h) == 224  # stored once, shortest edge at the encoder size
        if s.task == "organ_grounding":
            box = parse_box(s.answer)
            organ = s.turns[1]["content"].split("coordinates of ")[1].split(" in the")[0]
            assert organ in ("right lung", "left lung")
            centre_x = (box[0] + box[2]) / 2
            # radiological convention: the patient's right lung is on the image's left
            assert (centre_x < 50) == (organ == "right lung"), (image_id, organ, box)
            # the text box maps back onto the radiologist's box in the original image
            orig = originals[image_id]
            ann = next(a for a in coco["annotations"] if a["image_id"] == orig["id"] and
                       ("right" if a["category_id"] == 1 else "left") in organ)
            x, y, bw, bh = ann["bbox"]
            ref = (x, y, min(orig["width"], x + bw), min(orig["height"], y + bh))
            back = to_pixels(box, orig["width"], orig["height"])
            assert max(abs(a - b) for a, b in zip(back, ref)) <= 0.01 * max(orig["width"], orig["height"]) + 1
        else:
            assert s.answer in ("right lung.", "left lung.")


def test_corrupt_images_and_bad_boxes_are_reported(tmp_path):
    images = tmp_path / "images"
    shutil.copytree(CC_BY, images)
    (images / "ARDSSevere.png").write_bytes(b"not a png")
    coco = json.loads((CC_BY / "lung_boxes_coco.json").read_text())
    coco["annotations"][-1]["bbox"] = [10, 10, 0, 50]
    (images / "coco.json").write_text(json.dumps(coco))
    from m4cxr.data.sources.coco_lung_boxes import write_organ_corpus

    manifest = write_organ_corpus(images / "coco.json", images, tmp_path / "out", image_size=128)
    reasons = {item["record"]: item["reason"] for item in manifest["skipped"]}
    assert "ARDSSevere.png" in reasons and "unreadable image" in reasons["ARDSSevere.png"]
    assert any("malformed box" in r for r in reasons.values())
    assert manifest["images"] == 12
    assert manifest["tasks"]["organ_grounding"]["test"] == 26 - 2 - 1
