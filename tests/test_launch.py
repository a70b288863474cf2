"""How `train` starts its ranks: the launcher command it builds for CPU, one node of GPUs and a
hostfile, and the flags that decide it. The launchers themselves run in tests/test_train.py."""

from __future__ import annotations

import os
import sys

import pytest
from click.testing import CliRunner

import stages.train as train_stage
from stages.cli import main
from stages.train import TrainError, launch_command


def test_one_process_or_an_existing_rank_trains_in_process():
    assert launch_command(1, None, "torchrun", ["train"], env={}) is None
    # a rank started by a launcher on another node: the hostfile is not looked for there
    assert launch_command(8, "/nowhere/hostfile", "deepspeed", ["train"], env={"WORLD_SIZE": "16"}) is None


def test_launchers_run_from_this_interpreter_on_a_free_port():
    torchrun = launch_command(2, None, "torchrun", ["train", "x"], env={})
    assert torchrun[:3] == [sys.executable, "-m", "torch.distributed.run"] and torchrun[-3:] == ["stages.cli", "train", "x"]
    ds = launch_command(4, None, "deepspeed", ["train", "x"], env={})
    assert ds[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert ds[ds.index("--num_gpus") + 1] == "4" and ds[-4:] == ["--module", "stages.cli", "train", "x"]
    ports = {launch_command(4, None, "deepspeed", [], env={})[4] for _ in range(3)}
    assert "29500" not in ports and all(p.isdigit() for p in ports)
    assert launch_command(4, None, "deepspeed", [], env={"MASTER_PORT": "6000"})[4] == "6000"


def test_cuda_visible_devices_are_the_ranks_devices():
    cmd = launch_command(2, None, "deepspeed", [], env={"CUDA_VISIBLE_DEVICES": "2, 5,7"})
    assert cmd[cmd.index("--include") + 1] == "localhost:2,5" and "--num_gpus" not in cmd
    with pytest.raises(TrainError, match="4 ranks asked for but CUDA_VISIBLE_DEVICES=3 shows 1 GPUs"):
        launch_command(4, None, "deepspeed", [], env={"CUDA_VISIBLE_DEVICES": "3"})


def test_hostfile_is_checked_once_by_the_launching_process(tmp_path):
    with pytest.raises(TrainError, match="--hostfile .*missing: no such file"):
        launch_command(1, str(tmp_path / "missing"), "deepspeed", [], env={})
    with pytest.raises(TrainError, match="--launcher deepspeed, not torchrun"):
        launch_command(1, str(tmp_path / "missing"), "torchrun", [], env={})
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=8\nnode2 slots=8\n")
    cmd = launch_command(1, str(hosts), "deepspeed", [], env={})
    assert cmd[cmd.index("--hostfile") + 1] == str(hosts) and "--num_gpus" not in cmd


@pytest.fixture
def launched(monkeypatch):
    """Record what `arra-pipe train` would launch instead of launching it."""
    calls = []
    monkeypatch.setattr(train_stage, "run_launcher", lambda cmd, device: calls.append((cmd, device)) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return calls


def test_gpus_means_cuda_ranks_started_by_deepspeed(launched, tmp_path):
    result = CliRunner().invoke(main, ["train", str(tmp_path), "--out", str(tmp_path / "r"), "--gpus", "8"])
    assert result.exit_code == 0, result.output
    (cmd, device), = launched
    assert device == "cuda" and cmd[2] == "deepspeed.launcher.runner" and cmd[cmd.index("--num_gpus") + 1] == "8"


def test_gpus_on_the_cpu_is_refused(launched, tmp_path):
    result = CliRunner().invoke(main, ["train", str(tmp_path), "--out", str(tmp_path / "r"), "--gpus", "2",
                                       "--device", "cpu"])
    assert result.exit_code == 2 and "--gpus trains on GPUs" in result.output and not launched


def test_the_deepspeed_launchers_local_rank_flag_is_accepted(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    result = CliRunner().invoke(main, ["--local_rank=3", "models"])
    assert result.exit_code == 0, result.output
    assert os.environ.pop("LOCAL_RANK") == "3"
