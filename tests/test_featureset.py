"""The feature-set contract: readable without our code, verified, refused when stale."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
import webdataset as wds
from click.testing import CliRunner

from pipeline.data.featureset import FeatureSet
from stages.cli import main
from pipeline.data.jobs import JobError

MINI = "data/fashion-mnist-mini"


@pytest.fixture
def fmnist_set(run_extract):
    result, out = run_extract(MINI, source_options={"split": "test"}, shard_size=128, batch_size=32)
    return out


def test_plain_webdataset_and_pyarrow_read_the_same_rows(fmnist_set):
    ours = FeatureSet.open(fmnist_set).table()
    shards = sorted(str(p) for p in (fmnist_set / "shards").glob("*.tar"))
    # what a user writes with no arra-pipe installed:
    batches = [b for sample in wds.WebDataset(shards, shardshuffle=False)
               for b in pa.ipc.open_stream(io.BytesIO(sample["arrow"]))]
    plain = pa.Table.from_batches(batches)
    assert plain.num_rows == ours.num_rows == 500
    assert plain.equals(ours)
    codes = np.stack(plain.column("codes").to_numpy(zero_copy_only=False))
    assert codes.dtype == np.uint16 and codes.shape == (500, 16) and codes.max() < 64
    feats = np.stack(plain.column("feat.efficientnet-lite0").to_numpy(zero_copy_only=False))
    assert feats.dtype == np.float16 and feats.shape == (500, 1280) and np.isfinite(feats).all()
    meta = json.loads(plain.schema.metadata[b"arra_pipe"])
    assert meta == {"grid": [4, 4], "codebook_size": 64, "teacher_dims": {"efficientnet-lite0": 1280}}


def test_manifest_records_provenance(fmnist_set):
    m = FeatureSet.open(fmnist_set).manifest
    assert m["rows"] == 500 and sum(s["rows"] for s in m["shards"]) == 500 and len(m["shards"]) == 4
    assert m["tokenizer"]["grid"] == [4, 4] and len(m["tokenizer"]["weights_sha256"]) == 64
    t = m["teachers"]["efficientnet-lite0"]
    assert (t["dim"], t["aggregation"], t["input_size"]) == (1280, "avgpool", 32)
    st = m["feature_stats"]["efficientnet-lite0"]
    assert st["rows"] == 500 and st["nonfinite_rows"] == 0 and st["norm_mean"] > 0
    assert m["preprocess"]["teacher_view"] == "crop" and m["source"]["records"] == 500
    assert "torch" in m["packages"]


def test_bytes_per_row_close_to_payload(fmnist_set):
    m = FeatureSet.open(fmnist_set).manifest
    on_disk = sum(s["bytes"] for s in m["shards"])
    assert on_disk / m["payload_bytes"] < 1.05


def test_verify_catches_flipped_byte_and_truncation(fmnist_set):
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(fmnist_set)])
    assert ok.exit_code == 0 and "500 rows verified" in ok.output
    shards = sorted((fmnist_set / "shards").glob("*.tar"))
    data = bytearray(shards[1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    shards[1].write_bytes(bytes(data))
    shards[2].write_bytes(shards[2].read_bytes()[:5000])
    bad = runner.invoke(main, ["verify", str(fmnist_set)])
    assert bad.exit_code == 1
    assert f"shards/{shards[1].name}: sha256" in bad.output
    assert f"shards/{shards[2].name}: 5000 bytes on disk" in bad.output
    assert shards[0].name not in bad.output and shards[3].name not in bad.output


def test_rerun_is_a_noop_and_other_settings_are_refused(run_extract, fmnist_set):
    before = (fmnist_set / "manifest.json").read_bytes()
    result, _ = run_extract(MINI, out=fmnist_set, source_options={"split": "test"}, shard_size=128, batch_size=32)
    assert result.status == "up-to-date" and result.rows == 500
    assert (fmnist_set / "manifest.json").read_bytes() == before
    with pytest.raises(JobError, match="teacher_view"):
        run_extract(MINI, out=fmnist_set, source_options={"split": "test"}, shard_size=128, batch_size=32,
                    teacher_view="original")


def test_inspect_reports_the_set(fmnist_set):
    out = CliRunner().invoke(main, ["inspect", str(fmnist_set)])
    assert out.exit_code == 0
    assert "500 in 4 shards" in out.output and "4x4 codes, codebook 64" in out.output
    assert "efficientnet-lite0  1280-d avgpool @32 px" in out.output


def test_open_unfinished_set_says_how_to_resume(tmp_path):
    (tmp_path / "shards").mkdir()
    with pytest.raises(ValueError, match="re-run it to resume"):
        FeatureSet.open(tmp_path)


@pytest.fixture
def small_set(run_extract, tmp_path):
    """10 images in shards of 4 (4, 4, 2), the crops kept as the `image` column."""
    from conftest import write_image
    for i in range(10):
        write_image(tmp_path / "src" / f"c{i % 2}" / f"{i:02d}.png", seed=i)
    _, out = run_extract(tmp_path / "src", shard_size=4, keep_images=True)
    assert FeatureSet.open(out).verify() == []
    return out


def test_verify_reports_tars_that_no_manifest_lists(small_set):
    import shutil
    shutil.copy(small_set / "shards" / "shard-000000.tar", small_set / "shards" / "shard-000003.tar")
    shutil.copy(small_set / "columns" / "image" / "shard-000001.tar", small_set / "columns" / "image" / "extra.tar")
    assert FeatureSet.open(small_set).verify() == ["shards/shard-000003.tar: on disk but not in the manifest",
                                                   "columns/image/extra.tar: on disk but not in the manifest"]


def test_verify_counts_the_rows_of_every_tar(small_set):
    """A manifest entry whose size and sha256 still match but whose row count does not."""
    for manifest in (small_set / "manifest.json", small_set / "columns" / "image" / "manifest.json"):
        m = json.loads(manifest.read_text())
        m["shards"][2]["rows"] = 3
        manifest.write_text(json.dumps(m))
    assert FeatureSet.open(small_set).verify() == ["shards/shard-000002.tar: 2 rows, manifest says 3",
                                                   "columns/image/shard-000002.tar: 2 rows, manifest says 3"]
