"""--teacher-view: with `crop` a teacher sees the tokenizer's centre crop resized to its input
size; with `original` it sees the original image through its own resize + centre crop, so detail
the tokenizer's small crop lost is still there. Pinned on a 64x48 noise image by hand."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.data.crops import CropDataset
from pipeline.data.sources import Record


def views(path, view: str):
    dataset = CropDataset([Record("k", "", -1, ("file", path), "k")], 16, [48, 24], view, 100_000_000)
    _, (crop, by_size) = dataset[0]
    return crop, by_size


def test_original_view_is_the_teachers_own_crop_of_the_original(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)  # H x W
    Image.fromarray(pixels).save(tmp_path / "noise.png")
    original = Image.fromarray(pixels)

    _, seen = views(tmp_path / "noise.png", "original")
    # 48 px: the short side is already 48, so the centre 48 columns of the original, untouched
    assert np.array_equal(seen[48], pixels[:, 8:56])
    # 24 px: the original halved to 32x24, then its centre 24 columns
    assert np.array_equal(seen[24], np.asarray(original.resize((32, 24), Image.BICUBIC))[:, 4:28])

    crop, seen = views(tmp_path / "noise.png", "crop")
    # the tokenizer's 16 px crop, enlarged: none of the original's detail at 48 px
    assert crop.shape == (16, 16, 3)
    for size in (48, 24):
        assert np.array_equal(seen[size], np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC)))
    assert np.abs(seen[48].astype(int) - pixels[:, 8:56]).mean() > 20
