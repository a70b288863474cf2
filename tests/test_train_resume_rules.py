"""What a resume may and may not change, which checkpoint it resumes from, and one trainer per run
folder: each refusal comes before anything in the run folder is touched."""

from __future__ import annotations

import json
import os

import pytest
import torch

import stages.train as train_stage
from pipeline.data.lock import FolderLock, LockedError
from stages.train import COMPLETE, TrainError, TrainOptions, rank_state, resume_tag, train


@pytest.fixture
def fmnist(run_extract):
    return run_extract("data/fashion-mnist-mini", source_options={"split": "test"}, shard_size=128, batch_size=50)[1]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model would be built."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    built = []
    monkeypatch.setattr(train_stage, "build_from_preset", lambda *a, **k: built.append(a))
    return built


def test_a_resume_with_settings_that_change_the_run_is_refused_naming_them(fmnist, tmp_path, no_model):
    run = tmp_path / "run"
    run.mkdir()
    recorded = TrainOptions(sets=[str(fmnist)], run=str(run), micro_batch=8, seed=3, lam=1.0, steps=20)
    record = {"options": json.loads(json.dumps(train_stage.asdict(recorded)))}
    (run / "train_config.json").write_text(json.dumps(record))
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(TrainError) as err:
        train(TrainOptions(sets=[str(fmnist)], run=str(run), micro_batch=4, seed=3, lam=0.5, steps=40, progress=False))
    assert "--lambda: was 1.0, now 0.5" in str(err.value) and "--micro-batch: was 8, now 4" in str(err.value)
    assert "--steps: was" not in str(err.value) and "--seed: was" not in str(err.value)
    assert sorted(p.name for p in run.iterdir()) == before and not no_model  # nothing touched, no model built
    assert json.loads((run / "train_config.json").read_text()) == record


def test_a_second_trainer_on_a_run_folder_is_refused(fmnist, tmp_path, no_model):
    with FolderLock(tmp_path / "run"):
        with pytest.raises(LockedError, match=f"run is being written by pid {os.getpid()}"):
            train(TrainOptions(sets=[str(fmnist)], run=str(tmp_path / "run"), progress=False))
    assert not no_model


def checkpoint(ckpt, step, complete):
    (ckpt / f"step{step:08d}").mkdir(parents=True)
    torch.save(rank_state(step, 1, torch.device("cpu")), ckpt / f"step{step:08d}" / "arra_state_rank0.pt")
    if complete:
        (ckpt / f"step{step:08d}" / COMPLETE).write_text("{}")


def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoints"
    checkpoint(ckpt, 10, complete=True)
    checkpoint(ckpt, 20, complete=False)  # a rank was still writing when the job stopped
    (ckpt / "latest").write_text("step00000020")
    said = []
    assert resume_tag(ckpt, 1, said.append) == "step00000010"
    assert "`latest` names step00000020, which not every rank finished writing; resuming from step00000010" in said[0]
    (ckpt / "latest").write_text("")
    assert resume_tag(ckpt, 1, said.append) == "step00000010"


def test_checkpoints_without_a_complete_one_or_a_latest_are_refused(tmp_path):
    ckpt = tmp_path / "checkpoints"
    checkpoint(ckpt, 10, complete=False)
    (ckpt / "latest").write_text("")
    with pytest.raises(TrainError, match="no checkpoint is complete and `latest` names none"):
        resume_tag(ckpt, 1)
    (ckpt / "latest").write_text("step00000030")
    with pytest.raises(TrainError, match="step00000030: not a complete checkpoint"):
        resume_tag(ckpt, 1)


def test_a_run_recorded_before_the_rep_token_existed_still_resumes(tmp_path):
    from dataclasses import replace

    from pipeline.lm.vocab import VocabLayout
    layout = VocabLayout("class", 11, 64, (4, 4), {"name": "kmeans"})
    old = {k: v for k, v in layout.to_dict().items() if k != "rep"}  # as the previous version wrote it
    (tmp_path / "train_config.json").write_text(json.dumps({"layout": old, "model": "tiny"}))
    train_stage._same_run(tmp_path, {"layout": layout.to_dict(), "model": "tiny"})
    with pytest.raises(TrainError, match="holds a run with layout"):
        train_stage._same_run(tmp_path, {"layout": replace(layout, rep=True).to_dict(), "model": "tiny"})
