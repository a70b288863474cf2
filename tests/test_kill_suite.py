"""The standing kill -9 suite: a job is killed (its whole process group, ranks and decoding workers
included) at many seeded random points, each time re-run with the same command, killed again, ...
until the kills are spent; then it runs to the end. The result must equal an uninterrupted run:
an extraction's rows by key and its shards byte for byte, a 2-process ZeRO-3 training's losses in
metrics.jsonl exactly. Kill points are drawn by kind: a delay after the launch (imports, model
builds, the first batches), just after a shard or a step, or while a checkpoint is being written.
If a job finishes before a kill lands, it is compared and a fresh one is started for the rest.

ARRA_KILLS_EXTRACT / ARRA_KILLS_TRAIN set the number of kills (a longer soak than CI's)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.data.featureset import FeatureSet

MINI = "data/fashion-mnist-mini"
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
TIMING = ("tokens_per_s", "samples_per_s")
KILLS_EXTRACT = int(os.environ.get("ARRA_KILLS_EXTRACT", "20"))
KILLS_TRAIN = int(os.environ.get("ARRA_KILLS_TRAIN", "20"))


def launch(args: list[str]) -> subprocess.Popen:
    """The CLI in a process group of its own, so that one kill reaches every process of the job."""
    return subprocess.Popen([sys.executable, "-m", "stages.cli", *args], env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def alive(path: Path) -> list[int]:
    """Live processes with `path` as an argument (zombies have none)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(path) in (proc / "cmdline").read_bytes().decode(errors="replace").split("\0"):
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def kill_when(job: subprocess.Popen, ready, delay: float, path: Path, timeout: float = 400) -> bool:
    """Once `ready()`, wait `delay` s and kill -9 the job's process group; False when it ended first."""
    deadline = time.time() + timeout
    while not ready():
        if job.poll() is not None:
            return False
        assert time.time() < deadline, "the job made no progress"
        time.sleep(0.005)
    time.sleep(delay)
    if job.poll() is not None:
        return False
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    while alive(path):  # ranks and workers go with the group
        assert time.time() < deadline, f"processes of a killed job live on: {alive(path)}"
        time.sleep(0.05)
    return True


def finish(job: subprocess.Popen) -> None:
    _, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[-4000:]


def run_with_kills(kills: int, start, kill_point, same_as_reference) -> list[str]:
    """Start a job, kill it at `kill_point(job, rng)` until `kills` kills landed (a job that ends first
    is checked and replaced by a fresh one), finish it, check it; returns the kill points that landed."""
    rng, landed, run = random.Random(15), [], 0
    job, out = start(run)
    while len(landed) < kills:
        what, hit = kill_point(job, out, rng)
        if hit:
            landed.append(what)
            job, out = start(run)
            continue
        finish(job)
        same_as_reference(out)
        run += 1
        job, out = start(run)
    finish(job)
    same_as_reference(out)
    print(f"{len(landed)} kills over {run + 1} jobs:", *landed, sep="\n  ")
    return landed


# ---------------------------------------------------------------------------------------------
# extraction


def extract_args(codebook: str, out: Path) -> list[str]:
    return ["extract", MINI, "--split", "test", "--out", str(out), "--tokenizer-path", codebook, "--teacher-resolution",
            "32", "--batch-size", "10", "--shard-size", "25", "--workers", "1", "--no-progress"]


@pytest.mark.timeout(1200)  # minutes on 2 busy cores; the suite's 600 s would fail it for the load, not a fault
def test_extraction_killed_at_random_points_resumes_to_the_same_set(codebook, tmp_path):
    reference = tmp_path / "reference"
    finish(launch(extract_args(codebook, reference)))
    want = FeatureSet.open(reference)

    def start(run: int):
        out = tmp_path / f"run{run}"
        return launch(extract_args(codebook, out)), out

    def kill_point(job, out, rng):
        done = lambda: len(list((out / "progress").glob("shard-*.json")))  # noqa: E731
        if rng.random() < 0.3:
            delay = rng.uniform(0.2, 4.0)
            return f"{delay:.2f} s after the launch", kill_when(job, lambda: True, delay, out)
        after, delay = done() + 1, rng.uniform(0.0, 0.4)
        return f"{delay:.2f} s after shard {after} was done", kill_when(job, lambda: done() >= after, delay, out)

    def same_as_reference(out: Path) -> None:
        got = FeatureSet.open(out)
        assert got.manifest["shards"] == want.manifest["shards"]  # names, rows, bytes and sha256
        assert got.table().equals(want.table()) and got.rejects() == want.rejects() and got.verify() == []
        assert not list(out.rglob(".*tmp-*"))

    landed = run_with_kills(KILLS_EXTRACT, start, kill_point, same_as_reference)
    assert len(landed) == KILLS_EXTRACT


