"""The independent judge: a small CNN trained on the training set's own Fashion-MNIST images at the
set's 32 px canonical crop, cached as safetensors in the set's stats/, and eval's figures under it."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.data.featureset import FeatureSet
from pipeline.data.files import sha256_file
from pipeline.data.set_images import reference_images
from pipeline.errors import ArraError
from pipeline.metrics import judge as judge_module
from pipeline.metrics.judge import JudgeConfig, judge_key, load_or_train
from stages.evaluate import class_balanced_order, evaluate

MINI = "data/fashion-mnist-mini"
SMALL = JudgeConfig(epochs=1, max_images=300)  # for what needs a judge but not a good one


@pytest.fixture(scope="module")
def sets(run_extract_module, tmp_path_factory):
    """The embedded subset's 2,000 training and 500 test images, extracted at a 32 px crop (as the
    reference experiment's tokenizer crops them)."""
    from pipeline.models.image_tokenizers import save_kmeans_codebook
    codebook = tmp_path_factory.mktemp("tok32") / "codebook.safetensors"
    save_kmeans_codebook(codebook, np.random.default_rng(0).random((64, 48), dtype=np.float32), patch=4, resolution=32)
    kw = dict(tokenizer_path=str(codebook), shard_size=500, batch_size=100)
    train = run_extract_module(MINI, name="train", source_options={"split": "train"}, **kw)
    test = run_extract_module(MINI, name="test", source_options={"split": "test"}, **kw)
    return train, test


@pytest.fixture(scope="module")
def trained(sets):
    """The default judge of the training set, trained once (timed) for the module."""
    start = time.perf_counter()
    judge = load_or_train(FeatureSet.open(sets[0]))
    return judge, time.perf_counter() - start


def write_pngs(folder, images, classes):
    folder.mkdir(parents=True)
    rows = []
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:05d}.png")
        rows.append({"file": f"{i:05d}.png", "seed": i, "class": int(classes[i])})
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_the_judge_trained_on_the_subset_classifies_held_out_test_images(sets, trained):
    judge, seconds = trained
    train, test = sets
    fs = FeatureSet.open(test)
    images, origin = reference_images(fs, None)
    labels = np.asarray(fs.table().column("label"))
    assert origin == "source images" and images.shape == (500, 32, 32, 3)
    accuracy = float((judge.predict(images) == labels).mean())
    # measured 0.88 on these 500 test images (2,000 training images, 8 epochs, 61k parameters, one thread: 22.8 CPU-s)
    assert accuracy >= 0.84, accuracy
    assert judge.trained and judge.cpu_seconds < 60  # CPU time on its one thread: other jobs on the machine do not count
    assert sum(p.numel() for p in judge.net.parameters()) < 100_000
    assert judge.path == FeatureSet.open(train).stats_dir() / f"judge-{judge_key(FeatureSet.open(train), JudgeConfig())}.safetensors"
    assert sha256_file(judge.path) == judge.sha256 == json.loads(judge.path.with_suffix(".json").read_text())["sha256"]
    assert judge.features(images[:4]).shape == (4, 64)


def test_training_is_deterministic_and_the_seed_changes_the_weights(sets, tmp_path):
    train = sets[0]
    copies = [shutil.copytree(train, tmp_path / name, ignore=shutil.ignore_patterns("stats")) for name in "ab"]
    a, b = (load_or_train(FeatureSet.open(c), config=SMALL) for c in copies)
    assert a.trained and b.trained and a.sha256 == b.sha256 and a.path.read_bytes() == b.path.read_bytes()
    other = load_or_train(FeatureSet.open(copies[0]), config=JudgeConfig(epochs=1, max_images=300, seed=1))
    assert other.sha256 != a.sha256 and other.path != a.path  # the config is part of the key


def test_a_cached_judge_is_loaded_not_retrained(sets, trained, monkeypatch):
    judge, _ = trained

    def refuse(*args, **kw):
        raise AssertionError("retrained a cached judge")
    monkeypatch.setattr(judge_module, "train_judge", refuse)
    again = load_or_train(FeatureSet.open(sets[0]))
    assert not again.trained and again.sha256 == judge.sha256 and again.path == judge.path
    images = reference_images(FeatureSet.open(sets[1]), None, limit=20)[0]
    assert np.array_equal(again.predict(images), judge.predict(images))
    assert np.array_equal(again.features(images), judge.features(images))


