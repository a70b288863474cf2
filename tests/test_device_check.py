"""benchmarks/device_check.py, the one command that proves the GPU paths on a GPU box: its CPU dry
run takes every stage through the real CLI with tiny sizes, so the script cannot rot between the
rare sessions that have a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"
STAGES = ["install", "data", "extract", "bare-forward", "train-zero2", "resume", "sample-small-batch",
          "sample-large-batch", "eval", "train-zero0", "train-zero3", "train-gpus1"]


def device_check(out: Path, *flags, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-dry-run", "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=timeout)
    return done, json.loads((out / "summary.json").read_text())


def test_cpu_dry_run_runs_every_stage(tmp_path):
    # a generous budget: a loaded CI machine must not turn a working stage into a skipped one
    done, summary = device_check(tmp_path, "--budget", "1500", timeout=1800)
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == STAGES
    assert {n: s.get("error") or s.get("note") for n, s in stages.items() if s["status"] != "ok"} == {}, done.stdout
    assert done.returncode == 0, done.stdout + done.stderr
    assert stages["resume"]["figures"]["resumed_at"] == summary["sizes"]["steps"]
    for name in ("train-zero0", "train-zero2", "train-zero3", "train-gpus1", "resume"):
        assert stages[name]["figures"]["tokens_per_s"] > 0 and stages[name]["figures"]["mfu"] > 0
    assert all(stages[n]["figures"]["img_per_s"] > 0 for n in ("extract", "sample-small-batch", "sample-large-batch"))
    table = (tmp_path / "summary.md").read_text()
    assert all(f"| {n} | ok |" in table for n in STAGES), table
    with tarfile.open(tmp_path / "samples.tar") as tar:
        names = tar.getnames()
    assert "samples/samples.jsonl" in names and any(n.endswith(".png") for n in names)
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        assert "logs/train-zero2.log" in tar.getnames()


def test_a_spent_budget_skips_the_remaining_stages_and_says_so(tmp_path):
    done, summary = device_check(tmp_path, "--budget", "0", timeout=120)
    assert done.returncode == 1
    assert [s["stage"] for s in summary["stages"]] == STAGES
    assert all(s["status"] == "skipped" and "time budget" in s["note"] for s in summary["stages"])
    assert "| train-zero2 | skipped |" in (tmp_path / "summary.md").read_text()
