"""Faults a running job meets: a killed launcher must take its ranks with it; a full disk stops a
job with one clear error, marks nothing done that is not complete, and a resume finishes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def test_ranks_die_with_a_killed_launcher(run_extract_module, tmp_path):
    fmnist = run_extract_module("data/fashion-mnist-mini", source_options={"split": "test"}, shard_size=128,
                                batch_size=50)
    run = tmp_path / "orphan-check-run"
    launcher = subprocess.Popen([sys.executable, "-m", "stages.cli", "train", str(fmnist), "--out", str(run),
                                 "--procs", "2", "--steps", "100000", "--micro-batch", "4", "--no-progress"],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:  # the ranks are training
        time.sleep(0.5)
    assert (run / "metrics.jsonl").exists(), "training did not start"
    assert len(processes_mentioning(str(run))) >= 3  # launcher, torchrun, 2 ranks
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 30
    while processes_mentioning(str(run)) and time.time() < deadline:
        time.sleep(0.5)
    assert processes_mentioning(str(run)) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KB tmpfs (skipped where this process may not mount one); yields (mount point, resize)."""
    where = tmp_path / "disk"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root) to fill a disk")
    yield where, lambda size: subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)
    subprocess.run(["umount", str(where)], check=True)


def test_a_full_disk_stops_extraction_cleanly_and_a_resume_completes_it(run_extract, small_disk, tmp_path):
    from stages.extract import ExtractError
    from pipeline.featureset import FeatureSet
    disk, resize = small_disk
    options = dict(source_options={"split": "test"}, shard_size=64, batch_size=32)
    with pytest.raises(ExtractError, match=r"writing shard-\d{6} failed: OSError: \[Errno 28\] No space left on device"):
        run_extract("data/fashion-mnist-mini", out=disk / "set", **options)
    done = sorted(p.stem for p in (disk / "set" / "progress").glob("shard-*.json"))
    assert 0 < len(done) < 8 and not list((disk / "set").rglob(".*tmp-*"))  # only complete shards are marked done
    resize("4m")
    result, _ = run_extract("data/fashion-mnist-mini", out=disk / "set", **options)
    _, reference = run_extract("data/fashion-mnist-mini", out=tmp_path / "reference", **options)
    fs = FeatureSet.open(disk / "set")
    assert result.rows == 500 and fs.verify() == []
    assert fs.manifest["shards"] == FeatureSet.open(reference).manifest["shards"]  # the same bytes
