"""Kill -9 at any point and re-run: same rows, byte for byte. Two ranks: same set as one rank."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.data.featureset import FeatureSet

MINI = "data/fashion-mnist-mini"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # every run one thread per process, as torchrun's ranks: the same float rounding


def cli_args(codebook: str, out: Path) -> list[str]:
    return ["extract", MINI, "--split", "test", "--out", str(out), "--tokenizer-path", codebook,
            "--teacher-resolution", "32", "--batch-size", "10", "--shard-size", "50", "--workers", "1", "--no-progress"]


def arra_pipe(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.cli", *args], capture_output=True, text=True, env=ENV, **kw)


def shard_digests(path: Path) -> list[tuple[str, int, str]]:
    return [(s["name"], s["rows"], s["sha256"]) for s in FeatureSet.open(path).manifest["shards"]]


@pytest.fixture(scope="module")
def reference(codebook, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "set"
    done = arra_pipe(*cli_args(codebook, out))
    assert done.returncode == 0, done.stderr
    return out


def test_kill_minus_9_then_resume_gives_identical_rows(codebook, reference, tmp_path):
    out = tmp_path / "set"
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", *cli_args(codebook, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "progress").glob("shard-*.json"))) < 3:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list((out / "progress").glob("shard-*.json")))
    assert 3 <= finished < 10 and not (out / "manifest.json").exists(), "the kill must land mid-job"
    # also leave the debris of a kill between writing a shard and recording it
    (out / "progress" / "shard-000000.json").unlink()
    (out / "shards" / ".shard-000004.tar.tmp-99999").write_bytes(b"partial")

    resumed = arra_pipe(*cli_args(codebook, out))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: 100 of 500 records" in resumed.stderr or f"resuming: {(finished - 1) * 50} of 500" in resumed.stderr
    assert shard_digests(out) == shard_digests(reference)
    assert FeatureSet.open(out).table().equals(FeatureSet.open(reference).table())
    assert not list((out / "shards").glob(".*tmp*"))

    again = arra_pipe(*cli_args(codebook, out))
    assert again.returncode == 0 and "nothing to do" in again.stdout


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_two_ranks_under_torchrun_make_the_same_set(codebook, reference, tmp_path):
    out = tmp_path / "set"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    run = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "stages.cli",
                          *cli_args(codebook, out)], capture_output=True, text=True, timeout=300, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    m = FeatureSet.open(out).manifest
    assert m["rows"] == 500 and [s["name"] for s in m["shards"]] == [f"shards/shard-{i:06d}.tar" for i in range(10)]
    assert shard_digests(out) == shard_digests(reference)  # the same bytes, features included
    assert FeatureSet.open(out).table().equals(FeatureSet.open(reference).table())
