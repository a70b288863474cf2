"""`extract --out URL` (issue 18, writing): the set is staged locally, each finished shard uploaded
and recorded, the manifest uploaded last; a run killed with SIGKILL while uploading and re-run
gives exactly the rows of an uninterrupted run; credentials in the URL are never shown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest
from click.testing import CliRunner

from conftest import TEACHER_RES, write_image
from pipeline.data import publish
from pipeline.data.featureset import FeatureSet
from pipeline.data.remote import CACHE_ENV
from stages.cli import main

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("src") / "images"
    for i in range(36):
        write_image(root / f"c{i % 3}" / f"{i:03d}.png", seed=i)
    return root


def flags(codebook):
    return ["--tokenizer-path", codebook, "--teacher-resolution", str(TEACHER_RES), "--batch-size", "4",
            "--workers", "0", "--shard-size", "8", "--no-progress", "--max-reject-rate", "1.0"]


def test_extract_to_a_memory_url_uploads_shards_then_the_manifest_last(images, codebook, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    order, put = [], publish._put
    monkeypatch.setattr(publish, "_put", lambda remote, local, name: (order.append(name), put(remote, local, name)))
    url = "memory://arra-test/sets/x"
    try:
        result = CliRunner().invoke(main, ["extract", str(images), "--out", url, *flags(codebook)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        local = tmp_path / "local"
        CliRunner().invoke(main, ["extract", str(images), "--out", str(local), *flags(codebook)], catch_exceptions=False)
        remote = FeatureSet.open(url)
        assert remote.verify() == [] and remote.table().equals(FeatureSet.open(local).table())
        shards = [s["name"] for s in remote.manifest["shards"]]
        assert len(shards) == 5 and order[-1] == "manifest.json" and set(shards) <= set(order[:-1])
        fs = fsspec.filesystem("memory")
        assert not fs.exists("/arra-test/sets/x/progress")             # the upload records went with the job
        assert not list((tmp_path / "cache" / "staging").iterdir())     # and the staging folder
        again = CliRunner().invoke(main, ["extract", str(images), "--out", url, *flags(codebook)], catch_exceptions=False)
        assert again.exit_code == 0 and "already complete" in again.output
    finally:
        fsspec.filesystem("memory").rm("/arra-test", recursive=True)


SLOW_UPLOADS = """
import sys, time
from pipeline.data import publish
put = publish._put
def slow(remote, local, name):
    time.sleep(0.7)
    put(remote, local, name)
publish._put = slow
from stages.cli import main
main(sys.argv[1:])
"""


def watch(target: Path, seen: list, stop: threading.Event) -> None:
    """Record every time the manifest is visible while one of the shards it names is not complete."""
    while not stop.is_set():
        try:
            manifest = json.loads((target / "manifest.json").read_text())
        except (OSError, ValueError):
            time.sleep(0.02)
            continue
        for s in manifest["shards"]:
            p = target / s["name"]
            if not p.is_file() or p.stat().st_size != s["bytes"]:
                seen.append(s["name"])
        time.sleep(0.02)


def test_a_run_killed_while_uploading_resumes_to_the_rows_of_an_uninterrupted_run(images, codebook, tmp_path):
    env = {**ENV, CACHE_ENV: str(tmp_path / "cache")}
    target = tmp_path / "bucket" / "x"
    url = f"local://{target}"
    args = ["extract", str(images), "--out", url, *flags(codebook)]
    early, stop = [], threading.Event()
    watcher = threading.Thread(target=watch, args=(target, early, stop), daemon=True)
    watcher.start()
    slow = subprocess.Popen([sys.executable, "-c", SLOW_UPLOADS, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    uploaded = target / "progress" / "uploaded"
    deadline = time.monotonic() + 300
    while not (uploaded.is_dir() and len(list(uploaded.iterdir())) >= 2) and time.monotonic() < deadline:
        assert slow.poll() is None, slow.communicate()[1][-3000:]
        time.sleep(0.05)
    slow.send_signal(signal.SIGKILL)
    slow.wait()
    assert not (target / "manifest.json").exists()
    done = subprocess.run([sys.executable, "-m", "stages.cli", *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    stop.set()
    watcher.join()
    assert early == []                                              # never a manifest before its shards
    reference = tmp_path / "reference"
    ref = subprocess.run([sys.executable, "-m", "stages.cli", "extract", str(images), "--out", str(reference),
                          *flags(codebook)], env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    remote = FeatureSet.open(url)
    assert remote.verify() == [] and remote.table().equals(FeatureSet.open(reference).table())
    assert remote.manifest["shards"] == FeatureSet.open(reference).manifest["shards"]   # byte for byte
    assert not (target / "progress").exists()


def test_credentials_in_the_out_url_are_never_shown(images, codebook, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["extract", str(images), "--out", "s3://AKIAEXAMPLE:hunter2-secret@bucket/sets/x",
                                       *flags(codebook)])
    assert result.exit_code == 1 and "hunter2-secret" not in result.output and "s3://***@bucket/sets/x" in result.output


def test_a_teacher_added_to_a_set_at_a_url_equals_one_added_to_a_folder(images, codebook, tmp_path, monkeypatch):
    import model_checkpoints as mc
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    dino = str(mc.write_dinov2(tmp_path / "dino", 384))
    url, local = "memory://arra-test/sets/add", tmp_path / "local"
    add = ["--teacher", "dinov2-s", "--teacher-path", dino]
    try:
        for out in (url, str(local)):
            done = CliRunner().invoke(main, ["extract", str(images), "--out", out, *flags(codebook)], catch_exceptions=False)
            assert done.exit_code == 0, done.output
            done = CliRunner().invoke(main, ["extract", "--out", out, *flags(codebook), *add], catch_exceptions=False)
            assert done.exit_code == 0, done.output
        remote = FeatureSet.open(url)
        assert set(remote.columns) == {"dinov2-s"} and remote.verify() == []
        assert remote.table().equals(FeatureSet.open(local).table())
        assert not list((tmp_path / "cache" / "staging").iterdir())
    finally:
        fsspec.filesystem("memory").rm("/arra-test", recursive=True)
