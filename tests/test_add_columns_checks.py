"""Adding a teacher reads the set as every reader does: a damaged shard or kept-crops tar is refused
by file name before any column is computed, so is a source whose image files changed, and a key
held by a later record (its first one could not be decoded) gets that record's features."""

from __future__ import annotations

import os

import numpy as np
import pytest

import model_checkpoints as mc
from conftest import TEACHER_RES, write_image
from pipeline.data.featureset import FeatureSet, FeatureSetError
from pipeline.data.sources import SourceOptions
from pipeline.data.jobs import JobError
from stages.add_columns import add_teachers
from stages.extract import extract
from stages.options import ExtractOptions


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    return {"dinov2-s": str(mc.write_dinov2(tmp_path_factory.mktemp("ckpt") / "dino", 384))}


@pytest.fixture
def table(tmp_path):
    """A CSV of 7 rows; key k's first image cannot be decoded, so its second row holds k."""
    src = tmp_path / "src"
    for i in range(6):
        write_image(src / f"{i}.png", size=(24 + i, 20), seed=i)
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    rows = ["k,broken.png", "a,0.png", "k,1.png", "b,2.png", "c,3.png", "k,4.png", "d,5.png"]
    (src / "t.csv").write_text("id,image,caption\n" + "".join(f"{r},row {i}\n" for i, r in enumerate(rows)))
    return src / "t.csv"


def options(codebook, source, out, **kw):
    opts = dict(source=source and str(source), out=str(out), tokenizer_path=codebook, teacher_resolution=TEACHER_RES,
                batch_size=2, workers=0, shard_size=3, progress=False, max_reject_rate=1.0,
                source_options=SourceOptions(key_column="id"))
    return ExtractOptions(**{**opts, **kw})


def add(codebook, out, dino):
    return add_teachers(options(codebook, None, out, teachers=("dinov2-s",), teacher_paths=dino), log=lambda m: None)


def flip_byte(path, at=600):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged", ["shards/shard-000001.tar", "columns/image/shard-000001.tar"])
def test_a_damaged_base_is_refused_by_file_name_before_any_column_is_written(codebook, table, dino, tmp_path, damaged):
    out = tmp_path / "set"
    extract(options(codebook, table, out, keep_images=True), log=lambda m: None)
    flip_byte(out / damaged)

    with pytest.raises(FeatureSetError, match=rf"{out}/{damaged}: sha256 .* differs from the manifest's .*arra-pipe verify"):
        add(codebook, out, dino)
    assert not list((out / "columns" / "dinov2-s").glob("*.tar"))
    assert "dinov2-s" not in FeatureSet.open(out).columns


def test_a_source_whose_image_files_changed_is_refused(codebook, table, dino, tmp_path):
    out = tmp_path / "set"
    extract(options(codebook, table, out), log=lambda m: None)
    image = table.parent / "3.png"
    write_image(image, size=(27, 20), seed=42)  # other pixels, the same records
    os.utime(image, ns=(0, 10**18))

    with pytest.raises(JobError, match=r"its image files .* changed \(source.files_fingerprint"):
        add(codebook, out, dino)
    assert "dinov2-s" not in FeatureSet.open(out).columns


def test_an_added_column_has_the_features_of_the_record_that_holds_each_key(codebook, table, dino, tmp_path):
    both, out = tmp_path / "both", tmp_path / "set"
    extract(options(codebook, table, both, teachers=("efficientnet-lite0", "dinov2-s"), teacher_paths=dino),
            log=lambda m: None)
    extract(options(codebook, table, out), log=lambda m: None)

    result = add(codebook, out, dino)

    fs = FeatureSet.open(out)
    assert result.status == "added" and fs.verify() == []
    assert fs.table().column("key").to_pylist() == ["a", "k", "b", "c", "d"]
    assert [r["origin"] for r in fs.rejects()] == ["t.csv row 1", "t.csv row 6"]
    feats = [np.stack(FeatureSet.open(p).table().column("feat.dinov2-s").to_numpy(zero_copy_only=False)) for p in (out, both)]
    assert np.array_equal(*feats)


def test_a_teacher_giving_non_finite_features_is_not_added(codebook, table, dino, tmp_path, monkeypatch):
    """A shard's rows are fixed once extracted, so a row the new teacher gives NaN for cannot become
    a reject: the column is refused naming the row, and nothing of it is marked done."""
    import torch
    from pipeline.models.teachers import Teacher
    out = tmp_path / "set"
    extract(options(codebook, table, out), log=lambda m: None)
    forward = Teacher.forward

    def poisoned(self, images):
        features = forward(self, images)
        return torch.where(torch.arange(len(images))[:, None] == 0, torch.nan, features) if self.name == "dinov2-s" else features
    monkeypatch.setattr(Teacher, "forward", poisoned)

    with pytest.raises(JobError, match=r"teacher dinov2-s gave non-finite features .* rows of shards/shard-00000\d.tar, "
                                           r"e\.g\. \['\w'\]; .* not added"):
        add(codebook, out, dino)
    assert "dinov2-s" not in FeatureSet.open(out).columns
    assert not list((out / "columns" / "dinov2-s" / "progress").glob("shard-*.json"))
