"""Damaged feature sets and changed sources are refused by name, never read as data: a flipped
byte, a truncated or missing shard, an edited or damaged manifest, non-finite teacher features
(train, eval, audit); a missing rejects.jsonl (verify); an image changed between an interrupted
extraction and its resume. A shard found damaged mid-run stops training before any of its rows is
used, and the run resumes exactly once the set is repaired."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from conftest import TEACHER_RES, write_image
from pipeline.data.featureset import FeatureSet, FeatureSetError, fixed_list, read_members, write_shard
from pipeline.data.train_data import TrainStream
from pipeline.lm.vocab import VocabLayout
from stages import extract as extract_stage
from stages.audit import dedup
from stages.cli import main
from pipeline.data.set_images import reference_images
from stages.evaluate import evaluate
from pipeline.data.jobs import JobError
from stages.extract import extract
from stages.options import ExtractOptions

MINI = "data/fashion-mnist-mini"
TEACHER = "feat.efficientnet-lite0"
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
LAYOUT = VocabLayout("class", 11, 64, (4, 4), {})


@pytest.fixture
def in_process(monkeypatch):
    """`train` in this process on the CPU; the rank variables it sets are removed afterwards."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def pristine(run_extract_module):
    """500 Fashion-MNIST rows in 4 shards of 128 (the last 116)."""
    return run_extract_module(MINI, source_options={"split": "test"}, shard_size=128, batch_size=50)


@pytest.fixture
def fmnist(pristine, tmp_path):
    """A copy of the set for one test to damage."""
    return shutil.copytree(pristine, tmp_path / "set")


def shard(path, index: int):
    return path / FeatureSet.open(path).manifest["shards"][index]["name"]


def flip_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def edit_manifest(path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def first_batch(path):
    """What training reads first (with the default buffer: every shard, before step 1)."""
    return next(TrainStream([FeatureSet.open(path)], "efficientnet-lite0", LAYOUT, 8).epoch(0))


def refusals(path, tmp_path) -> dict[str, str]:
    """The error of each reader of a feature set (training's stream, eval, audit): all refuse."""
    errors = {}
    readers = {"train": lambda: first_batch(path),
               "eval": lambda: evaluate(str(tmp_path), str(path), fid=False),
               "audit": lambda: dedup(str(path), str(tmp_path / "audit"), log=lambda m: None)}
    for name, read in readers.items():
        with pytest.raises(FeatureSetError) as refused:
            read()
        errors[name] = str(refused.value)
    return errors


def test_a_flipped_byte_is_refused_by_every_reader_naming_the_shard(fmnist, tmp_path):
    bad = shard(fmnist, 1)
    flip_byte(bad)
    for reader, error in refusals(fmnist, tmp_path).items():
        assert error.startswith(f"{bad}: sha256 ") and f"`arra-pipe verify {fmnist}`" in error, (reader, error)
        assert "re-extract" in error and "\n" not in error


def test_train_refuses_a_flipped_byte_before_its_first_step(fmnist, tmp_path):
    bad = shard(fmnist, 2)
    flip_byte(bad)
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "stages.cli", "train", str(fmnist), "--out", str(run), "--steps", "5",
                           "--micro-batch", "8", "--save-every", "1", "--no-progress"],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith(f"Error: {bad}: sha256 "), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


MID_RUN = """
import sys
from pipeline.data.featureset import FeatureSet
from stages.train import TrainOptions, train
read, real = [], FeatureSet.shard_batches

def damage_the_nth_read(self, index, columns=None):  # the disk goes bad under a running job
    read.append(index)
    if len(read) == int(sys.argv[3]):
        path = self.path / self.manifest["shards"][index]["name"]
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
    return real(self, index, columns)
FeatureSet.shard_batches = damage_the_nth_read
train(TrainOptions(sets=[sys.argv[1]], run=sys.argv[2], steps=50, save_every=10, micro_batch=8, shuffle_buffer=8,
                   lr=3e-3, progress=False))
"""