# ---------------------------------------------------------------------------------------------
# 2-process ZeRO-3 training


TRAIN = ["--zero", "3", "--procs", "2", "--micro-batch", "8", "--steps", "30", "--save-every", "2",
         "--keep-checkpoints", "2", "--lr", "3e-3", "--seed", "3", "--cond-dropout", "0.1", "--no-progress"]


def losses(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def written_since(path: Path, since_ns: int) -> bool:
    try:
        return path.stat().st_mtime_ns > since_ns
    except OSError:
        return False


def stepped_to(run: Path, step: int, since_ns: int) -> bool:
    """The job launched at `since_ns` reached `step` (metrics.jsonl is cut back to the resumed step
    when a job starts, so an older file's lines do not count)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return written_since(run / "metrics.jsonl", since_ns) and json.loads(lines[-1])["step"] >= step
    except (OSError, IndexError, ValueError):
        return False


def resumes_from(run: Path) -> int:
    """The step of the newest complete checkpoint (0: none), where a re-run starts."""
    steps = [int(p.parent.name[4:]) for p in (run / "checkpoints").glob("step*/arra_complete.json")]
    return max(steps, default=0)


@pytest.mark.timeout(2400)  # 20 kills, each a restart of 2 ranks: about 20 minutes on 2 busy cores
def test_zero3_training_killed_at_random_points_resumes_to_the_same_losses(run_extract, tmp_path):
    _, fmnist = run_extract(MINI, source_options={"split": "test"}, shard_size=128, batch_size=50)
    reference = tmp_path / "reference"
    finish(launch(["train", str(fmnist), "--out", str(reference), *TRAIN]))
    want = losses(reference)
    assert [r["step"] for r in want] == list(range(1, 31))

    def start(run: int):
        out = tmp_path / f"run{run}"
        return launch(["train", str(fmnist), "--out", str(out), *TRAIN]), out

    def kill_point(job, out, rng):
        base, kind, launched = resumes_from(out), rng.random(), time.time_ns()
        if kind < 0.2:
            delay = rng.uniform(1.0, 12.0)
            return f"{delay:.2f} s after the launch", kill_when(job, lambda: True, delay, out)
        if kind < 0.6:
            step, delay = base + rng.randint(1, 2), rng.uniform(0.0, 0.5)
            return f"{delay:.2f} s after step {step}", kill_when(job, lambda: stepped_to(out, step, launched), delay, out)
        delay = rng.uniform(0.0, 0.3)
        writing = lambda: any(int(p.name[4:]) > base and written_since(p, launched)  # noqa: E731
                              for p in (out / "checkpoints").glob("step*"))
        return f"{delay:.2f} s into writing a checkpoint after step {base}", kill_when(job, writing, delay, out)

    def same_as_reference(out: Path) -> None:
        assert losses(out) == want

    landed = run_with_kills(KILLS_TRAIN, start, kill_point, same_as_reference)
    assert len(landed) == KILLS_TRAIN


def test_a_stop_during_the_first_checkpoint_starts_again_from_step_0(tmp_path):
    """Found by this suite: rank 0 writes `latest` only once a checkpoint is complete, so step folders
    with none complete and no `latest` are a first checkpoint cut short, not a damaged run."""
    from stages.train import resume_tag
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step00000002").mkdir(parents=True)
    (ckpt / "step00000002" / "arra_state_rank0.pt").write_bytes(b"cut short")
    said = []
    assert resume_tag(ckpt, 2, said.append) is None
    assert said == [f"{ckpt}: the first checkpoint was not finished; starting from step 0"]
