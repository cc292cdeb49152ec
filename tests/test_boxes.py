import numpy as np
import pytest

from m4cxr.boxes import (
    circle_to_box, format_box, iou, mask_to_boxes, merge_overlapping, parse_box, parse_boxes,
    parse_findings_with_boxes, to_pixels, to_relative,
)


@pytest.mark.parametrize("size", [(1024, 1024), (2000, 1500), (790, 631)])
def test_resize_round_trip_within_one_percent(size):
    w, h = size
    rng = np.random.default_rng(0)
    for _ in range(50):
        x1, x2 = sorted(rng.uniform(0, w, 2))
        y1, y2 = sorted(rng.uniform(0, h, 2))
        rel = to_relative((x1, y1, x2, y2), w, h)
        assert all(isinstance(v, int) and 0 <= v <= 100 for v in rel)
        back = to_pixels(rel, w, h)
        assert np.allclose(back, (x1, y1, x2, y2), atol=0.005 * max(w, h) + 1e-9)
        assert parse_box(format_box(rel)) == rel or rel[0] == rel[2] or rel[1] == rel[3]


def test_center_crop_convention_shifts_and_clips():
    # 200 x 100 image: the crop keeps x 50..150; a box at x 50..100 is the left half of the crop.
    assert to_relative((50, 0, 100, 100), 200, 100, "center_crop") == (0, 0, 50, 100)
    # a box partly outside the crop is clipped
    assert to_relative((0, 10, 100, 60), 200, 100, "center_crop") == (0, 10, 50, 60)
    assert to_pixels((0, 0, 50, 100), 200, 100, "center_crop") == (50, 0, 100, 100)
    # the whole-image resize keeps the left quarter as x 0..25
    assert to_relative((0, 0, 50, 100), 200, 100) == (0, 0, 25, 100)


def test_tolerant_parsing():
    assert parse_box("The box is [12, 30,40 ,55].") == (12, 30, 40, 55)
    assert parse_box("[ 12.4 , 30.0, 40.6,55 ]") == (12, 30, 41, 55)
    assert parse_box("Pleural Effusion [10,60,40,90]") == (10, 60, 40, 90)
    for bad in ["", None, "Not found.", "[12,30,40]", "[40,30,12,55]", "[10,20,30,140]", "[a,b,c,d]", "[-5,0,10,10]"]:
        assert parse_box(bad) is None, bad
    assert parse_boxes("[1,2,3,4], [5,6,7,8], [9,9,1,1]") == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert parse_findings_with_boxes("Cardiomegaly [30,40,70,80], Pleural Effusion [5,60,40,90].") == [
        ("Cardiomegaly", (30, 40, 70, 80)), ("Pleural Effusion", (5, 60, 40, 90))]


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert iou(None, (0, 0, 1, 1)) == 0.0  # a malformed answer scores 0


def test_vindr_merge_rule():
    boxes = [(0, 0, 10, 10), (1, 1, 11, 11), (50, 50, 60, 60), (0, 0, 10, 30)]
    merged = merge_overlapping(boxes)
    # the first two overlap with IoU 0.68 -> one enclosing box; the far box stays; the tall box
    # overlaps the merged one by IoU 100/330 < 0.5 and stays
    assert sorted(merged) == sorted([(0, 0, 11, 11), (50, 50, 60, 60), (0, 0, 10, 30)])
    # merging is repeated: a chain of overlapping boxes collapses into one
    chain = [(0, 0, 10, 10), (2, 0, 12, 10), (4, 0, 14, 10)]
    assert merge_overlapping(chain) == [(0, 0, 14, 10)]
    assert merge_overlapping([(0, 0, 10, 10), (5, 0, 15, 10)]) == [(0, 0, 10, 10), (5, 0, 15, 10)]  # IoU 1/3


def test_jsrt_circle_to_box():
    assert circle_to_box(100, 200, 30) == (85, 185, 115, 215)


def test_mask_to_one_box_per_region():
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[2:5, 3:8] = 1          # region 1
    mask[10:15, 20:28] = 255    # region 2
    mask[15, 28] = 1            # diagonal neighbour: same region under 8-connectivity
    assert mask_to_boxes(mask) == [(3, 2, 8, 5), (20, 10, 29, 16)]
    assert mask_to_boxes(np.zeros((5, 5))) == []
