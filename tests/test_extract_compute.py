"""Where and at what precision codes and features were computed is part of a set's identity: a
resume on another device is refused rather than mixing bf16 and fp32 rows. The shard writer runs
on its own thread and names the shard it failed on; decode workers default to this rank's CPUs."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch

import model_checkpoints as mc
from conftest import TEACHER_RES, write_image
from pipeline import __version__
from pipeline.data.crops import decode_workers
from pipeline.models.frozen import FrozenModel
from pipeline.models.image_tokenizers import save_kmeans_codebook
from pipeline.models.registry import build
from stages import add_columns, extract as extract_stage
from pipeline.data.jobs import JobError, LATER_FIELDS
from stages.add_columns import add_teachers
from stages.extract import extract
from stages.options import ExtractOptions

CPU = {"device": "cpu", "model_batch": 2, "tokenizer": "fp32", "teachers": {"efficientnet-lite0": "fp32"}}
CUDA = {"device": "cuda", "tokenizer": "fp32", "teachers": {"efficientnet-lite0": "bf16-autocast"}}  # what a CUDA run records


@pytest.fixture
def folder(tmp_path):
    for i in range(10):
        write_image(tmp_path / "src" / f"c{i % 2}" / f"{i:02d}.png", size=(20 + i, 20), seed=i)
    return tmp_path / "src"


def options(codebook, folder, out, **kw):
    return ExtractOptions(**{**dict(source=str(folder), out=str(out), tokenizer_path=codebook, teacher_resolution=TEACHER_RES,
                                    batch_size=2, workers=0, shard_size=4, progress=False), **kw})


def fail_on_call(monkeypatch, module, n: int):
    """Make the `n`-th `write_shard` call of `module` fail as a full disk would."""
    calls, real = [], module.write_shard

    def write_shard(path, *args):
        calls.append(path)
        if len(calls) == n:
            raise OSError(28, "No space left on device")
        return real(path, *args)
    monkeypatch.setattr(module, "write_shard", write_shard)


def rewrite_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_precision_follows_the_rule_that_decides_autocast(codebook, monkeypatch):
    teacher = build("teachers", "efficientnet-lite0", None, input_size=TEACHER_RES)
    tokenizer = build("tokenizers", "kmeans", codebook)
    assert (teacher.precision, tokenizer.precision) == ("fp32", "fp32")
    assert not isinstance(teacher.autocast(), torch.autocast)
    monkeypatch.setattr(FrozenModel, "device", property(lambda self: torch.device("cuda")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: autocast is built, then disabled with a warning
        assert teacher.precision == "bf16-autocast" and isinstance(teacher.autocast(), torch.autocast)
    assert tokenizer.precision == "fp32"  # the kmeans search never autocasts


def test_a_resume_on_another_device_is_refused_and_the_manifest_records_the_compute(codebook, folder, tmp_path, monkeypatch):
    out = tmp_path / "set"
    fail_on_call(monkeypatch, extract_stage, 2)
    with pytest.raises(JobError, match=r"writing shard-000001 failed: OSError: .*No space left") as failed:
        extract(options(codebook, folder, out), log=lambda m: None)
    assert isinstance(failed.value.__cause__, OSError)
    assert sorted(p.name for p in (out / "progress").glob("shard-*")) == ["shard-000000.json"]
    job = out / "progress" / "job.json"
    assert json.loads(job.read_text())["compute"] == CPU
    monkeypatch.undo()

    rewrite_json(job, compute=CUDA)  # the interrupted run was on a GPU
    with pytest.raises(JobError, match="different extraction") as refused:
        extract(options(codebook, folder, out), log=lambda m: None)
    assert "compute.device: was 'cuda', now 'cpu'" in str(refused.value)
    assert "compute.teachers.efficientnet-lite0: was 'bf16-autocast', now 'fp32'" in str(refused.value)
    assert sorted(p.name for p in (out / "progress").glob("shard-*")) == ["shard-000000.json"]

    rewrite_json(job, compute=CPU)
    log = []
    result = extract(options(codebook, folder, out), log=log.append)
    assert result.status == "extracted" and result.rows == 10
    assert json.loads((out / "manifest.json").read_text())["compute"] == CPU
    assert "resuming: 4 of 10 records are in finished shards" in log


def test_a_set_made_before_the_later_fields_is_still_up_to_date(codebook, folder, tmp_path):
    out = tmp_path / "set"
    extract(options(codebook, folder, out), log=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["compute"], manifest["preprocess"]["max_side"], manifest["preprocess"]["jpeg_draft"]
    del manifest["source"]["options"]["follow_symlinks"], manifest["source"]["options"]["max_file_bytes"]
    del manifest["source"]["files_fingerprint"]
    (out / "manifest.json").write_text(json.dumps(manifest))  # as an older arra-pipe wrote it

    log = []
    assert extract(options(codebook, folder, out), log=log.append).status == "up-to-date"
    assert log == [f"{out} was made by arra-pipe {__version__}, which did not record "
                   f"{', '.join(f for f in LATER_FIELDS if not f.startswith('compute.'))}; compared on the rest"]
    with pytest.raises(JobError, match="teacher_view"):  # what it did record is still compared
        extract(options(codebook, folder, out, teacher_view="original"), log=lambda m: None)
    manifest["compute"] = CUDA
    (out / "manifest.json").write_text(json.dumps(manifest))  # a recorded compute is compared
    with pytest.raises(JobError, match="compute.device: was 'cuda', now 'cpu'"):
        extract(options(codebook, folder, out), log=lambda m: None)


def test_a_set_is_still_up_to_date_when_its_codebook_has_moved_but_not_when_its_bytes_differ(codebook, folder, tmp_path):
    out, moved = tmp_path / "set", tmp_path / "elsewhere" / "codebook.safetensors"
    extract(options(codebook, folder, out), log=lambda m: None)
    moved.parent.mkdir()
    shutil.copyfile(codebook, moved)
    assert extract(options(str(moved), folder, out), log=lambda m: None).status == "up-to-date"

    other = tmp_path / "other.safetensors"
    save_kmeans_codebook(other, np.random.default_rng(1).random((64, 48), dtype=np.float32), patch=4, resolution=16)
    with pytest.raises(JobError, match="tokenizer.weights_sha256: was") as refused:
        extract(options(str(other), folder, out), log=lambda m: None)
    assert "weights_path" not in str(refused.value)


def test_an_older_unfinished_job_is_not_resumed(codebook, folder, tmp_path, monkeypatch):
    out = tmp_path / "set"
    fail_on_call(monkeypatch, extract_stage, 2)
    with pytest.raises(JobError):
        extract(options(codebook, folder, out), log=lambda m: None)
    monkeypatch.undo()
    job = json.loads((out / "progress" / "job.json").read_text())
    del job["compute"]
    (out / "progress" / "job.json").write_text(json.dumps(job))
    with pytest.raises(JobError, match="compute: was None"):
        extract(options(codebook, folder, out), log=lambda m: None)


def test_a_column_records_its_own_compute_and_its_resume_elsewhere_is_refused(codebook, folder, tmp_path, monkeypatch):
    out, dino = tmp_path / "set", str(mc.write_dinov2(tmp_path / "dino", 384))
    extract(options(codebook, folder, out), log=lambda m: None)
    add = options(codebook, folder, out, teachers=("dinov2-s",), teacher_paths={"dinov2-s": dino})
    fail_on_call(monkeypatch, add_columns, 2)
    with pytest.raises(JobError, match="writing the columns of shards/shard-000001.tar failed: OSError"):
        add_teachers(add, log=lambda m: None)
    monkeypatch.undo()
    job = out / "columns" / "dinov2-s" / "progress" / "job.json"
    rewrite_json(job, compute={"device": "cuda", "teacher": "bf16-autocast"})
    with pytest.raises(JobError, match="being added with other settings") as refused:
        add_teachers(add, log=lambda m: None)
    assert "compute.teacher: was 'bf16-autocast', now 'fp32'" in str(refused.value)

    rewrite_json(job, compute={"device": "cpu", "teacher": "fp32"})
    assert add_teachers(add, log=lambda m: None).status == "added"
    column = json.loads((out / "columns" / "dinov2-s" / "manifest.json").read_text())
    assert column["compute"] == {"device": "cpu", "teacher": "fp32"}
    del column["compute"]  # a column added by an older arra-pipe
    (out / "columns" / "dinov2-s" / "manifest.json").write_text(json.dumps(column))
    assert add_teachers(add, log=lambda m: None).status == "up-to-date"


def test_decode_workers_default_to_this_ranks_cpus_less_one(codebook, folder, tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert decode_workers(None) == 15 and decode_workers(2) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert decode_workers(None) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert decode_workers(None) == 0 and decode_workers(5) == 5
    log = []
    extract(options(codebook, folder, tmp_path / "set", workers=None), log=log.append)
    assert "0 decode workers and 1 model threads per rank" in log[0]
