"""eval: FID and teacher-space FD behave, cached features equal recomputed ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.featureset import FeatureSet
from pipeline.metrics import fd, frechet_distance, precision_recall
from stages.evaluate import column, evaluate, reference_images, teacher_features

MINI = "data/fashion-mnist-mini"


def image_folder(root, split: str, per_class: int, classes=range(10)):
    """A class-folder dataset of real Fashion-MNIST images from the committed subset."""
    from pipeline.sources import read_idx
    prefix = "t10k" if split == "test" else "train"
    images = read_idx(f"{MINI}/{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(f"{MINI}/{prefix}-labels-idx1-ubyte.gz")
    for c in classes:
        for i in np.flatnonzero(labels == c)[:per_class]:
            (root / f"class{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(root / f"class{c}" / f"{i:05d}.png")
    return root


@pytest.fixture(scope="module")
def sets(run_extract_module, tmp_path_factory):
    folders = tmp_path_factory.mktemp("folders")
    test = run_extract_module(image_folder(folders / "test", "test", 6), name="test", shard_size=64, batch_size=32)
    train = run_extract_module(image_folder(folders / "train", "train", 20), name="train", shard_size=256, batch_size=50)
    shirts = run_extract_module(image_folder(folders / "shirts", "train", 60, classes=[6]), name="shirts", shard_size=64)
    return test, train, shirts


def write_pngs(folder, images, classes=None):
    folder.mkdir(parents=True)
    rows = []
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:05d}.png")
        rows.append({"file": f"{i:05d}.png", "seed": i, **({"class": int(classes[i])} if classes is not None else {})})
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    s1, s2 = np.diag([1.0, 2.0, 3.0, 4.0]), np.diag([4.0, 1.0, 1.0, 9.0])
    expected = ((mu1 - mu2) ** 2).sum() + sum(a + b - 2 * np.sqrt(a * b) for a, b in zip(np.diag(s1), np.diag(s2)))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    x = rng.normal(size=(500, 8))
    assert fd(x, x) == pytest.approx(0, abs=1e-8)
    p, r = precision_recall(x, x + 100, k=3)
    assert (p, r) == (0.0, 0.0) and precision_recall(x, x, k=3) == (1.0, 1.0)


def test_fid_of_a_set_against_itself_is_zero_and_against_another_set_larger(sets, tmp_path):
    test, _, shirts = sets
    fs = FeatureSet.open(test)
    real, origin = reference_images(fs, None)
    assert origin == "source images" and real.shape == (60, 16, 16, 3)
    same = write_pngs(tmp_path / "same", real)
    different = write_pngs(tmp_path / "shirts", reference_images(FeatureSet.open(shirts), None)[0])
    a = {m["metric"]: m for m in evaluate(str(same), str(test))["metrics"]}
    b = {m["metric"]: m for m in evaluate(str(different), str(test))["metrics"]}
    assert a["FID"]["n_generated"] == 60 and a["FID"]["n_reference"] == 60 and "biased upward" in a["FID"]["note"]
    assert abs(a["FID"]["value"]) < 1e-3 and abs(a["FD efficientnet-lite0"]["value"]) < 1e-2
    assert b["FID"]["value"] > 20 and b["FD efficientnet-lite0"]["value"] > 1
    assert (a["precision inception"]["value"], a["recall inception"]["value"]) == (1.0, 1.0)
    assert (test / "stats").is_dir()  # the reference's Inception features are cached for next time


def test_fd_from_cached_features_equals_fd_from_recomputed_features(sets):
    test, train, _ = sets
    fs = FeatureSet.open(test)
    generated = reference_images(FeatureSet.open(train), None)[0]
    gen = teacher_features(fs, "efficientnet-lite0", generated, None, "cpu", 64)
    cached = column(fs, "feat.efficientnet-lite0")
    recomputed = teacher_features(fs, "efficientnet-lite0", reference_images(fs, None)[0], None, "cpu", 64)
    assert np.abs(recomputed - cached).max() < 0.05 * np.abs(cached).max()      # float16 storage only
    assert fd(gen, cached) == pytest.approx(fd(gen, recomputed), rel=1e-3)


def test_class_accuracy_proxy_with_a_probe_on_cached_training_features(sets, tmp_path):
    test, train, _ = sets
    fs = FeatureSet.open(test)
    labels = np.asarray(fs.table().column("label"))
    real = write_pngs(tmp_path / "real", reference_images(fs, None)[0], labels)
    result = {m["metric"]: m for m in evaluate(str(real), str(test), fid=False, train_set=str(train))["metrics"]}
    acc = result["class accuracy (proxy)"]["value"]
    assert acc > 0.4 and acc == pytest.approx(result["class accuracy of real reference images (probe ceiling)"]["value"], abs=0.02)
