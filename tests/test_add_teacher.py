"""A teacher added to a finished set later: no tokenizer run, columns parallel to the shards,
the same features a first extraction would have stored, and readers that refuse misaligned keys."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
from PIL import Image
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

import model_checkpoints as mc
from conftest import TEACHER_RES, write_image
from pipeline.data.featureset import FeatureSet, FeatureSetError, batch_to_ipc, read_members, write_shard
from pipeline.models.image_tokenizers import KMeansTokenizer
from stages.cli import main
from pipeline.data.jobs import JobError
from stages.add_columns import add_teachers
from stages.extract import extract
from stages.options import ExtractOptions


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {"clip-l": str(mc.write_clip(root / "clip")), "dinov2-s": str(mc.write_dinov2(root / "dino", 384))}


@pytest.fixture
def folder(tmp_path):
    """13 images in 2 classes, one of them corrupt (so shards hold fewer rows than records)."""
    for i in range(12):
        write_image(tmp_path / "src" / f"c{i % 2}" / f"{i:02d}.png", size=(24 + i, 20), seed=i)
    (tmp_path / "src" / "c0" / "broken.png").write_bytes(b"\x89PNG not really")
    return tmp_path / "src"


def options(codebook, source, out, **kw):
    opts = dict(source=source and str(source), out=str(out), tokenizer_path=codebook, teacher_resolution=TEACHER_RES,
                batch_size=4, workers=0, shard_size=6, progress=False, max_reject_rate=1.0)
    return ExtractOptions(**{**opts, **kw})


def no_tokenizer(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer must not run when adding a teacher")
    monkeypatch.setattr(KMeansTokenizer, "__init__", refuse)
    monkeypatch.setattr(KMeansTokenizer, "encode", refuse)


def features(path, teacher):
    return np.stack(FeatureSet.open(path).table().column(f"feat.{teacher}").to_numpy(zero_copy_only=False))


def test_added_teachers_equal_a_first_extraction_and_never_run_the_tokenizer(codebook, folder, checkpoints, tmp_path, monkeypatch,
                                                                           request):
    # a process on another thread count than extract's split: adding must run on the split's, or the bits differ
    request.addfinalizer(lambda threads=torch.get_num_threads(): torch.set_num_threads(threads))
    torch.set_num_threads(1)
    both = tmp_path / "both"
    extract(options(codebook, folder, both, teachers=("efficientnet-lite0", "clip-l", "dinov2-s"),
                    teacher_paths=checkpoints), log=lambda m: None)
    base = tmp_path / "set"
    extract(options(codebook, folder, base), log=lambda m: None)
    before = {p.name: p.read_bytes() for p in (base / "shards").glob("*.tar")} | {"manifest": (base / "manifest.json").read_bytes()}

    no_tokenizer(monkeypatch)
    result = add_teachers(options(codebook, None, base, teachers=("clip-l", "dinov2-s"), teacher_paths=checkpoints), log=lambda m: None)
    assert result.status == "added" and result.rows_extracted == 12
    fs = FeatureSet.open(base)
    assert set(fs.columns) == {"clip-l", "dinov2-s"} and list(fs.teachers) == ["efficientnet-lite0", "clip-l", "dinov2-s"]
    assert fs.verify() == []
    assert {p.name: p.read_bytes() for p in (base / "shards").glob("*.tar")} | {"manifest": (base / "manifest.json").read_bytes()} == before
    for shard, column in zip(fs.manifest["shards"], fs.columns["clip-l"]["shards"]):
        assert column["name"] == shard["name"].replace("shards/", "columns/clip-l/") and column["rows"] == shard["rows"]
        base_members = [(m, b.column("key")) for m, b in read_members(base / shard["name"])]
        col_members = [(m, b.column("key")) for m, b in read_members(base / column["name"])]
        assert [m for m, _ in base_members] == [m for m, _ in col_members]
        assert all(a.equals(b) for (_, a), (_, b) in zip(base_members, col_members))
    table = fs.table()
    assert table.column_names == ["key", "caption", "label", "codes", "feat.efficientnet-lite0", "feat.clip-l", "feat.dinov2-s"]
    assert table.column("key").to_pylist() == FeatureSet.open(both).table().column("key").to_pylist()
    for teacher in ("clip-l", "dinov2-s"):
        assert np.array_equal(features(base, teacher), features(both, teacher))
    assert fs.columns["clip-l"]["feature_stats"] == FeatureSet.open(both).manifest["feature_stats"]["clip-l"]

    again = add_teachers(options(codebook, None, base, teachers=("clip-l",), teacher_paths=checkpoints), log=lambda m: None)
    assert again.status == "up-to-date"
    other = mc.write_clip(tmp_path / "other-clip")
    with pytest.raises(JobError, match="(?s)holds other features.*weights_sha256"):
        add_teachers(options(codebook, None, base, teachers=("clip-l",), teacher_paths={"clip-l": str(other)}), log=lambda m: None)


def test_kept_images_stand_in_for_a_source_that_is_gone(codebook, folder, checkpoints, tmp_path, monkeypatch):
    kept = tmp_path / "kept"
    extract(options(codebook, folder, kept, keep_images=True), log=lambda m: None)
    fs = FeatureSet.open(kept)
    assert fs.columns["image"]["rows"] == fs.rows == 12 and fs.verify() == []
    crops = fs.table(["image"]).column("image").to_pylist()
    from PIL import Image
    assert Image.open(io.BytesIO(crops[0])).size == (16, 16)  # the codebook's canonical crop
    assert "feat.efficientnet-lite0" in fs.table().column_names

    reference = tmp_path / "ref"
    extract(options(codebook, folder, reference, teachers=("efficientnet-lite0", "clip-l"), teacher_paths=checkpoints),
            log=lambda m: None)
    shutil.rmtree(folder)
    no_tokenizer(monkeypatch)
    add_teachers(options(codebook, None, kept, teachers=("clip-l",), teacher_paths=checkpoints), log=lambda m: None)
    assert FeatureSet.open(kept).columns["clip-l"]["images_from"] == "kept crops"
    assert np.array_equal(features(kept, "clip-l"), features(reference, "clip-l"))

    gone = tmp_path / "gone"
    monkeypatch.undo()
    write_image(folder / "c0" / "00.png", seed=0)
    extract(options(codebook, folder, gone), log=lambda m: None)
    write_image(folder / "c0" / "new.png", seed=99)
    with pytest.raises(JobError, match="not the source .* its records changed"):
        add_teachers(options(codebook, None, gone, teachers=("clip-l",), teacher_paths=checkpoints), log=lambda m: None)
    shutil.rmtree(folder)
    with pytest.raises(JobError, match="is gone and the set keeps no images"):
        add_teachers(options(codebook, None, gone, teachers=("clip-l",), teacher_paths=checkpoints), log=lambda m: None)


def test_a_column_whose_keys_do_not_line_up_is_refused(codebook, folder, checkpoints, tmp_path):
    out = tmp_path / "set"
    extract(options(codebook, folder, out), log=lambda m: None)
    add_teachers(options(codebook, None, out, teachers=("clip-l",), teacher_paths=checkpoints), log=lambda m: None)
    manifest_path = out / "columns" / "clip-l" / "manifest.json"
    column = json.loads(manifest_path.read_text())
    entry = column["shards"][1]
    batches = [b for _, b in read_members(out / entry["name"])]
    swapped = batches[0].take(pa.array(list(range(batches[0].num_rows))[::-1]))
    column["shards"][1] = write_shard(out / entry["name"], [swapped] + batches[1:], entry["name"])
    manifest_path.write_text(json.dumps(column))  # sizes and digests agree: only the keys are wrong
    assert len(batch_to_ipc(swapped)) > 0

    with pytest.raises(FeatureSetError, match=r"columns/clip-l/shard-000001.tar: does not line up with shards/shard-000001.tar: row 0"):
        FeatureSet.open(out).table()
    problems = FeatureSet.open(out).verify()
    assert len(problems) == 1 and "columns/clip-l/shard-000001.tar: member 00000.arrow does not line up" in problems[0]
    assert FeatureSet.open(out).table([]).num_rows == 12  # the shards alone still read


def test_cli_adds_a_teacher_then_verify_and_inspect_cover_it(codebook, folder, checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "set"
    runner = CliRunner()
    common = ["--tokenizer-path", codebook, "--teacher-resolution", str(TEACHER_RES), "--batch-size", "4",
              "--shard-size", "6", "--workers", "0", "--no-progress", "--max-reject-rate", "1"]
    first = runner.invoke(main, ["extract", str(folder), "--out", str(out), *common])
    assert first.exit_code == 0, first.output
    no_tokenizer(monkeypatch)
    added = runner.invoke(main, ["extract", "--out", str(out), "--teacher", "clip-l", "--teacher-path", checkpoints["clip-l"],
                                 "--aggregation", "cls+avgpool", *common])
    assert added.exit_code == 0, added.output
    assert "added teacher columns for 12 rows" in added.output
    ok = runner.invoke(main, ["verify", str(out)])
    assert ok.exit_code == 0 and "OK" in ok.output
    shown = runner.invoke(main, ["inspect", str(out)])
    assert "clip-l  1536-d cls+avgpool @32 px, column feat.clip-l float16 added in columns/clip-l/" in shown.output
    target = out / "columns" / "clip-l" / "shard-000000.tar"
    target.write_bytes(target.read_bytes()[:-1024])
    bad = runner.invoke(main, ["verify", str(out)])
    assert bad.exit_code == 1 and "columns/clip-l/shard-000000.tar" in bad.output


def test_a_teacher_added_to_a_jpeg_draft_set_decodes_as_its_extraction_did(codebook, checkpoints, tmp_path):
    """A set extracted with --jpeg-draft records it; adding a teacher later decodes the JPEGs reduced
    the same way, so the column equals a first extraction's. The draft changes these features (a
    640x400 JPEG decoded at 1/8), so a later decode at full size could not pass."""
    rng = np.random.default_rng(0)
    for i in range(4):
        image = rng.integers(0, 256, (400, 640, 3), dtype=np.uint8)
        folder = tmp_path / "src" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.jpg", quality=90)
    runs = {"both": ("efficientnet-lite0", "clip-l"), "set": ("efficientnet-lite0",), "full": ("efficientnet-lite0",)}
    for name, teachers in runs.items():
        extract(options(codebook, tmp_path / "src", tmp_path / name, teachers=teachers, teacher_paths=checkpoints,
                        jpeg_draft=name != "full"), log=lambda m: None)
    for name in ("set", "full"):
        add_teachers(options(codebook, None, tmp_path / name, teachers=("clip-l",), teacher_paths=checkpoints),
                     log=lambda m: None)
    assert np.array_equal(features(tmp_path / "set", "clip-l"), features(tmp_path / "both", "clip-l"))
    assert not np.allclose(features(tmp_path / "full", "clip-l"), features(tmp_path / "both", "clip-l"), atol=1e-3)
