"""`arra-pipe audit` finds planted duplicates, leaks and memorised images, and nothing else.

The sets are made by the real extractor (EfficientNet-Lite0 at 32 px on 16 px crops). At that size
unrelated smooth random images reach cosines of about 0.95, while an exact copy scores 1 and a
+6 brightness copy about 0.999, so the tests use a threshold of 0.98.
"""

from __future__ import annotations

import csv
import itertools
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.metrics import neighbours
from pipeline.data.featureset import FeatureSet
from pipeline.data.images import center_crop
from pipeline.data.train_data import TrainStream
from pipeline.lm.vocab import VocabLayout
from stages.audit import decode_rows
from stages.cli import main

THRESHOLD = "0.98"


def smooth_image(seed: int, size: int = 24) -> Image.Image:
    """A random 4x4 colour field upsampled: unrelated images look unrelated to the teacher."""
    cells = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((size, size), Image.BICUBIC)


def brighter(img: Image.Image, delta: int) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(img).astype(int) + delta, 0, 255).astype(np.uint8))


def save(folder, name: str, img: Image.Image) -> None:
    """The image plus a caption sidecar holding its name, so training rows can be told apart."""
    folder.mkdir(parents=True, exist_ok=True)
    img.save(folder / name)
    (folder / name).with_suffix(".txt").write_text(name)


@pytest.fixture(scope="module")
def sets(tmp_path_factory, run_extract_module):
    root = tmp_path_factory.mktemp("audit-images")
    train, test = root / "train", root / "test"
    for i in range(24):
        save(train, f"img{i:02d}.png", smooth_image(i))
    save(train, "img03_copy.png", smooth_image(3))  # exact duplicate
    save(train, "img07_bright.png", brighter(smooth_image(7), 6))  # near duplicate
    for i in range(12):
        save(test, f"t{i:02d}.png", smooth_image(1000 + i))
    save(test, "t_leak_copy.png", smooth_image(11))  # leaks of training images
    save(test, "t_leak_bright.png", brighter(smooth_image(5), -5))
    return run_extract_module(train, "train"), run_extract_module(test, "test")


