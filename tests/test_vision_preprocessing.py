"""Our pixel path against transformers' own image processor configured as the M4CXR release and
Rad-DINO publish it (BitImageProcessor: RGB, shortest edge 518 bicubic, centre crop 518, 1/255,
mean 0.5307, std 0.2583), on the real openly licensed chest X-rays of tests/data/real."""

import json

import numpy as np
import pytest
from PIL import Image

from m4cxr.model.vision import pixel_values

from conftest import ROOT

# microsoft/rad-dino's preprocessor_config.json, which M4CXR's code (github.com/deepnoid-ai/M4CXR-TNNLS,
# configs/instruction_tuning.yaml) loads unchanged with AutoProcessor. Its file is not reachable here; these
# values are the ones public projects copy from it (mean/std 0.5307/0.2583, shortest edge 518 bicubic,
# centre crop 518), and agree with the model card's 37 x 37 patch grid (518 / 14) and with M4CXR's box
# normalisation, which subtracts the centre crop's offset.
PUBLISHED = {
    "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 518}, "resample": 3,
    "do_center_crop": True, "crop_size": {"height": 518, "width": 518}, "do_rescale": True,
    "rescale_factor": 0.00392156862745098, "do_normalize": True, "image_mean": [0.5307, 0.5307, 0.5307],
    "image_std": [0.2583, 0.2583, 0.2583], "do_convert_rgb": True,
}
IMAGES = sorted(p for p in (ROOT / "tests/data/real/cc_by").iterdir() if p.suffix.lower() in (".png", ".jpg"))


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from transformers import AutoImageProcessor

    folder = tmp_path_factory.mktemp("rad-dino")
    (folder / "preprocessor_config.json").write_text(json.dumps(PUBLISHED))
    return AutoImageProcessor.from_pretrained(folder)  # the PIL backend here: torchvision is not installed


@pytest.mark.parametrize("path", IMAGES, ids=[p.name for p in IMAGES])
def test_center_crop_pixels_equal_the_published_processor(processor, path):
    # grayscale, as the data path stores every image (one byte a pixel)
    image = Image.open(path).convert("L")
    ours = pixel_values([image], 518, PUBLISHED["image_mean"], PUBLISHED["image_std"], "center_crop").numpy()
    theirs = processor(images=image, return_tensors="np")["pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, 518, 518)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_the_images_cover_portrait_landscape_square_and_upscaling():
    sizes = [Image.open(p).size for p in IMAGES]
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes) and any(w == h for w, h in sizes)
    assert any(min(s) < 518 for s in sizes) and any(min(s) > 518 for s in sizes)


def test_the_resize_convention_squashes_where_the_processor_crops(processor):
    """data.box_convention: resize keeps the whole image (boxes stay valid) and so differs from the
    published processor on any non-square image; on a square one the two agree."""
    mean, std = PUBLISHED["image_mean"], PUBLISHED["image_std"]
    square = Image.open(next(p for p in IMAGES if Image.open(p).size[0] == Image.open(p).size[1])).convert("L")
    wide = Image.open(next(p for p in IMAGES if Image.open(p).size[0] > Image.open(p).size[1])).convert("L")
    np.testing.assert_allclose(pixel_values([square], 518, mean, std, "resize").numpy(),
                               processor(images=square, return_tensors="np")["pixel_values"], atol=1e-5)
    assert not np.allclose(pixel_values([wide], 518, mean, std, "resize").numpy(),
                           processor(images=wide, return_tensors="np")["pixel_values"], atol=1e-3)
