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
    from pipeline.data.jobs import JobError
    from pipeline.data.featureset import FeatureSet
    disk, resize = small_disk
    options = dict(source_options={"split": "test"}, shard_size=64, batch_size=32)
    with pytest.raises(JobError, match=r"writing shard-\d{6} failed: OSError: \[Errno 28\] No space left on device"):
        run_extract("data/fashion-mnist-mini", out=disk / "set", **options)
    done = sorted(p.stem for p in (disk / "set" / "progress").glob("shard-*.json"))
    assert 0 < len(done) < 8 and not list((disk / "set").rglob(".*tmp-*"))  # only complete shards are marked done
    resize("4m")
    result, _ = run_extract("data/fashion-mnist-mini", out=disk / "set", **options)
    _, reference = run_extract("data/fashion-mnist-mini", out=tmp_path / "reference", **options)
    fs = FeatureSet.open(disk / "set")
    assert result.rows == 500 and fs.verify() == []
    assert fs.manifest["shards"] == FeatureSet.open(reference).manifest["shards"]  # the same bytes


@pytest.fixture(params=["chmod", "read-only mount"])
def read_only(request, tmp_path):
    """A folder and two functions: make it read-only, make it writable again."""
    where = tmp_path / "out"
    where.mkdir()
    if request.param == "chmod":
        if os.geteuid() == 0:
            pytest.skip("running as root: chmod does not stop root's writes (the read-only mount case covers it)")
        modes = lambda mode: [p.chmod(mode) for p in [where, *where.rglob("*")] if p.is_dir()]  # noqa: E731
        yield where, lambda: modes(0o555), lambda: modes(0o755)
        modes(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root) to make read-only")
    remount = lambda how: subprocess.run(["mount", "-o", f"remount,{how}", str(where)], check=True)  # noqa: E731
    yield where, lambda: remount("ro"), lambda: remount("rw")
    subprocess.run(["umount", str(where)], check=True)


def listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_a_read_only_out_is_refused_in_one_line_marking_nothing_done(run_extract, read_only, codebook, tmp_path,
                                                                      monkeypatch):
    from click.testing import CliRunner
    from pipeline.data.featureset import FeatureSet
    from stages import extract as extract_stage
    from stages.cli import main
    folder, freeze, thaw = read_only
    options = dict(source_options={"split": "test"}, shard_size=64, batch_size=32)
    refused = rf"^--out {folder}/set is not writable \(.+: {folder}/set.*\); nothing was written or marked done$"

    freeze()  # a new --out
    with pytest.raises(extract_stage.JobError, match=refused):
        run_extract("data/fashion-mnist-mini", out=folder / "set", **options)
    cli = CliRunner().invoke(main, ["extract", "data/fashion-mnist-mini", "--split", "test", "--out", str(folder / "set"),
                                    "--tokenizer-path", codebook, "--teacher-resolution", "32", "--no-progress"])
    assert cli.exit_code == 1 and len(cli.output.strip().splitlines()) == 1, cli.output
    assert f"Error: --out {folder}/set is not writable" in cli.output
    assert listing(folder) == {}

    thaw()  # an interrupted extraction: 3 of 8 shards done
    write, written = extract_stage.write_shard, []

    def stop_after_three(path, *args):
        if len(written) == 3:
            raise OSError("stopped by the test")
        written.append(path)
        return write(path, *args)
    monkeypatch.setattr(extract_stage, "write_shard", stop_after_three)
    with pytest.raises(extract_stage.JobError, match="stopped by the test"):
        run_extract("data/fashion-mnist-mini", out=folder / "set", **options)
    monkeypatch.undo()
    before = listing(folder)
    assert len([p for p in before if p.startswith("set/progress/shard-")]) == 3

    freeze()
    with pytest.raises(extract_stage.JobError, match=refused):
        run_extract("data/fashion-mnist-mini", out=folder / "set", **options)
    assert listing(folder) == before

    thaw()
    result, _ = run_extract("data/fashion-mnist-mini", out=folder / "set", **options)
    _, reference = run_extract("data/fashion-mnist-mini", out=tmp_path / "reference", **options)
    assert result.rows == 500 and FeatureSet.open(folder / "set").verify() == []
    assert FeatureSet.open(folder / "set").manifest["shards"] == FeatureSet.open(reference).manifest["shards"]


def test_a_stop_between_the_manifest_and_removing_progress_is_cleaned_by_the_next_run(run_extract):
    """Found by the kill suite: a job killed after writing manifest.json, while removing progress/,
    left progress records (and a half-written one) in a finished set; the next run finds the set up
    to date and removes them."""
    from pipeline.data.featureset import FeatureSet
    options = dict(source_options={"split": "test"}, shard_size=128, batch_size=64)
    result, out = run_extract("data/fashion-mnist-mini", **options)
    progress = out / "progress"
    progress.mkdir()
    (progress / "shard-000001.json").write_text("{}")
    (progress / ".shard-000002.json.tmp-123").write_text("{")
    again, _ = run_extract("data/fashion-mnist-mini", out=out, **options)
    assert again.status == "up-to-date" and not progress.exists()
    assert FeatureSet.open(out).verify() == []
