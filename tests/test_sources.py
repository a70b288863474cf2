"""Every source format, extracted for real: the keys, captions and labels that come out."""

from __future__ import annotations

import csv
import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from conftest import write_image

from pipeline.data.featureset import FeatureSet
from pipeline.options import OptionError
from pipeline.data.sources import FASHION_MNIST_CLASSES, SourceError, SourceOptions, detect_format, read_source

FASHION_MINI = Path(__file__).resolve().parent.parent / "data" / "fashion-mnist-mini"


def rows_of(out) -> list[tuple[str, str, int]]:
    """(key, caption, label) of every row of a finished set, in set order."""
    t = FeatureSet.open(out).table()
    return list(zip(t.column("key").to_pylist(), t.column("caption").to_pylist(), t.column("label").to_pylist()))


def assert_clean(result, out, n):
    fs = FeatureSet.open(out)
    assert fs.rejects() == [], f"unexpected rejects: {fs.rejects()}"
    assert result.rows == n and fs.rows == n and result.rejects == 0
    assert fs.manifest["rejects"] == {"total": 0, "by_reason": {}, "file": "rejects.jsonl"}
    assert fs.verify() == []


# ---------------------------------------------------------------------------------------------
# ARRA / Lumina-mGPT conversation JSON


def conversation(prompt, image):
    return {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": "<|image|>"}],
            "image": [image]}


def test_conversations_json_keeps_same_file_name_in_two_folders(tmp_path, run_extract):
    src = tmp_path / "src"
    write_image(src / "a" / "x.png", seed=1)
    write_image(src / "b" / "x.png", seed=2)
    write_image(src / "c.jpg", seed=3)
    items = [conversation("a red fox in the snow", "a/x.png"),
             conversation("a blue boat on a lake", "b/x.png"),
             conversation("Generate an image: 一只猫", "c.jpg")]
    (src / "data.json").write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")

    result, out = run_extract(src / "data.json")

    assert_clean(result, out, 3)
    assert rows_of(out) == [("a/x.png", "a red fox in the snow", -1),
                            ("b/x.png", "a blue boat on a lake", -1),
                            ("c.jpg", "Generate an image: 一只猫", -1)]
    # both x.png files were extracted as themselves (different pixels -> different codes)
    codes = FeatureSet.open(out).table().column("codes").to_pylist()
    assert codes[0] != codes[1], "a/x.png and b/x.png gave the same codes: one image overwrote the other"
    assert FeatureSet.open(out).manifest["source"]["format"] == "conversations"


def test_conversations_json_image_root(tmp_path, run_extract):
    images = tmp_path / "images"
    write_image(images / "p" / "1.png", seed=4)
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "items.json").write_text(json.dumps([conversation("one", "p/1.png")]))

    result, out = run_extract(tmp_path / "meta" / "items.json", source_options=dict(image_root=str(images)))

    assert_clean(result, out, 1)
    assert rows_of(out) == [("p/1.png", "one", -1)]


# ---------------------------------------------------------------------------------------------
# image folders


def test_imagefolder_classes_sidecars_and_same_name(tmp_path, run_extract):
    src = tmp_path / "src"
    write_image(src / "loose.png", seed=1)                 # not in a class folder: label -1, no caption
    write_image(src / "bird" / "b1.jpg", seed=2)
    write_image(src / "cat" / "x.png", seed=3)
    write_image(src / "cat" / "1.png", seed=4)
    write_image(src / "dog" / "x.png", seed=5)             # same file name as cat/x.png
    (src / "dog" / "x.txt").write_text("  a happy dog on the beach\n", encoding="utf-8")
    write_image(src / "hot_dog" / "h.png", seed=6)         # underscores become spaces in the caption
    write_image(src / ".hidden" / "skip.png", seed=7)      # hidden folders and files are ignored
    write_image(src / "cat" / ".skip.png", seed=8)

    result, out = run_extract(src)

    assert_clean(result, out, 6)
    assert rows_of(out) == [("loose.png", "", -1),
                            ("bird/b1.jpg", "bird", 0),
                            ("cat/1.png", "cat", 1),
                            ("cat/x.png", "cat", 1),
                            ("dog/x.png", "a happy dog on the beach", 2),
                            ("hot_dog/h.png", "hot dog", 3)]
    codes = FeatureSet.open(out).table().column("codes").to_pylist()
    assert codes[3] != codes[4], "cat/x.png and dog/x.png gave the same codes"


