"""Add teachers to a finished feature set as columns, without running the tokenizer again.

`arra-pipe extract --teacher NEW --out SET` on a finished SET that lacks NEW lands here. The
images are the set's kept canonical crops (`--keep-images` at the first extraction) when the
teachers saw the crop, else the records of the source recorded in the manifest (or given as
SOURCE), whose fingerprint must not have changed. Each teacher sees exactly the view it would
have seen in the first pass, and the batches are the set's members, so its features equal what
a first extraction with it would have stored.

For each shard, `columns/<teacher>/<shard>.tar` gets one member per member of the shard, same
name, same keys in the same order, holding `key` and `feat.<teacher>`. Tars are written
atomically, on the writer thread, and marked done in the column's `progress/`, so an interrupted
run resumes; under torchrun rank r takes the shards s % world == r. When every shard is done rank 0
writes `columns/<teacher>/manifest.json`; only then do readers join the column.

A column records its own device and precision (`compute`). It may differ from the set's: the
column is a feature of its own, compared with other features only within itself. Its resume on
another device or precision is refused, as the set's is.
"""

from __future__ import annotations

import functools
from collections import Counter
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pipeline import __version__, distributed
from pipeline.data.crops import CropDataset, batch_loader, cpu_split, kept_crop_loader
from pipeline.data.prefetch import Prefetch
from pipeline.data.feature_stats import EMPTY_SUMS, add_sums, feature_sums, summarize
from pipeline.data.featureset import (COLUMN_FORMAT, COLUMNS, IMAGE, MANIFEST, PROGRESS, VERSION, FeatureSet, caption_column,
                                 column_field, make_column_batch, schema_fields, shards_digest, write_shard)
from pipeline.data.files import atomic_write_json, read_json
from pipeline.data.images import DEFAULT_MAX_SIDE
from pipeline.data.jobs import (JobError, JobResult, ShardWriter, check_same_job, job_lock, packages,
                                remove_finished_progress, start_progress, unrecorded)
from pipeline.models.frozen import HostCopy
from pipeline.models.registry import load_spec
from pipeline.data.sources import SourceOptions, read_source
from pipeline.models.weights import checkpoint_files, fingerprint, resolve
from stages.options import ExtractOptions


def add_teachers(opts: ExtractOptions, log=print) -> JobResult:
    """Add the --teachers that the finished set at `opts.out` lacks as columns (up to date when it
    has them all); a second job on the same folder is refused while this one runs."""
    workers, threads = cpu_split(opts.workers)  # extract's split: the same threads give the same feature bits
    with job_lock(opts.out), distributed.torch_threads(threads):
        fs = FeatureSet.open(opts.out)
        return _add(fs, opts, opts.new_teachers(fs.manifest), workers, log)


def _add(fs: FeatureSet, opts: ExtractOptions, names: list[str], workers: int, log) -> JobResult:
    _check_tokenizer_flags(fs, opts)
    ranks = distributed.init()
    device = distributed.rank_device(opts.device, ranks)
    teachers = {t.name: t.to(device).eval() for t in (opts.teacher(name) for name in names)}
    added = fs.columns
    jobs = _column_jobs(fs, added, teachers, device.type, ranks.is_main)
    todo = {name: t for name, t in teachers.items() if name not in added}
    if not todo:
        distributed.shutdown()
        return JobResult("up-to-date", fs.path, fs.rows, fs.manifest["rejects"]["total"])

    progress = {name: fs.path / COLUMNS / name / PROGRESS for name in todo}
    if ranks.is_main:
        for name, folder in progress.items():
            start_progress(folder, jobs[name], f"{folder.parent} is being added with other settings",
                           f"Remove {folder.parent} to start it again.")
    distributed.barrier()

    shards = fs.manifest["shards"]
    mine = [i for i in range(ranks.rank, len(shards), ranks.world)
            if not all((progress[n] / f"{Path(shards[i]['name']).stem}.json").exists() for n in todo)]
    kept = IMAGE in added and fs.manifest["preprocess"]["teacher_view"] == "crop"
    plan = [(i, member, batch.column("key")) for i in mine for member, batch in _checked_members(fs, i, kept)]
    log(f"adding {', '.join(todo)} to {fs.path} on {device.type} at {', '.join({t.precision for t in todo.values()})}: "
        f"{len(mine)} of {len(shards)} shards on this rank, images from {'the kept crops' if kept else 'the source'}, "
        f"{workers} decode workers")
    own = fs.manifest.get("compute")
    if own and (own["device"], set(own["teachers"].values())) != (device.type, {t.precision for t in todo.values()}):
        log(f"note: the set's own teachers ran on {own['device']} at {', '.join(set(own['teachers'].values()))}; "
            f"each column's manifest records where and at what precision it was computed")
    views = iter(())  # this rank's shards have no members left to compute
    if plan:
        views = (_kept_views(fs, added[IMAGE], plan, todo, workers) if kept
                 else _source_views(fs, opts, plan, todo, device, workers))
    assemble = _ColumnAssembler(fs, todo, progress, mine, Counter(i for i, _, _ in plan))
    start, rows = time.perf_counter(), 0
    bar = tqdm(total=sum(s["rows"] for i, s in enumerate(shards) if i in mine), unit="row",
               desc=f"add {','.join(todo)} rank {ranks.rank}/{ranks.world}", disable=not (opts.progress and ranks.is_main))
    with Prefetch(views, pin=device, depth=2) as views, ShardWriter(str(fs.path), assemble) as writer:
        for (i, member, keys), batch_views in zip(plan, views):
            writer.put(f"the columns of {shards[i]['name']}", i, keys, HostCopy({n: t(batch_views[t.input_size]) for n, t in todo.items()}))
            rows += len(keys)
            bar.update(len(keys))
    assemble.write_empty()
    bar.close()
    seconds = time.perf_counter() - start

    distributed.barrier()
    if ranks.is_main:
        for name in todo:
            _finish(fs, name, jobs[name], progress[name], "kept crops" if kept else "source")
    distributed.barrier()
    distributed.shutdown()
    return JobResult("added", fs.path, fs.rows, fs.manifest["rejects"]["total"], seconds, rows)