def test_a_shard_damaged_mid_run_stops_training_before_its_rows_and_the_repaired_set_resumes(fmnist, pristine, tmp_path):
    run = tmp_path / "run"

    def train(damaged_read: int):
        return subprocess.run([sys.executable, "-c", MID_RUN, str(fmnist), str(run), str(damaged_read)],
                              capture_output=True, text=True, env=ENV, timeout=600)

    def losses():
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    interrupted = train(4)  # 4 shards: 384 rows (48 steps) are read before the last one
    bad = re.search(r"FeatureSetError: (\S+): sha256 ", interrupted.stderr)
    assert interrupted.returncode == 1 and bad, interrupted.stderr[-3000:]
    before = losses()
    assert 40 <= len(before) <= 48  # the steps of the 3 intact shards' rows, less what the shuffle buffer held
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step00000030", "step00000040"]

    damaged = bad.group(1)
    shutil.copy(pristine / os.path.relpath(damaged, fmnist), damaged)  # repaired: re-extraction writes the same bytes
    resumed = train(0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = losses()
    assert len(after) == 50 and after[:40] == before[:40] and np.isfinite(after).all()
    assert "resumed from" in resumed.stdout and "at step 40" in resumed.stdout


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_truncated_or_missing_shard_is_one_line_before_the_model_is_built(fmnist, tmp_path, monkeypatch, in_process, damage):
    import stages.train as train_stage
    from stages.train import TrainOptions, train
    bad = shard(fmnist, 3)
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:5000])
    else:
        bad.unlink()
    problem = "5000 bytes on disk, manifest says" if damage == "truncated" else "missing"
    built = []
    monkeypatch.setattr(train_stage, "build_from_preset", lambda *a, **k: built.append(a))
    with pytest.raises(FeatureSetError) as refused:
        train(TrainOptions(sets=[str(fmnist)], run=str(tmp_path / "run"), progress=False))
    assert not built
    errors = {"train": str(refused.value), **refusals(fmnist, tmp_path)}
    for reader, error in errors.items():
        assert error.startswith(f"{bad}: {problem}") and f"`arra-pipe verify {fmnist}`" in error, (reader, error)
        assert "\n" not in error
    for command in (["eval", "--generated", str(tmp_path), "--reference", str(fmnist), "--no-fid"],
                    ["audit", "dedup", str(fmnist), "--out", str(tmp_path / "audit")]):
        out = CliRunner().invoke(main, command)
        assert out.exit_code == 1 and out.output.splitlines() == [f"Error: {errors['eval']}"], out.output


def test_edited_row_counts_are_refused_naming_the_shard(fmnist, tmp_path):
    def add_rows(m):
        m["shards"][2]["rows"] += 100
        m["rows"] += 100
    edit_manifest(fmnist, add_rows)
    for reader, error in refusals(fmnist, tmp_path).items():
        assert error.startswith(f"{shard(fmnist, 2)}: 128 rows, manifest says 228"), (reader, error)


def test_a_teacher_width_that_the_shards_do_not_have_is_refused_naming_the_shard(fmnist, tmp_path):
    edit_manifest(fmnist, lambda m: m["teachers"]["efficientnet-lite0"].update(dim=512))
    for reader, error in refusals(fmnist, tmp_path).items():
        assert re.match(rf"{re.escape(str(fmnist))}/shards/shard-\d{{6}}\.tar: schema differs from the manifest: ", error)
        assert "fixed_size_list<item: halffloat>[1280]" in error and "[512]" in error, (reader, error)


def test_non_finite_teacher_features_are_refused_naming_the_row(fmnist, tmp_path):
    """Rows as an overflowing teacher writes them: the shard's bytes match its manifest entry."""
    path = shard(fmnist, 1)
    batches = [b for _, b in read_members(path)]
    x = batches[2].column(TEACHER).flatten().to_numpy().reshape(batches[2].num_rows, -1).copy()
    x[7, 3] = np.inf
    at = batches[2].schema.get_field_index(TEACHER)
    batches[2] = pa.RecordBatch.from_arrays([fixed_list(x, pa.float16()) if i == at else c
                                             for i, c in enumerate(batches[2].columns)], schema=batches[2].schema)
    entry = write_shard(path, batches)
    edit_manifest(fmnist, lambda m: m["shards"].__setitem__(1, entry))
    key = batches[2].column("key")[7].as_py()
    for reader, error in refusals(fmnist, tmp_path).items():
        assert error.startswith(f"{path}: 1 rows have non-finite {TEACHER} values, e.g. [{key!r}]"), (reader, error)
    assert FeatureSet.open(fmnist).verify() == [f"shards/{path.name}: 1 rows have non-finite {TEACHER} values, e.g. [{key!r}]"]