def audit(*args) -> str:
    result = CliRunner().invoke(main, ["audit", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("index", ["exact", "ivf", "hnsw"])
def test_dedup_finds_the_planted_pairs_and_nothing_else(sets, tmp_path, index):
    out = tmp_path / "dedup"
    text = audit("dedup", sets[0], "--threshold", THRESHOLD, "--index", index, "-o", out)
    rows = read_csv(out / "pairs.csv")
    assert {(r["key_a"], r["key_b"]) for r in rows} == {("img03.png", "img03_copy.png"), ("img07.png", "img07_bright.png")}
    assert all(float(r["cosine"]) > 0.99 for r in rows)
    # the later row of each pair goes
    assert (out / "exclude-keys.txt").read_text().splitlines() == ["img03_copy.png", "img07_bright.png"]
    report = json.loads((out / "report.json").read_text())
    assert report["index"]["kind"] == index and report["pairs"] == 2 and report["rows"] == 26
    assert report["index"]["recall_at_1"] == 1.0
    if index != "exact":  # an approximate index says how it was measured
        assert report["index"]["recall_queries"] == 26 and "recall@1 against exact search 1.0000" in text


def test_exclude_keys_are_dropped_by_the_training_stream(sets, tmp_path):
    out = tmp_path / "dedup"
    audit("dedup", sets[0], "--threshold", THRESHOLD, "-o", out)
    exclude = frozenset((out / "exclude-keys.txt").read_text().split())  # as `train --exclude-keys` reads it
    fs = FeatureSet.open(sets[0])
    layout = VocabLayout("text", 8, 64, (4, 4), {})
    stream = TrainStream([fs], None, layout, micro_batch=2, conditioner=object(), exclude=exclude)
    one_pass = itertools.takewhile(lambda chunk: chunk is not None, stream._rows(np.random.default_rng(0)))
    seen = [caption for chunk in one_pass for caption in chunk["caption"]]
    assert sorted(seen) == sorted(set(fs.table().column("key").to_pylist()) - exclude)
    assert stream.rows_of_rank(0) == fs.rows - len(exclude)  # an epoch counts only the rows trained on
    assert exclude == {"img03_copy.png", "img07_bright.png"}


def test_leakage_finds_the_planted_leaks_and_nothing_else(sets, tmp_path):
    out = tmp_path / "leak"
    text = audit("leakage", sets[0], sets[1], "--threshold", THRESHOLD, "-o", out)
    rows = read_csv(out / "pairs.csv")
    assert {(r["test_key"], r["train_key"]) for r in rows} == {("t_leak_copy.png", "img11.png"),
                                                               ("t_leak_bright.png", "img05.png")}
    assert sorted((out / "leaked-test-keys.txt").read_text().split()) == ["t_leak_bright.png", "t_leak_copy.png"]
    assert sorted((out / "exclude-train-keys.txt").read_text().split()) == ["img05.png", "img11.png"]
    assert "2 of 14 test rows" in text and "exact (IndexFlatIP" in text


def test_memorization_finds_the_planted_copy_in_a_sample_folder(sets, tmp_path, teacher_devices):
    gen = tmp_path / "samples"
    (gen / "images").mkdir(parents=True)
    rows = []
    for i in range(6):  # what `arra-pipe sample` writes: 16 px PNGs, grid.png, samples.jsonl
        img = center_crop(smooth_image(9), 16) if i == 4 else smooth_image(5000 + i, 16)
        img.save(gen / f"images/{i:05d}.png")
        rows.append({"index": i, "file": f"images/{i:05d}.png", "seed": i})
    Image.new("RGB", (96, 16)).save(gen / "grid.png")
    (gen / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "mem"
    text = audit("memorization", gen, sets[0], "--threshold", THRESHOLD, "--show", 4, "-o", out, "--device", "cpu")
    assert teacher_devices == ["cpu"]  # the teacher that embeds the PNGs runs where --device says
    nearest = read_csv(out / "nearest.csv")
    assert len(nearest) == 6
    assert (nearest[0]["generated_key"], nearest[0]["train_key"]) == ("images/00004.png", "img09.png")
    assert float(nearest[0]["cosine"]) > 0.999 and all(float(r["cosine"]) < 0.98 for r in nearest[1:])
    report = json.loads((out / "report.json").read_text())
    assert report["above_threshold"] == 1 and sum(c for _, _, c in report["histogram"]) == 6
    assert report["grid_note"] is None and "histogram of nearest-neighbour cosines" in text
    assert Image.open(out / "closest.png").size == (4 * (2 * 96 + 8), 96 + 16)  # generated | training
    assert Image.open(out / "histogram.png").size == (560, 260)


def test_memorization_of_a_feature_set(sets, tmp_path):
    out = tmp_path / "mem"
    audit("memorization", sets[1], sets[0], "--threshold", THRESHOLD, "-o", out)
    top = read_csv(out / "nearest.csv")[:3]
    assert {(r["generated_key"], r["train_key"]) for r in top[:2]} == {("t_leak_copy.png", "img11.png"),
                                                                      ("t_leak_bright.png", "img05.png")}
    assert float(top[2]["cosine"]) < 0.98


def test_training_images_are_left_out_without_tokenizer_weights(sets):
    fs = FeatureSet.open(sets[0])
    tok = {**fs.manifest["tokenizer"], "weights_path": "/nonexistent/codebook.safetensors"}
    images, note = decode_rows(FeatureSet(fs.path, {**fs.manifest, "tokenizer": tok}), ["img01.png"], None)
    assert images == {} and "--tokenizer-path" in note
    images, note = decode_rows(fs, ["img01.png", "img02.png"], None)
    assert note is None and sorted(images) == ["img01.png", "img02.png"] and images["img01.png"].shape == (16, 16, 3)


def test_other_teacher_space_is_refused(sets, tmp_path):
    fs = FeatureSet.open(sets[1])
    manifest = {**fs.manifest, "preprocess": {**fs.manifest["preprocess"], "teacher_view": "original"}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "shards").symlink_to(fs.path / "shards")
    result = CliRunner().invoke(main, ["audit", "leakage", str(sets[0]), str(tmp_path), "-o", str(tmp_path / "out")])
    assert result.exit_code != 0 and "teacher_view" in result.output


def clustered(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n // 50, d))
    return neighbours.normalise(centres[rng.integers(0, len(centres), n)] + 0.3 * rng.normal(size=(n, d)))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_is_tuned_to_the_recall_target_and_measured(kind):
    x, queries = np.split(clustered(4300), [4000])  # queries from the same clusters, as a test set is
    nb = neighbours.build(x, kind, recall_target=0.95, sample=400)
    assert nb.kind == kind and nb.recall_queries == 400 and nb.recall >= 0.95 and not nb.widest  # the target, met
    sims, ids = nb.search(None, 3)
    assert not (ids == np.arange(len(x))[:, None]).any()  # the self-join leaves each row's own match out
    exact_sims, exact_ids = neighbours.build(x, "exact").search(None, 1)
    assert np.mean(sims[:, 0] >= exact_sims[:, 0] - neighbours.TIE) >= 0.9
    nq = neighbours.build(x, kind, queries=queries, recall_target=0.95, sample=300)
    assert nq.recall_queries == 300 and nq.recall >= 0.95 and not nq.widest


def test_ivf_stops_widening_where_exact_search_is_cheaper_and_says_so():
    """Unclustered 64-d noise: no nearest neighbour is local, so the target is out of reach."""
    x = neighbours.normalise(np.random.default_rng(0).normal(size=(4000, 64)))
    nb = neighbours.build(x, "ivf", recall_target=0.95, sample=400)
    nlist = nb.params["nlist"]
    assert nb.widest and nb.params["nprobe"] == int(nlist * neighbours.MAX_SCAN) < nlist
    assert nb.recall < 0.95 and nb.recall_queries == 400  # measured all the same
    assert "short of the recall target 0.95" in nb.describe() and "--index exact" in nb.describe()
    assert nb.to_dict()["stopped_at_widest_search"] is True


def test_auto_index_by_size():
    assert neighbours.choose_kind(1000) == "exact" and neighbours.choose_kind(10 ** 6) == "hnsw"
    with pytest.raises(ValueError):
        neighbours.choose_kind(10, "lsh")