def _column_jobs(fs: FeatureSet, added: dict, teachers: dict, device: str, is_main: bool) -> dict:
    """Each column's identity; a column the set already has (`added`) must be the same job, else refused."""
    clash = sorted(set(teachers) & {IMAGE, *fs.manifest["teachers"]})
    if clash:
        raise JobError(f"{fs.path} already has {clash} as part of its shards")
    digest = shards_digest(fs.manifest["shards"])
    jobs = {name: {"teacher": t.describe(), "teacher_view": fs.manifest["preprocess"]["teacher_view"],
                   "shards_sha256": digest, "compute": {"device": device, "teacher": t.precision}}
            for name, t in teachers.items()}
    for name in set(teachers) & set(added):
        if is_main:
            remove_finished_progress(fs.path / COLUMNS / name / PROGRESS)
        comparable, _ = unrecorded(added[name], jobs[name])
        check_same_job({k: added[name].get(k) for k in comparable}, comparable, f"{fs.path / COLUMNS / name} holds other "
                       f"features", f"Remove {fs.path / COLUMNS / name} to compute it again.")
    return jobs


class _ColumnAssembler:
    """Collects each shard's member outputs and, after its last member, writes the shard's column tars
    and progress records (on the writer thread)."""

    def __init__(self, fs: FeatureSet, teachers: dict, progress: dict, mine: list[int], counts: Counter):
        self.fs, self.shards, self.progress, self.counts = fs, fs.manifest["shards"], progress, counts
        self.fields = {name: pa.field(f"feat.{name}", pa.list_(pa.float16(), t.dim), nullable=False)
                       for name, t in teachers.items()}
        self.members = {i: [] for i in mine}

    def __call__(self, i: int, keys, outputs: HostCopy) -> None:
        with np.errstate(over="ignore"):  # what float16 cannot hold becomes inf, refused below
            feats = {n: a.astype(np.float16) for n, a in outputs.numpy().items()}
        for name, f in feats.items():
            if len(bad := np.flatnonzero(~np.isfinite(f).all(axis=1))):
                raise JobError(f"teacher {name} gave non-finite features (NaN, inf or beyond float16) for {len(bad)} "
                               f"rows of {self.shards[i]['name']}, e.g. {keys.take(bad[:3]).to_pylist()}; a column "
                               "needs a finite value for every row of the set, so it is not added")
        self.members[i].append((keys, feats))
        if len(self.members[i]) == self.counts[i]:
            _write(self.fs, self.shards[i], self.members.pop(i), self.fields, self.progress)

    def write_empty(self) -> None:
        """Shards without members (every record rejected) get empty column tars."""
        for i in list(self.members):
            _write(self.fs, self.shards[i], self.members.pop(i), self.fields, self.progress)


def _check_tokenizer_flags(fs: FeatureSet, opts: ExtractOptions) -> None:
    """Adding columns never runs the tokenizer nor a caption encoder; refuse flags that ask for one."""
    tok = fs.manifest["tokenizer"]
    if load_spec("tokenizers", opts.tokenizer)["name"] != tok["name"] and opts.tokenizer != "kmeans":
        raise JobError(f"{fs.path} was tokenized with {tok['name']}, not {opts.tokenizer}; a set has one tokenizer")
    if opts.tokenizer_path:
        spec = load_spec("tokenizers", tok["name"])
        digest, _ = fingerprint(checkpoint_files(spec, resolve("tokenizers", spec, opts.tokenizer_path)))
        if digest != tok["weights_sha256"]:
            raise JobError(f"{opts.tokenizer_path} is not the tokenizer {fs.path} was made with (sha256 differs)")
    if opts.caption_encoder and caption_column(load_spec("caption_encoders", opts.caption_encoder)["name"]) not in fs.columns:
        raise JobError(f"--caption-encoder {opts.caption_encoder}: caption features are written at extraction, not added "
                       f"to a finished set ({fs.path}); extract again with --overwrite (or into another --out)")


