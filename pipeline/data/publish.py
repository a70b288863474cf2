"""Extraction into a URL (`extract --out s3://bucket/sets/x`, or any fsspec scheme but file://).

The set is extracted into a local staging folder (`<cache>/staging/<sha256 of the URL>`, under
--cache-dir / ARRA_PIPE_CACHE, else the temporary folder) by the ordinary resumable job. While it
runs, a `Publisher` thread uploads each shard as soon as the job has written it and marked it done,
then records it uploaded at the URL (`progress/uploaded/<shard>.json`, holding its sha256). When the
job has finished, the rest is uploaded (remaining shards, added-column tars, rejects.jsonl, column
manifests) and `manifest.json` last, so a reader never finds a manifest naming a missing shard;
then the upload records and the staging folder are removed.

A killed run re-run with the same command resumes from the staging folder's finished shards and
uploads only what has no upload record with the same sha256: the rows are those of an
uninterrupted run. A URL that already holds a manifest is reported complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from pipeline.data.featureset import COLUMNS, MANIFEST, PROGRESS, REJECTS, FeatureSet, FeatureSetError, read_manifest
from pipeline.data.files import atomic_write_bytes
from pipeline.data.jobs import JobError, JobResult
from pipeline.data.remote import RemoteDir, cache_dir, redact

UPLOADED = f"{PROGRESS}/uploaded"


def staging_dir(url: str) -> Path:
    """The local folder a URL's set is extracted into before its files are uploaded."""
    root = cache_dir() or Path(tempfile.gettempdir()) / "arra-pipe-cache"
    return root / "staging" / hashlib.sha256(url.encode()).hexdigest()[:24]


def _put(remote: RemoteDir, local: Path, name: str) -> None:
    """Upload one file and check that the URL holds all of it."""
    target = remote / name
    size = local.stat().st_size
    remote._retried("uploading", lambda: _makedirs(target) or remote.fs.put_file(str(local), target.fspath))
    if target.stat().st_size != size:
        raise OSError(f"{target}: {target.stat().st_size} bytes after the upload of {size}")


def _makedirs(target: RemoteDir) -> None:
    """The folder of `target`, for filesystems that have folders (an object store has none)."""
    target.fs.makedirs(target.parent.fspath, exist_ok=True)


class Publisher:
    """Uploads the shards of the job writing into `staging` to `remote` as they are marked done."""

    def __init__(self, staging: Path, remote: RemoteDir, log=print, poll: float = 0.2):
        self.staging, self.remote, self.log, self.poll = staging, remote, log, poll
        self._stop, self._failed = threading.Event(), None
        self._done = self._uploaded()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    def __enter__(self) -> "Publisher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _uploaded(self) -> dict[str, str]:
        """Files already uploaded (by an earlier run too): name -> sha256."""
        out = {}
        for p in (self.remote / UPLOADED).glob("*.json"):
            try:
                record = json.loads(p.read_bytes())
                out[record["name"]] = record["sha256"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # an unreadable record: its file is uploaded again
        return out

    def upload(self, entry: dict) -> None:
        """Upload the file of a manifest `entry` (name, bytes, sha256) unless it already is, then
        record it uploaded."""
        name, sha = entry["name"], entry["sha256"]
        if self._done.get(name) == sha:
            return
        _put(self.remote, self.staging / name, name)
        record = (self.remote / UPLOADED / f"{name.replace('/', '--')}.json")
        _makedirs(record)
        self.remote._retried("recording an upload",
                             lambda: self.remote.fs.pipe_file(record.fspath, json.dumps({"name": name, "sha256": sha}).encode()))
        self._done[name] = sha

    def _run(self) -> None:
        """Upload each shard (and its kept-images tar) whose progress record the job has written."""
        while not self._stop.wait(self.poll):
            try:
                for marker in sorted((self.staging / PROGRESS).glob("shard-*.json")):
                    try:
                        record = json.loads(marker.read_bytes())
                    except (OSError, ValueError):
                        continue  # removed by the job's end, or being replaced
                    for entry in (record, record.get("image_shard")):
                        if entry:
                            self.upload(entry)
            except Exception as exc:  # noqa: BLE001 - reported by finish(); the job's files stay staged
                self._failed = exc
                return

    def finish(self) -> dict:
        """After the job: upload every remaining file of the finished set, manifest.json last, then
        remove the upload records. Returns the manifest."""
        self._stop.set()
        self._thread.join()
        if self._failed is not None:
            raise JobError(f"{self.remote}: uploading failed: {type(self._failed).__name__}: {redact(self._failed)}; "
                           "re-run the same command to resume")
        manifest = read_manifest(self.staging / MANIFEST)
        for entry in manifest["shards"]:
            self.upload(entry)
        columns = sorted(p.parent.name for p in (self.staging / COLUMNS).glob(f"*/{MANIFEST}"))
        for name in columns:
            for entry in read_manifest(self.staging / COLUMNS / name / MANIFEST)["shards"]:
                self.upload(entry)
        if (self.staging / REJECTS).exists():
            _put(self.remote, self.staging / REJECTS, REJECTS)
        for name in columns:
            _put(self.remote, self.staging / COLUMNS / name / MANIFEST, f"{COLUMNS}/{name}/{MANIFEST}")
        _put(self.remote, self.staging / MANIFEST, MANIFEST)  # last: now every file it names is there
        try:
            self.remote.fs.rm((self.remote / PROGRESS).fspath, recursive=True)
        except (FileNotFoundError, OSError):
            pass
        return manifest


def extract_to_url(extract, add, opts, url: str, overwrite: bool, log=print) -> JobResult:
    """`extract --out URL`: `extract(opts, overwrite, log)` (the stage) run into a staging folder,
    its files uploaded as above. Under torchrun the ranks of one node share the staging folder and
    rank 0 uploads. A URL holding a finished set with teachers it lacks gets them as columns
    (`add_to_url`); one that has them all is complete."""
    remote = RemoteDir(url)
    if overwrite:
        raise JobError(f"--overwrite is not supported for a URL ({remote}): remove the set there with the storage's "
                       "own tools, then extract again")
    if (remote / MANIFEST).is_file():
        m = read_manifest(remote / MANIFEST)
        if opts.new_teachers(m):
            return add_to_url(add, opts, url, log)
        return JobResult("up-to-date", remote, m["rows"], m["rejects"]["total"])
    staging = staging_dir(url)
    staging.parent.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) != 0:
        return extract(replace(opts, out=str(staging)), overwrite=False, log=log)
    log(f"extracting into {staging}; each finished shard is uploaded to {remote}, the manifest last")
    with Publisher(staging, remote, log) as publisher:
        result = extract(replace(opts, out=str(staging)), overwrite=False, log=log)
        manifest = publisher.finish()
    shutil.rmtree(staging)
    return replace(result, path=remote, rows=manifest["rows"])


