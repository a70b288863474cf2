"""eval: FID and teacher-space FD behave, cached features equal recomputed ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.data.featureset import FeatureSet
from pipeline.metrics.distribution import fd, frechet_distance, precision_recall
from pipeline.data.set_images import column_array, reference_images
from stages.evaluate import evaluate, teacher_features

MINI = "data/fashion-mnist-mini"


def image_folder(root, split: str, per_class: int, classes=range(10)):
    """A class-folder dataset of real Fashion-MNIST images from the committed subset."""
    from pipeline.data.sources import read_idx
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


def test_eval_runs_teachers_inception_and_knn_on_its_device(sets, tmp_path, monkeypatch, teacher_devices):
    from click.testing import CliRunner

    import pipeline.models.inception
    import stages.evaluate
    from stages.cli import main
    test, _, _ = sets
    seen = {"inception": [], "knn": []}

    class Inception(pipeline.models.inception.Inception):
        def __init__(self, path=None, device="cpu"):
            seen["inception"].append(device)
            super().__init__(path, device)

    def knn(real, generated, k, device="not passed"):
        seen["knn"].append(device)
        return precision_recall(real, generated, k, device)
    monkeypatch.setattr(pipeline.models.inception, "Inception", Inception)
    monkeypatch.setattr(stages.evaluate, "precision_recall", knn)
    generated = write_pngs(tmp_path / "gen", reference_images(FeatureSet.open(test), None)[0][:12])
    result = CliRunner().invoke(main, ["eval", "--generated", str(generated), "--reference", str(test),
                                       "--fid-reference", "20", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert teacher_devices == ["cpu"] and seen == {"inception": ["cpu"], "knn": ["cpu", "cpu"]}


def test_eval_embeds_the_reference_sets_own_images_to_exactly_its_cached_features(sets):
    """One embedding path (Teacher.embed: the crop view, the teacher's precision, float16 as stored):
    the set's own images, embedded as eval embeds generated ones in the model batches extraction
    recorded, give the cached features bit for bit, so FD against the cache measures the images."""
    test, train, _ = sets
    fs = FeatureSet.open(test)
    cached = column_array(fs.table(), "feat.efficientnet-lite0")
    model_batch = fs.manifest["compute"]["model_batch"]
    recomputed = teacher_features(fs, "efficientnet-lite0", reference_images(fs, None)[0], None, "cpu", model_batch)
    assert recomputed.dtype == np.float32 and np.array_equal(recomputed, cached)
    generated = reference_images(FeatureSet.open(train), None)[0]
    gen = teacher_features(fs, "efficientnet-lite0", generated, None, "cpu", 64)
    assert fd(gen, cached) == fd(gen, recomputed)


def test_cached_reference_inception_features_equal_fresh_ones_and_follow_the_set(sets, tmp_path):
    import shutil

    from pipeline.models.inception import Inception
    from stages.evaluate import reference_inception, reference_key
    test, train, _ = sets
    copy = shutil.copytree(test, tmp_path / "copy", ignore=shutil.ignore_patterns("stats"))
    fs, net = FeatureSet.open(copy), Inception()
    fresh, origin = reference_inception(fs, net, None, limit=8)
    direct = net.features(reference_images(fs, None, 8)[0])
    net.features = None  # the second call must not run the network
    cached, cached_origin = reference_inception(fs, net, None, limit=8)
    assert [p.name for p in (copy / "stats").iterdir()] == [f"inception-{reference_key(fs, net)}-8.npz"]
    assert cached.dtype == np.float32 and np.array_equal(cached, direct) and np.array_equal(fresh, direct)
    assert cached_origin == origin == "source images"
    gen = np.random.default_rng(0).normal(size=(8, 2048))
    assert fd(gen, cached) == fd(gen, direct)  # a cached FID is the fresh FID, to the last bit
    assert reference_key(FeatureSet.open(train), net) != reference_key(fs, net)


def test_class_accuracy_proxy_with_a_probe_on_cached_training_features(sets, tmp_path):
    test, train, _ = sets
    fs = FeatureSet.open(test)
    labels = np.asarray(fs.table().column("label"))
    real = write_pngs(tmp_path / "real", reference_images(fs, None)[0], labels)
    result = {m["metric"]: m for m in evaluate(str(real), str(test), fid=False, train_set=str(train))["metrics"]}
    acc = result["class accuracy (proxy)"]["value"]
    assert acc > 0.4 and acc == pytest.approx(result["class accuracy of real reference images (probe ceiling)"]["value"], abs=0.02)


def test_clip_score_is_the_mean_image_prompt_cosine_and_needs_prompts(sets, tmp_path):
    import torch
    from transformers import AutoTokenizer, CLIPModel

    import model_checkpoints as mc
    from pipeline.data.images import resize_square, to_array
    test, _, _ = sets
    clip = mc.write_clip(tmp_path / "clip")
    real = reference_images(FeatureSet.open(test), None)[0][:6]
    prompts = ["a chest x-ray", "left lung", "fundus image", "a", "normal", "right lung effusion"]
    folder = write_pngs(tmp_path / "prompted", real)
    rows = [dict(json.loads(line), prompt=p) for line, p in zip((folder / "samples.jsonl").read_text().splitlines(), prompts)]
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    result = evaluate(str(folder), str(test), fid=False, clip_model="clip-l", clip_model_path=str(clip))
    score = {m["metric"]: m for m in result["metrics"]}["CLIP-Score clip-l"]

    model = CLIPModel.from_pretrained(clip).eval()
    views = torch.from_numpy(np.stack([to_array(resize_square(Image.fromarray(x), 224)) for x in real]))
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    with torch.inference_mode():
        image = model.get_image_features(pixel_values=((views.float() / 255 - mean) / std).permute(0, 3, 1, 2))
        text = model.get_text_features(**AutoTokenizer.from_pretrained(clip)(prompts, padding=True, return_tensors="pt"))
    image, text = (getattr(t, "pooler_output", t) for t in (image, text))
    expected = torch.nn.functional.cosine_similarity(image, text).mean().item()
    assert score["value"] == pytest.approx(expected, abs=1e-4) and score["n_generated"] == 6

    unprompted = write_pngs(tmp_path / "classes", real, classes=[0] * 6)
    metrics = [m["metric"] for m in evaluate(str(unprompted), str(test), fid=False)["metrics"]]
    assert not any(m.startswith("CLIP-Score") for m in metrics)  # no prompts, no CLIP-Score
    with pytest.raises(ValueError, match="--clip-model clip-l: .* has images without a prompt"):
        evaluate(str(unprompted), str(test), fid=False, clip_model="clip-l", clip_model_path=str(clip))


def test_clip_score_defaults_to_the_reference_sets_clip_family_teacher():
    from types import SimpleNamespace

    from stages.evaluate import default_clip_model
    teachers = {"efficientnet-lite0": {"loader": "efficientnet-lite"}, "biomedclip": {"loader": "open-clip-timm"},
                "clip-l": {"loader": "clip"}}
    assert default_clip_model(SimpleNamespace(teachers=teachers)) == "biomedclip"
    assert default_clip_model(SimpleNamespace(teachers={"dinov2-s": {"loader": "dinov2"}})) is None


def test_reference_images_fall_back_to_tokenizer_reconstructions_when_the_source_is_gone(sets, tmp_path):
    import shutil

    import torch

    from pipeline.models.image_tokenizers import load_recorded_tokenizer
    test, _, _ = sets
    moved = shutil.copytree(test, tmp_path / "moved")
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["source"]["path"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    fs = FeatureSet.open(moved)
    images, origin = reference_images(fs, None, limit=5)
    assert origin.startswith("tokenizer reconstructions (source unavailable") and images.shape == (5, 16, 16, 3)
    codes = column_array(fs.table(), "codes")[:5].astype(np.int64).reshape(5, *manifest["tokenizer"]["grid"])
    expected = load_recorded_tokenizer(manifest["tokenizer"]).decode(torch.from_numpy(codes)).numpy()
    assert np.array_equal(images, expected)


def test_fid_kid_and_fd_come_with_the_real_vs_real_floor_at_the_same_n_on_a_balanced_reference(sets, tmp_path):
    """10 generated images (the training set's first image of each class) against 40 test images:
    the reference is the test set's first 4 images of every class, the FID floor is the next 10
    (one per class) against it, the teacher-space floor 10 training images against all 60."""
    from pipeline.metrics.distribution import kid
    from pipeline.models.inception import Inception
    from stages.evaluate import class_balanced_order
    from stages.report import format_table
    test, train, _ = sets
    fs, tr = FeatureSet.open(test), FeatureSet.open(train)
    test_table, train_table = fs.table(), tr.table()
    order, classes = class_balanced_order(np.asarray(test_table.column("label")))
    train_rows = class_balanced_order(np.asarray(train_table.column("label")))[0][:10]
    assert classes == 10 and len(order) == 60
    assert sorted(np.asarray(test_table.column("label"))[order[40:50]]) == list(range(10))  # a balanced held-out set
    gen_images = reference_images(tr, None, table=train_table.take(train_rows))[0]
    gen = write_pngs(tmp_path / "gen", gen_images, np.asarray(train_table.column("label"))[train_rows])
    result = evaluate(str(gen), str(test), fid_reference=40, train_set=str(train))
    m = {x["metric"]: x for x in result["metrics"]}

    net = Inception()
    real = net.features(reference_images(fs, None, table=test_table.take(order[:50]))[0])
    gen_feats = net.features(gen_images)
    fid = m["FID"]
    assert fid["n_generated"] == 10 and fid["n_reference"] == 40 and "class-balanced, 4 per class x 10" in fid["space"]
    assert fid["value"] == pytest.approx(fd(gen_feats, real[:40]), rel=1e-6)
    assert fid["floor"] == pytest.approx(fd(real[40:50], real[:40]), rel=1e-6) and fid["floor_n"] == [10, 40]
    assert "held-out rows" in fid["floor_space"]
    assert m["KID"]["value"] == pytest.approx(kid(gen_feats, real[:40])[0], rel=1e-6)
    assert m["KID"]["floor"] == pytest.approx(kid(real[40:50], real[:40])[0], rel=1e-6) and m["KID"]["subset_size"] == 10

    teacher = m["FD efficientnet-lite0"]
    cached_test = column_array(test_table, "feat.efficientnet-lite0")[order]
    assert teacher["n_reference"] == 60 and teacher["value"] == pytest.approx(
        fd(teacher_features(fs, "efficientnet-lite0", gen_images, None, "cpu", 64), cached_test), rel=1e-6)
    # the floor's real images are these very training images, so the generated set scores exactly the floor
    assert teacher["floor"] == pytest.approx(fd(column_array(train_table, "feat.efficientnet-lite0")[train_rows], cached_test))
    assert teacher["floor"] == pytest.approx(teacher["value"], rel=1e-3) and "training set" in teacher["floor_space"]
    table = format_table(result)
    assert table.count("real-vs-real floor") == 4 and "KID" in table and "FD judge" in table  # FID, KID, FD teacher, FD judge
