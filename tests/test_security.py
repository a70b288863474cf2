"""Attacks on the files arra-pipe reads and the folders it deletes: each must be refused, naming the
file or folder, with nothing executed and nothing of the user's deleted."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_image
from pipeline.data.featureset import FeatureSet, FeatureSetError

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
MINI = "data/fashion-mnist-mini"


class Payload:
    """Unpickling this runs a shell command (touches `marker`)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def arra_pipe(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=600)


def train_args(fmnist, run: Path, zero: int, steps: int = 2) -> list:
    return ["train", fmnist, "--out", run, "--zero", zero, "--steps", steps, "--micro-batch", "8", "--save-every", "2",
            "--no-progress"]


@pytest.fixture(scope="module")
def fmnist(run_extract_module):
    return run_extract_module(MINI, source_options={"split": "test"}, shard_size=128, batch_size=50)


@pytest.fixture(scope="module")
def runs(fmnist, tmp_path_factory):
    """One finished two-step run per ZeRO stage that writes a different checkpoint layout."""
    out = {}
    for zero in (0, 2, 3):
        run = tmp_path_factory.mktemp(f"z{zero}") / "run"
        done = arra_pipe(*train_args(fmnist, run, zero))
        assert done.returncode == 0, done.stderr[-3000:]
        out[zero] = run
    return out


def poisoned(run: Path, tmp_path: Path, pattern: str) -> tuple[Path, Path, Path]:
    """A copy of `run` whose checkpoint file matching `pattern` is replaced by the payload;
    returns (run copy, poisoned file, marker the payload would create)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    target = next((copy / "checkpoints" / "step00000002").glob(pattern))
    marker = tmp_path / "pwned"
    torch.save({"module": {}, "step": 2, "rng": torch.get_rng_state(), "x": Payload(marker)}, target)
    return copy, target, marker


@pytest.mark.parametrize("zero,pattern", [(0, "mp_rank_00_model_states.pt"), (2, "*optim_states.pt"),
                                          (3, "*model_states.pt"), (3, "*optim_states.pt")])
def test_export_refuses_a_checkpoint_that_would_run_code(runs, tmp_path, zero, pattern):
    from stages.export import export
    run, target, marker = poisoned(runs[zero], tmp_path, pattern)
    with pytest.raises(ValueError, match=f"{target.name}: holds objects other than tensors"):
        export(str(run), str(tmp_path / "hf"))
    assert not marker.exists()


@pytest.mark.parametrize("zero,pattern", [(3, "*model_states.pt"), (3, "*optim_states.pt"),
                                          (2, "arra_state_rank0.pt")])
def test_resume_refuses_a_checkpoint_that_would_run_code(fmnist, runs, tmp_path, zero, pattern):
    run, target, marker = poisoned(runs[zero], tmp_path, pattern)
    done = arra_pipe(*train_args(fmnist, run, zero))
    assert done.returncode != 0 and f"{target}: holds objects other than tensors" in done.stderr, done.stderr[-3000:]
    assert not marker.exists()


def test_deepspeed_checkpoints_still_resume_and_export(fmnist, runs, tmp_path):
    """The allow-list holds what DeepSpeed stores (ZeRO-2 optimizer states carry its loss scaler)."""
    run = tmp_path / "run"
    shutil.copytree(runs[2], run)
    done = arra_pipe(*train_args(fmnist, run, 2, steps=3))
    assert done.returncode == 0 and "resumed from" in done.stderr + done.stdout, done.stderr[-3000:]
    done = arra_pipe("export", run, "--out", tmp_path / "hf")
    assert done.returncode == 0, done.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# extract --overwrite deletes only a set it made


@pytest.fixture
def images(tmp_path):
    for i in range(6):
        write_image(tmp_path / "src" / f"c{i % 2}" / f"{i}.png", seed=i)
    return tmp_path / "src"


def test_overwrite_refuses_a_folder_that_holds_no_set(run_extract, images, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.txt").write_text("four years of work")
    with pytest.raises(FeatureSetError, match="holds files but no arra-pipe feature set"):
        run_extract(images, out=folder, overwrite=True)
    assert (folder / "thesis.txt").read_text() == "four years of work"


@pytest.mark.parametrize("where", ["source", "parent of source", "working directory"])
def test_overwrite_refuses_the_source_and_the_working_directory(run_extract, images, tmp_path, monkeypatch, where):
    before = sorted(images.rglob("*"))
    out = {"source": images, "parent of source": images.parent, "working directory": tmp_path / "set"}[where]
    if where == "working directory":
        run_extract(images, out=out)
        monkeypatch.chdir(out)
    with pytest.raises(FeatureSetError, match="--overwrite refused: .* is or holds the (source|working directory)"):
        run_extract(images, out=out, overwrite=True)
    assert sorted(images.rglob("*")) == before


def test_overwrite_replaces_the_set_and_keeps_the_users_files(run_extract, images, tmp_path):
    _, out = run_extract(images)
    (out / "notes.md").write_text("my notes")
    (out / "stats").mkdir()
    (out / "stats" / "inception-old.npz").write_bytes(b"stale cache")
    result, _ = run_extract(images, out=out, overwrite=True, shard_size=4)
    assert result.status == "extracted" and len(FeatureSet.open(out).manifest["shards"]) == 2
    assert (out / "notes.md").read_text() == "my notes" and not (out / "stats").exists()
