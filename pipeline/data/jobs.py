"""The resumable sharded job that extraction and adding columns both are: its identity (what made
it, compared on resume and re-run), its result, and the writer thread that writes shards while the
models compute. Each shard is written atomically, then marked done in the job's `progress/`, so a
killed job re-run with the same command redoes only the shards not marked done."""

from __future__ import annotations

import contextlib
import copy
import errno
import queue
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ArraError
from pipeline.data.files import atomic_write_json, read_json
from pipeline.data.lock import main_rank_lock


class JobError(ArraError):
    """The job cannot start, cannot resume, or its result is not acceptable."""


@dataclass
class JobResult:
    status: str  # "extracted", "added" (teacher columns) or "up-to-date"
    path: Path
    rows: int
    rejects: int
    seconds: float = 0.0
    rows_extracted: int = 0


@contextlib.contextmanager
def job_lock(out: str | Path):
    """Hold the job's output folder for this job (pipeline.data.lock); a folder that cannot be written is
    refused in one line before anything is written or marked done."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(main_rank_lock(out))
        except OSError as exc:  # the lock is the first file written
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise JobError(f"--out {out} is not writable ({exc.strerror}: {exc.filename}); nothing was written "
                           "or marked done") from None
        yield


def remove_finished_progress(progress: Path) -> None:
    """A finished job writes its manifest, then removes its `progress/` records; a job stopped between
    the two leaves them behind, and the next run (finding the manifest) removes them."""
    if progress.is_dir():
        shutil.rmtree(progress)


def shard_name(s: int) -> str:
    return f"shard-{s:06d}"


# where a model's weights were read from: provenance only, since the sha256 recorded beside it decides
# the rows, so a codebook or checkpoint moved to another folder still makes the same job
WHERE_ONLY = frozenset({"weights_path"})


def diff(a, b, prefix: str = "") -> list[str]:
    """Every leaf where two job records differ, as `dotted.key: was A, now B` (`WHERE_ONLY` keys aside)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) if k not in WHERE_ONLY for d in diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix[:-1]}: was {a!r}, now {b!r}"]


def check_same_job(previous: dict, job: dict, what: str, advice: str) -> None:
    """Refuse to resume or re-run a job with another identity, listing the differences."""
    diffs = diff(previous, job)
    if diffs:
        raise JobError(f"{what}; differences:\n  " + "\n  ".join(diffs[:12]) + f"\n{advice}")


def start_progress(progress: Path, job: dict, what: str, advice: str) -> None:
    """Make the job's `progress/` and record the job there, or, when a killed run left one, check that
    this is the same job (main rank, before any shard is computed)."""
    progress.mkdir(parents=True, exist_ok=True)
    if (progress / "job.json").exists():
        check_same_job(read_json(progress / "job.json"), job, what, advice)
    else:
        atomic_write_json(progress / "job.json", job)


# Job fields that older arra-pipe versions did not record. A finished set or column without one is
# compared on the rest, so re-running the command that made it still finds it up to date. Resumes
# compare every field: their new shards would be mixed with shards of unknown settings.
LATER_FIELDS = ("compute", "compute.model_batch", "preprocess.jpeg_draft", "preprocess.max_side", "source.options.follow_symlinks", "source.options.max_file_bytes",
                "source.files_fingerprint")


def unrecorded(finished: dict, job: dict) -> tuple[dict, list[str]]:
    """`job` less the `LATER_FIELDS` that the record of a `finished` set or column lacks, and their names."""
    job, missing = copy.deepcopy(job), []
    for field_ in LATER_FIELDS:
        *parents, leaf = field_.split(".")
        old, new = finished, job
        for key in parents:
            old, new = old.get(key) if isinstance(old, dict) else None, new.get(key) if isinstance(new, dict) else None
        if isinstance(old, dict) and isinstance(new, dict) and leaf not in old and leaf in new:
            del new[leaf]
            missing.append(field_)
    return job, missing


def packages() -> dict:
    """Versions of the packages whose behaviour shapes the stored bytes, for the manifest."""
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "pyarrow", "numpy", "pillow", "webdataset", "faiss-cpu", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


class ShardWriter:
    """Runs `write(*item)` for each `put` item, in order, on one background thread, so that the
    models' thread does not wait for host copies, Arrow encoding, tar, sha256 and fsync. At most
    `depth` items wait, which bounds the host and device memory they hold. A failure is raised on
    the models' thread at the next `put` or at the end, naming the item's shard."""

    def __init__(self, where: str, write, depth: int = 3):
        self._where, self._queue, self._failed = where, queue.Queue(depth), None
        self._thread = threading.Thread(target=self._run, args=(write,), name="shard-writer", daemon=True)
        self._thread.start()

    def _run(self, write) -> None:
        while (item := self._queue.get()) is not None:
            shard, args = item
            if self._failed is None:  # after a failure only drain, so that `put` never blocks
                try:
                    write(*args)
                except Exception as exc:  # noqa: BLE001 - raised again on the models' thread
                    self._failed = JobError(f"{self._where}: writing {shard} failed: {type(exc).__name__}: {exc}")
                    self._failed.__cause__ = exc

    def _raise_failure(self) -> None:
        if self._failed is not None:
            raise self._failed

    def put(self, shard: str, *args) -> None:
        self._raise_failure()
        self._queue.put((shard, args))

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self._queue.put(None)  # on an error too: what is queued is finished work, written before leaving
        self._thread.join()
        if exc_type is None:
            self._raise_failure()
