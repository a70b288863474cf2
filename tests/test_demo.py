"""`arra-pipe demo` end to end on a 200 + 50 image cut of the embedded subset (3 training steps, the
teacher at 32 px, so it fits the suite): every stage runs in order, each is recorded with its
command and seconds, and the report, model, samples and evaluation it promises are there."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.sources import read_idx

MINI = Path(__file__).resolve().parents[1] / "data" / "fashion-mnist-mini"
STEPS = ["tokenizer fit", "extract train", "extract test", "train", "export", "sample", "eval"]


def cut(dst: Path, prefix: str, n: int) -> None:
    """The first n images and labels of a split, as idx files (a 3-d and a 1-d unsigned-byte array)."""
    for kind, magic in (("images-idx3", 3), ("labels-idx1", 1)):
        data = np.ascontiguousarray(read_idx(str(MINI / f"{prefix}-{kind}-ubyte.gz"))[:n])
        header = bytes([0, 0, 8, magic]) + b"".join(d.to_bytes(4, "big") for d in data.shape)
        (dst / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + data.tobytes()))


@pytest.mark.timeout(1500)
def test_demo_runs_every_stage_and_writes_its_report(tmp_path):
    data, out = tmp_path / "fmnist", tmp_path / "demo"
    data.mkdir()
    cut(data, "train", 200)
    cut(data, "t10k", 50)
    done = subprocess.run([sys.executable, "-m", "stages.cli", "demo", "--out", str(out), "--data", str(data),
                           "--steps", "3", "--teacher-resolution", "32", "--workers", "0"], capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]

    steps = json.loads((out / "demo.json").read_text())["steps"]
    assert [s["name"] for s in steps] == STEPS and all(s["seconds"] > 0 for s in steps)
    assert all(s["command"].startswith("arra-pipe ") for s in steps)
    md = (out / "report.md").read_text()
    assert (out / "report.html").is_file() and all(s["command"] in md for s in steps)

    assert json.loads((out / "train" / "manifest.json").read_text())["source"]["records"] == 200
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["gva"] > 0 for m in metrics)  # the ARRA loss
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out / "model")
    samples = [json.loads(line) for line in (out / "samples" / "samples.jsonl").read_text().splitlines()]
    assert sorted(s["class"] for s in samples) == sorted(list(range(10)) * 10)  # 10 per class
    assert all((out / "samples" / s["file"]).is_file() for s in samples)
    table = {m["metric"]: m for m in json.loads((out / "samples" / "eval.json").read_text())["metrics"]}
    # the reference is class-balanced: as many of each class as the rarest of the 50 test images has
    balanced = 10 * int(np.bincount(read_idx(str(data / "t10k-labels-idx1-ubyte.gz")), minlength=10).min())
    assert math.isfinite(table["FID"]["value"]) and (table["FID"]["n_generated"], table["FID"]["n_reference"]) == (100, balanced)
    assert 0 <= table["class accuracy (proxy)"]["value"] <= 1