def _source_views(fs: FeatureSet, opts: ExtractOptions, plan, todo: dict, device, workers: int):
    """Teacher views of each planned member, decoded from the source as the first extraction did
    (its decoding workers start at once, before the writer thread)."""
    src, pre = fs.manifest["source"], fs.manifest["preprocess"]
    path, fmt, options = ((opts.source, opts.source_format, opts.source_options) if opts.source else
                          (src["path"], src["format"], SourceOptions(**src["options"])))
    if not Path(path).exists():
        raise JobError(f"the source of {fs.path}, {path}, is gone and the set keeps no images "
                           f"(--keep-images); pass SOURCE where it is now")
    source = read_source(path, fmt, options)
    for name, what in (("fingerprint", "records"), ("files_fingerprint", "image files (size or modification time)")):
        if name in src and getattr(source, name) != src[name]:  # sets made before files_fingerprint lack it
            raise JobError(f"{path} is not the source {fs.path} was made from: its {what} changed "
                               f"(source.{name} {getattr(source, name)[:12]} vs {src[name][:12]})")
    dataset = CropDataset(source.records, pre["resolution"], sorted({t.input_size for t in todo.values()}),
                          pre["teacher_view"], pre["max_pixels"], max_side=pre.get("max_side", DEFAULT_MAX_SIDE),
                          max_file_bytes=options.max_file_bytes, jpeg_draft=pre.get("jpeg_draft", False))
    first = {r.key: j for j, r in enumerate(source.records) if not r.reject}  # the one the source let claim it

    def row(key: str) -> int:  # the record extracted under `key`
        return dataset.holder(key) if key in dataset.claims else first[key]
    loader = batch_loader(dataset, [[row(k) for k in keys.to_pylist()] for _, _, keys in plan], workers)

    def checked(batch):
        _, _, views, bad = batch
        if bad:
            record, reason = source.records[bad[0][0]], bad[0][1]
            raise JobError(f"{record.origin}: {reason}; it was extracted before, so the source changed since")
        return views
    return (checked(batch) for batch in loader)


def _checked_members(fs: FeatureSet, i: int, kept: bool) -> list:
    """(member, batch) of shard i, checked whole against the manifest as every reader checks it (and
    so is its kept-crops tar when the images come from there): a damaged set is refused by file name
    before any column is computed from it."""
    if kept:
        fs._read(fs.columns[IMAGE]["shards"][i], IMAGE)
    return fs._read(fs.manifest["shards"][i])


def _kept_views(fs: FeatureSet, images: dict, plan, todo: dict, workers: int):
    """Teacher views of each planned member, from the set's kept canonical crops (its decoding
    workers start at once, before the writer thread)."""
    members = [(fs.path / images["shards"][i]["name"], member) for i, member, _ in plan]
    loader = kept_crop_loader(members, sorted({t.input_size for t in todo.values()}), workers)

    def checked(planned, kept):
        (i, member, keys), (kept_keys, views) = planned, kept
        if kept_keys != keys.to_pylist():
            raise JobError(f"{images['shards'][i]['name']}: member {member} does not line up with the shard")
        return views
    return (checked(planned, kept) for planned, kept in zip(plan, loader))


def _write(fs: FeatureSet, shard: dict, members: list, fields: dict, progress: dict) -> None:
    """One column tar per teacher for one shard, then its progress record."""
    file = Path(shard["name"]).name
    for name, field in fields.items():
        batches = [make_column_batch(keys, field, feats[name]) for keys, feats in members]
        entry = write_shard(fs.path / COLUMNS / name / file, batches, f"{COLUMNS}/{name}/{file}")
        sums = functools.reduce(add_sums, (feature_sums(feats[name]) for _, feats in members), EMPTY_SUMS)
        atomic_write_json(progress[name] / f"{Path(file).stem}.json", {**entry, "feature_sums": sums})


def _finish(fs: FeatureSet, name: str, job: dict, progress: Path, images_from: str) -> None:
    done = []
    for shard in fs.manifest["shards"]:
        p = progress / f"{Path(shard['name']).stem}.json"
        if not p.exists():
            raise JobError(f"{fs.path}: column {name} of {shard['name']} was not finished by its rank; "
                               f"re-run the same command to resume")
        done.append(read_json(p))
    column = {"format": COLUMN_FORMAT, "version": VERSION, "kind": "teacher", "name": name,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "arra_pipe": __version__,
              "packages": packages(), **job, "images_from": images_from,
              "feature_stats": summarize(functools.reduce(add_sums, (d["feature_sums"] for d in done))),
              "rows": sum(d["rows"] for d in done),
              "shards": [{k: d[k] for k in ("name", "rows", "bytes", "sha256")} for d in done]}
    column["schema"] = {"key": "string", **schema_fields(pa.schema([column_field(name, column)]))}
    atomic_write_json(fs.path / COLUMNS / name / MANIFEST, column)
    shutil.rmtree(progress)