def _download(fs: FeatureSet, staging: Path, log) -> None:
    """A local copy of the set at a URL, every tar checked against its manifest entry; the
    manifest is written last, so a copy interrupted half-way is made again."""
    remote = fs.path
    entries = list(fs.manifest["shards"])
    extra = [f"{COLUMNS}/{name}/{MANIFEST}" for name in fs.columns]
    for column in fs.columns.values():
        entries += column["shards"]
    log(f"copying {remote} ({sum(e['bytes'] for e in entries) / 1e6:.1f} MB) into {staging} to add columns")
    for entry in entries:
        data, problems = remote.fetch_checked(entry["name"], entry["bytes"], entry["sha256"])
        if problems:
            raise FeatureSetError(f"{remote}/{problems[0]}")
        (staging / entry["name"]).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(staging / entry["name"], data)
    for name in [REJECTS, *extra, MANIFEST]:
        target = remote / name
        if name == REJECTS and not target.is_file():
            continue
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(staging / name, target.read_bytes())


def add_to_url(add, opts, url: str, log=print) -> JobResult:
    """Teachers added as columns to the set at `url`: the set is copied into the staging folder
    (checked), `add(opts, log)` (the stage) adds the columns there, and each new column's tars are
    uploaded, then its manifest (a reader finds a column by its manifest). Re-running after a kill
    resumes from the staging folder; the staging folder is removed at the end."""
    remote = RemoteDir(url)
    fs = FeatureSet.open(remote)
    staging = staging_dir(url)
    if not (staging / MANIFEST).is_file():
        _download(fs, staging, log)
    result = add(replace(opts, out=str(staging)), log)
    if int(os.environ.get("RANK", "0")) != 0:
        return replace(result, path=remote)
    publisher = Publisher(staging, remote, log)
    have = fs.columns
    for p in sorted((staging / COLUMNS).glob(f"*/{MANIFEST}")):
        name, column = p.parent.name, read_manifest(p)
        if name in have and have[name]["shards"] == column["shards"]:
            continue
        for entry in column["shards"]:
            publisher.upload(entry)
        _put(remote, p, f"{COLUMNS}/{name}/{MANIFEST}")  # last: the column is now complete at the URL
    try:
        remote.fs.rm((remote / PROGRESS).fspath, recursive=True)
    except (FileNotFoundError, OSError):
        pass
    shutil.rmtree(staging)
    return replace(result, path=remote)