def test_a_tampered_cache_file_is_refused_naming_it(sets, tmp_path):
    copy = shutil.copytree(sets[0], tmp_path / "train", ignore=shutil.ignore_patterns("stats"))
    judge = load_or_train(FeatureSet.open(copy), config=SMALL)
    data = bytearray(judge.path.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    judge.path.write_bytes(bytes(data))
    with pytest.raises(ArraError, match=f"{judge.path.name}: sha256 .* is not the {judge.sha256[:12]} recorded"):
        load_or_train(FeatureSet.open(copy), config=SMALL)


@pytest.fixture
def no_teacher(monkeypatch):
    """eval without the teacher-space figures (tested in test_evaluate.py): the 1,280-d FDs and the
    linear probe on 2,000 rows took 2 of an eval's 2.5 minutes on 2 busy cores."""
    import stages.evaluate
    monkeypatch.setattr(stages.evaluate, "_teacher_metrics", lambda *a, **kw: None)
    monkeypatch.setattr(stages.evaluate, "_class_accuracy", lambda *a, **kw: None)


def test_eval_reports_the_judges_figures_with_its_sha256_and_floor(sets, trained, tmp_path, no_teacher):
    """50 generated images that are the reference's held-out rows score exactly the real-vs-real
    floor; uniform noise scores far above it; the class accuracy of real images is near the ceiling.
    (With the teacher's figures beside them: test_evaluate's last test.)"""
    train, test = sets
    judge, _ = trained
    fs = FeatureSet.open(test)
    table = fs.table()
    labels = np.asarray(table.column("label"))
    order = class_balanced_order(labels)[0]
    held = order[-50:]
    real = write_pngs(tmp_path / "real", reference_images(fs, None, table=table.take(held))[0], labels[held])
    noise = write_pngs(tmp_path / "noise", np.random.default_rng(0).integers(0, 256, (50, 32, 32, 3), dtype=np.uint8),
                       labels[held])
    a = {m["metric"]: m for m in evaluate(str(real), str(test), fid=False, train_set=str(train))["metrics"]}
    b = {m["metric"]: m for m in evaluate(str(noise), str(test), fid=False, train_set=str(train))["metrics"]}
    space = f"independent judge: CNN trained on {FeatureSet.open(train).path}, sha256 {judge.sha256[:12]}"
    for name in ("FD judge", "class accuracy (judge)", "class accuracy of real reference images (judge ceiling)"):
        assert a[name]["space"].startswith(space) and a[name]["judge"]["sha256"] == judge.sha256
        assert not a[name]["judge"]["trained_now"]  # the module's judge, from the cache
    fd_real, fd_noise = a["FD judge"], b["FD judge"]
    assert fd_real["n_generated"] == 50 and fd_real["n_reference"] == len(order) - 50
    assert fd_real["value"] == pytest.approx(fd_real["floor"], rel=1e-9) and "held-out rows" in fd_real["floor_space"]
    assert fd_noise["value"] > 20 * fd_real["value"], (fd_noise["value"], fd_real["value"])
    ceiling = a["class accuracy of real reference images (judge ceiling)"]["value"]
    assert ceiling >= 0.84 and abs(a["class accuracy (judge)"]["value"] - ceiling) < 0.1
    assert b["class accuracy (judge)"]["value"] < 0.4

    off = evaluate(str(real), str(test), fid=False, train_set=str(train), judge=False)["metrics"]
    assert not any("judge" in m["metric"] for m in off)


def test_eval_cli_no_judge_flag(sets, tmp_path, no_teacher):
    from click.testing import CliRunner

    from stages.cli import main
    train, test = sets
    fs = FeatureSet.open(test)
    gen = write_pngs(tmp_path / "gen", reference_images(fs, None, limit=10)[0], np.asarray(fs.table().column("label"))[:10])
    args = ["eval", "--generated", str(gen), "--reference", str(test), "--train-set", str(train), "--no-fid"]
    result = CliRunner().invoke(main, args + ["--no-judge"])
    assert result.exit_code == 0, result.output
    assert "FD judge" not in result.output and "independent judge" not in result.output
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "FD judge" in result.output and "independent judge: CNN trained on" in result.output


def test_the_results_table_puts_each_judge_figure_beside_its_teacher_space_one():
    from stages.experiment import markdown, paired, summarize

    def run(arm, seed, shift):
        figures = {"FD t": (800.0 + shift, 50.0), "FID": (100.0 + shift, 19.0), "class accuracy (proxy)": (0.4, None),
                   "class accuracy of real reference images (probe ceiling)": (0.89, None),
                   "class accuracy (judge)": (0.5 + shift / 100, None),
                   "class accuracy of real reference images (judge ceiling)": (0.88, None), "FD judge": (3.0 + shift, 0.5)}
        return {"arm": arm, "seed": seed, "seconds": {}, "metrics": {
            k: {"value": v, "n_generated": 100, "n_reference": 400, **({"floor": f} if f is not None else {})}
            for k, (v, f) in figures.items()}}
    runs = [run("plain", 0, 0.0), run("arra", 0, -1.0), run("plain", 1, 1.0), run("arra", 1, -0.5)]
    summary = summarize(runs, ["plain", "arra"], "t")
    assert summary["arra"]["FD judge"]["mean"] == pytest.approx(2.25) and summary["arra"]["FD judge"]["floor"] == 0.5
    table = markdown({"experiment": "x.toml", "scale": "cpu", "description": "", "scale_note": "", "data": "d",
                      "device": "cpu", "machine": "m", "seeds": [0, 1], "runs": runs, "seconds": {}, "commands": [],
                      "summary": summary, "paired": paired(runs, ["plain", "arra"])}, "t")
    lines = table.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("| metric | n_gen"))) + 2
    rows = [line.split(" | ")[0][2:] for line in lines[start:lines.index("", start)]]
    assert rows == ["FD t", "FD judge", "FID", "class accuracy (proxy)", "class accuracy (judge)"], rows
    assert "| FD judge | 100 / 400 | 0.5 | 3.5 ± 0.71 | 2.25 ± 0.35 | -35.7% |" in table
    assert "not on t (the teacher the ARRA arm is pulled towards)" in table
    assert "its class accuracy on the real test images is 0.880" in table and "it scores 0.890" in table
