"""Faults a running job meets: a killed launcher must take its ranks with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