# ---------------------------------------------------------------------------------------------
# tables


@pytest.fixture
def table_images(tmp_path):
    src = tmp_path / "src"
    for i, name in enumerate(["img/a.png", "img/b.jpg", "img/sub/c.png", "other/a.png"]):
        write_image(src / name, seed=10 + i)
    return src


def test_csv_table(table_images, run_extract):
    with open(table_images / "t.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "extra"])
        w.writerow(["img/a.png", "a photo, with a comma", "x"])
        w.writerow(["img/b.jpg", 'a "quoted" caption', "y"])
        w.writerow(["other/a.png", "same file name, other folder", "z"])
        w.writerow([str(table_images / "img/sub/c.png"), "absolute path", "w"])

    result, out = run_extract(table_images / "t.csv")

    assert_clean(result, out, 4)
    assert rows_of(out) == [("img/a.png", "a photo, with a comma", -1),
                            ("img/b.jpg", 'a "quoted" caption', -1),
                            ("other/a.png", "same file name, other folder", -1),
                            (str(table_images / "img/sub/c.png"), "absolute path", -1)]


def test_csv_with_utf8_byte_order_mark(table_images, run_extract):
    # Excel's "CSV UTF-8" starts the file with a BOM; the first column must still be found by name
    (table_images / "bom.csv").write_bytes("\ufeffimage,caption\nimg/a.png,café au lait\n".encode("utf-8"))
    try:
        result, out = run_extract(table_images / "bom.csv")
    except SourceError as exc:
        pytest.fail(f"BUG pipeline/data/sources.py _table_rows: a CSV starting with a UTF-8 BOM is opened with "
                    f"encoding='utf-8', so the first column is named '\\ufeffimage' and is not found: {exc}")
    assert_clean(result, out, 1)
    assert rows_of(out) == [("img/a.png", "café au lait", -1)]


def test_tsv_table_with_label_and_key_columns(table_images, run_extract):
    lines = ["id\timage_path\ttext\tclass",
             "k-001\timg/a.png\tfirst image\t3",
             "k-002\timg/b.jpg\tsecond, image\t0",
             "k-003\timg/sub/c.png\tthird image\t"]            # empty label -> -1
    (table_images / "t.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")

    result, out = run_extract(table_images / "t.tsv", source_options=dict(label_column="class", key_column="id"))

    assert_clean(result, out, 3)
    assert rows_of(out) == [("k-001", "first image", 3), ("k-002", "second, image", 0), ("k-003", "third image", -1)]


def test_jsonl_table(table_images, run_extract):
    rows = [{"file": "img/sub/c.png", "prompt": "ünïcödé caption", "n": 1},
            {"file": "img/a.png", "prompt": "plain caption", "n": 2}]
    (table_images / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n", encoding="utf-8")

    result, out = run_extract(table_images / "t.jsonl", source_options=dict(key_column="n"))

    assert_clean(result, out, 2)
    assert rows_of(out) == [("1", "ünïcödé caption", -1), ("2", "plain caption", -1)]


def test_parquet_table_with_caption_template(table_images, run_extract):
    pq.write_table(pa.table({"path": ["img/a.png", "img/b.jpg"],
                             "view": ["PA", "lateral"],
                             "impression": ["no acute findings", "small left effusion"],
                             "label": [1, 0]}),
                   table_images / "cxr.parquet")

    result, out = run_extract(table_images / "cxr.parquet", source_options=dict(
        caption_template="{view} view chest X-ray image, {impression}", label_column="label"))

    assert_clean(result, out, 2)
    assert rows_of(out) == [("img/a.png", "PA view chest X-ray image, no acute findings", 1),
                            ("img/b.jpg", "lateral view chest X-ray image, small left effusion", 0)]


@pytest.mark.parametrize("option", ["image_column", "caption_column", "label_column", "key_column"])
def test_table_missing_named_column_names_column_and_file(table_images, option, run_extract, tmp_path):
    (table_images / "t.csv").write_text("image,caption\nimg/a.png,hello\n", encoding="utf-8")
    with pytest.raises(SourceError) as exc:
        run_extract(table_images / "t.csv", source_options={option: "no_such_col"})
    msg = str(exc.value)
    assert "'no_such_col'" in msg and str(table_images / "t.csv") in msg, msg
    assert not (tmp_path / "set" / "manifest.json").exists()


def test_table_caption_template_with_missing_column(table_images, run_extract):
    (table_images / "t.csv").write_text("image,view\nimg/a.png,PA\n", encoding="utf-8")
    with pytest.raises(SourceError) as exc:
        run_extract(table_images / "t.csv", source_options=dict(caption_template="{view} view, {impression}"))
    msg = str(exc.value)
    assert "impression" in msg and str(table_images / "t.csv") in msg, msg


def test_table_without_recognisable_columns(table_images):
    (table_images / "t.csv").write_text("picture,words\nimg/a.png,hello\n", encoding="utf-8")
    with pytest.raises(SourceError, match="--image-column"):
        read_source(table_images / "t.csv")
    (table_images / "t.csv").write_text("image,words\nimg/a.png,hello\n", encoding="utf-8")
    with pytest.raises(SourceError, match="--caption-column"):
        read_source(table_images / "t.csv")


# ---------------------------------------------------------------------------------------------
# img2dataset output


def jpeg_bytes(seed, size=(20, 24)):
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def add_member(tf: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_img2dataset_shard(folder: Path, shard: int, rows: list[tuple[str, str, str]]):
    """rows: (key, caption, status); successful rows get .jpg/.txt/.json members like img2dataset."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / f"{shard:05d}.tar", "w") as tf:
        for key, caption, status in rows:
            if status == "success":
                add_member(tf, f"{key}.jpg", jpeg_bytes(int(key)))
                add_member(tf, f"{key}.txt", caption.encode("utf-8"))
                add_member(tf, f"{key}.json", json.dumps({"key": key, "caption": caption}).encode())
    pq.write_table(pa.table({"key": [r[0] for r in rows], "caption": [r[1] for r in rows],
                             "status": [r[2] for r in rows],
                             "error_message": [None if r[2] == "success" else "404" for r in rows]}),
                   folder / f"{shard:05d}.parquet")


def test_img2dataset_folder(tmp_path, run_extract):
    src = tmp_path / "i2d"
    write_img2dataset_shard(src, 0, [("000000000", "first caption", "success"),
                                     ("000000001", "second caption", "success"),
                                     ("000000002", "never downloaded", "failed_to_download"),
                                     ("000000003", "fourth caption", "success")])
    write_img2dataset_shard(src, 1, [("000010000", "other shard", "success"),
                                     ("000010001", "also failed", "failed_to_download")])
    (src / "00000_stats.json").write_text("{}")

    assert detect_format(src) == "img2dataset"
    result, out = run_extract(src)

    assert_clean(result, out, 4)
    assert rows_of(out) == [("000000000", "first caption", -1), ("000000001", "second caption", -1),
                            ("000000003", "fourth caption", -1), ("000010000", "other shard", -1)]
    fs = FeatureSet.open(out)
    assert fs.manifest["skipped"] == {"img2dataset status 'failed_to_download'": 2}
    keys = set(fs.table().column("key").to_pylist())
    assert "000000002" not in keys and "000010001" not in keys
    assert all(r["key"] not in ("000000002", "000010001") for r in fs.rejects())


def test_img2dataset_success_row_without_image_is_rejected_missing(tmp_path, run_extract):
    src = tmp_path / "i2d"
    write_img2dataset_shard(src, 0, [("000000000", "ok", "success"), ("000000001", "gone", "success")])
    # drop member 000000001.jpg from the tar, keep the parquet row saying success
    with tarfile.open(src / "00000.tar") as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf if m.name != "000000001.jpg"]
    with tarfile.open(src / "00000.tar", "w") as tf:
        for m, data in members:
            add_member(tf, m.name, data)

    result, out = run_extract(src)

    fs = FeatureSet.open(out)
    assert rows_of(out) == [("000000000", "ok", -1)]
    assert [(r["key"], r["reason"].split(":")[0]) for r in fs.rejects()] == [("000000001", "missing")]
    assert "00000.tar" in fs.rejects()[0]["reason"]


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST idx


def read_idx_gz(path: Path) -> np.ndarray:
    data = gzip.open(path, "rb").read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def test_fashion_mnist_test_split(run_extract):
    labels = read_idx_gz(FASHION_MINI / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (500,) and np.bincount(labels).tolist() == [50] * 10

    result, out = run_extract(FASHION_MINI, source_options=dict(split="test"), batch_size=64, shard_size=256)

    assert_clean(result, out, 500)
    got = rows_of(out)
    assert got[0][0] == "fashion-mnist/test/00000"
    assert [k for k, _, _ in got] == [f"fashion-mnist/test/{i:05d}" for i in range(500)]
    assert [lab for _, _, lab in got] == labels.tolist()
    assert [c for _, c, _ in got] == [f"a photo of a {FASHION_MNIST_CLASSES[lab]}" for lab in labels]
    assert got[0][1].startswith("a photo of a ")
    assert {c for _, c, _ in got} == {f"a photo of a {name}" for name in FASHION_MNIST_CLASSES}
    fs = FeatureSet.open(out)
    assert fs.manifest["source"]["format"] == "fashion-mnist"
    assert len(fs.manifest["shards"]) == 2


def test_fashion_mnist_sources_without_extracting():
    train = read_source(FASHION_MINI)                                     # default split: train
    assert train.format == "fashion-mnist"
    train_labels = read_idx_gz(FASHION_MINI / "train-labels-idx1-ubyte.gz")
    assert len(train.records) == len(train_labels)
    assert train.records[0].key == "fashion-mnist/train/00000"
    assert [r.label for r in train.records] == train_labels.tolist()
    # the images file itself also works, and picks the split from its name
    test = read_source(FASHION_MINI / "t10k-images-idx3-ubyte.gz")
    assert [r.key for r in test.records] == [f"fashion-mnist/test/{i:05d}" for i in range(500)]
    with pytest.raises(OptionError, match="--split must be one of train, test"):
        read_source(FASHION_MINI, options=SourceOptions(split="validation"))


# ---------------------------------------------------------------------------------------------
# format detection


def test_detect_format(tmp_path):
    (tmp_path / "c.json").write_text("[]")
    assert detect_format(tmp_path / "c.json") == "conversations"
    for name in ("t.csv", "t.tsv", "t.jsonl", "t.parquet", "UPPER.CSV"):
        (tmp_path / name).write_text("")
        assert detect_format(tmp_path / name) == "table", name
    folder = tmp_path / "folder"
    write_image(folder / "cls" / "a.png")
    assert detect_format(folder) == "imagefolder"
    i2d = tmp_path / "i2d"
    write_img2dataset_shard(i2d, 0, [("000000000", "c", "success")])
    assert detect_format(i2d) == "img2dataset"
    assert detect_format(FASHION_MINI) == "fashion-mnist"
    assert detect_format(FASHION_MINI / "train-images-idx3-ubyte.gz") == "fashion-mnist"
    # a folder with a tar but no parquet beside it is just a folder
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "00000.tar").write_bytes(b"")
    assert detect_format(lone) == "imagefolder"
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(SourceError, match="--source-format"):
        detect_format(tmp_path / "notes.md")
    with pytest.raises(SourceError, match="no such file"):
        detect_format(tmp_path / "does-not-exist")


def test_source_format_override(tmp_path):
    src = tmp_path / "src"
    write_image(src / "a.png")
    (src / "list.txt").write_text("image,caption\na.png,hi\n")
    with pytest.raises(SourceError, match="--source-format"):
        read_source(src / "list.txt")
    source = read_source(src / "list.txt", fmt="table")
    assert [(r.key, r.caption, r.label, r.ref) for r in source.records] == [("a.png", "hi", -1, ("file", str(src / "a.png")))]
    with pytest.raises(SourceError, match="unknown --source-format"):
        read_source(src / "list.txt", fmt="yaml")


# ---------------------------------------------------------------------------------------------
# stable keys


def test_keys_are_stable_across_extractions(tmp_path, run_extract):
    src = tmp_path / "src"
    for i, name in enumerate(["b/z.png", "a/x.png", "a/y.jpg", "b/x.png", "top.png", "c/x.png"]):
        write_image(src / name, seed=i)
    (src / "a" / "y.txt").write_text("a caption")

    r1, out1 = run_extract(src, out=tmp_path / "one")
    r2, out2 = run_extract(src, out=tmp_path / "two")

    t1, t2 = FeatureSet.open(out1).table(), FeatureSet.open(out2).table()
    keys = t1.column("key").to_pylist()
    assert keys == ["top.png", "a/x.png", "a/y.jpg", "b/x.png", "b/z.png", "c/x.png"]
    assert t2.column("key").to_pylist() == keys
    assert t1.equals(t2), "the same source extracted twice gave different rows"
    m1, m2 = FeatureSet.open(out1).manifest, FeatureSet.open(out2).manifest
    assert m1["source"]["fingerprint"] == m2["source"]["fingerprint"]
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]


def test_a_rejected_row_does_not_claim_its_key(tmp_path):
    """Only rows not already known to be bad claim a key: the first good row with a key is kept,
    later good rows with it are duplicates of that one, and a bad row keeps its own reason."""
    (tmp_path / "t.csv").write_bytes(b"id,image,caption,label\n"
                                     b"k1,a.png,bad label,seven\n"
                                     b"k1,b.png,bad caption \xff,1\n"
                                     b"k1,c.png,the first good one,2\n"
                                     b"k1,d.png,a duplicate,3\n"
                                     b"k1,e.png,bad label again,-5\n")
    source = read_source(tmp_path / "t.csv", options=SourceOptions(key_column="id", label_column="label"))
    got = [(r.ref[1].rsplit("/", 1)[1], r.reject and r.reject.split(":")[0]) for r in source.records]
    assert got == [("a.png", "bad-row"), ("b.png", "bad-utf8"), ("c.png", None), ("d.png", "duplicate-key"),
                   ("e.png", "bad-row")]                                     # its own reason, not the key's
    assert source.records[3].reject == "duplicate-key: 'k1' first seen at t.csv row 3"


def test_negative_labels_other_than_none_are_bad_rows(tmp_path):
    """-1 is the feature set's "no label" (as an empty cell); any other negative label is refused."""
    (tmp_path / "t.csv").write_text("image,caption,label\na.png,x,-1\nb.png,y,-2\nc.png,z,\nd.png,w,0\n")
    source = read_source(tmp_path / "t.csv", options=SourceOptions(label_column="label"))
    assert [(r.label, r.reject) for r in source.records] == [
        (-1, None), (-1, "bad-row: label -2 is not an integer in 0..2**31-1"), (-1, None), (0, None)]