def test_a_manifest_without_a_key_or_truncated_is_named(fmnist, tmp_path, monkeypatch, in_process):
    import stages.train as train_stage
    from stages.train import TrainOptions, train
    monkeypatch.setattr(train_stage, "build_from_preset", lambda *a, **k: None)
    edit_manifest(fmnist, lambda m: m["tokenizer"].pop("codebook_size"))
    with pytest.raises(FeatureSetError, match=f"^{re.escape(str(fmnist / 'manifest.json'))}: no key 'tokenizer.codebook_size'; "):
        train(TrainOptions(sets=[str(fmnist)], run=str(tmp_path / "run"), progress=False))
    edit_manifest(fmnist, lambda m: (m["tokenizer"].update(codebook_size=64), m["shards"][1].pop("sha256")))
    assert FeatureSet.open(fmnist).verify()[0].startswith(f"{fmnist / 'manifest.json'}: no key 'shards[1].sha256'; ")

    manifest = fmnist / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:300])
    for command in (["verify", str(fmnist)], ["inspect", str(fmnist)], ["train", str(fmnist), "--out", str(tmp_path / "r")]):
        out = CliRunner().invoke(main, command)
        assert out.exit_code == 1, out.output
        assert out.output.startswith(f"Error: {manifest}: not a readable manifest (") and out.output.count("\n") == 1


def test_verify_reports_a_deleted_rejects_file(fmnist):
    assert FeatureSet.open(fmnist).verify() == []
    (fmnist / "rejects.jsonl").unlink()
    assert FeatureSet.open(fmnist).verify() == ["rejects.jsonl: missing (the manifest counts 0 rejects)"]
    (fmnist / "rejects.jsonl").write_text('{"key": "x", "origin": "x", "reason": "corrupt: x"}\n')
    assert FeatureSet.open(fmnist).verify() == ["rejects.jsonl: 1 rejects, manifest says 0"]


# ---------------------------------------------------------------------------------------------
# the source changed under an extraction


def change_pixels(path, seed: int) -> None:
    """New pixels in the same file, written a second later as an editor would."""
    before = path.stat().st_mtime_ns
    write_image(path, seed=seed)
    os.utime(path, ns=(before + 10 ** 9, before + 10 ** 9))


def test_an_image_changed_between_an_interrupted_run_and_its_resume_is_refused(codebook, tmp_path, monkeypatch):
    for i in range(10):
        write_image(tmp_path / "src" / f"c{i % 2}" / f"{i:02d}.png", seed=i)
    image, out = tmp_path / "src" / "c1" / "07.png", tmp_path / "set"
    opts = ExtractOptions(source=str(tmp_path / "src"), out=str(out), tokenizer_path=codebook,
                          teacher_resolution=TEACHER_RES, batch_size=2, workers=0, shard_size=4, progress=False)
    writes, real = [], extract_stage.write_shard

    def interrupted(path, *args):  # the second shard never gets written
        writes.append(path)
        if len(writes) == 2:
            raise OSError(28, "No space left on device")
        return real(path, *args)
    monkeypatch.setattr(extract_stage, "write_shard", interrupted)
    with pytest.raises(JobError):
        extract(opts, log=lambda m: None)
    monkeypatch.setattr(extract_stage, "write_shard", real)

    original, stat = image.read_bytes(), image.stat()
    change_pixels(image, seed=99)
    with pytest.raises(JobError, match=r"source.files_fingerprint: was '[0-9a-f]{64}', now '[0-9a-f]{64}'"):
        extract(opts, log=lambda m: None)
    image.write_bytes(original)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert extract(opts, log=lambda m: None).status == "extracted"  # the very file it began with: resumed

    change_pixels(image, seed=98)
    with pytest.raises(JobError, match="source.files_fingerprint: was"):  # a finished set is no longer up to date
        extract(opts, log=lambda m: None)
    _, origin = reference_images(FeatureSet.open(out), None, limit=2, workers=0)  # eval does not take the new pixels either
    assert origin == "tokenizer reconstructions (source unavailable: the source changed since extraction)"

    edit_manifest(out, lambda m: m["source"].pop("files_fingerprint"))  # as arra-pipe wrote it before recording it
    log = []
    assert extract(opts, log=log.append).status == "up-to-date"
    assert "did not record source.files_fingerprint; compared on the rest" in log[0]
    assert reference_images(FeatureSet.open(out), None, limit=2, workers=0)[1] == "source images"
