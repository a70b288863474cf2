"""Fashion-MNIST idx files read by hand-made examples (no extraction): captions and labels per
class, a label outside the 10 classes a reject, and files whose shapes disagree refused by name."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.sources import SourceError, read_source


def idx(path, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    path.write_bytes(bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes())


def folder(tmp_path, images: np.ndarray, labels: np.ndarray):
    idx(tmp_path / "train-images-idx3-ubyte", images)
    idx(tmp_path / "train-labels-idx1-ubyte", labels)
    return tmp_path


def test_captions_and_labels_per_class_and_a_label_outside_the_classes(tmp_path):
    records = read_source(folder(tmp_path, np.zeros((3, 2, 2)), np.array([0, 9, 10]))).records
    assert [(r.key, r.caption, r.label, r.reject) for r in records] == [
        ("fashion-mnist/train/00000", "a photo of a T-shirt/top", 0, None),
        ("fashion-mnist/train/00001", "a photo of a ankle boot", 9, None),
        ("fashion-mnist/train/00002", "", -1, "bad-row: label 10 is not a Fashion-MNIST class (0..9)")]


@pytest.mark.parametrize("images,labels,message", [
    (np.zeros((3, 2, 2)), np.zeros(2), "3 images but 2 labels"),
    (np.zeros((3, 2, 2)), np.zeros(4), "3 images but 4 labels"),
    (np.zeros((3, 4)), np.zeros(3), "holds 2-d data [3, 4]; it must be 3-d"),
    (np.zeros((3, 2, 2, 1)), np.zeros(3), "holds 4-d data [3, 2, 2, 1]; it must be 3-d"),
    (np.zeros((3, 2, 2)), np.zeros((3, 1)), "holds 2-d data [3, 1]; it must be 1-d"),
])
def test_files_whose_shapes_disagree_are_refused(tmp_path, images, labels, message):
    with pytest.raises(SourceError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_source(folder(tmp_path, images, labels))
