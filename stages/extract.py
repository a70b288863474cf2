"""Stage 1: turn a dataset into a feature set of VQ codes and teacher features.

Records are cut into fixed shards by position (shard s holds records [s*shard_size, (s+1)*shard_size)),
and rank r owns the shards with s % world == r. Images are decoded and cropped in DataLoader
workers (with none, on a thread of the main process, ahead of the models); tokenizer and teachers
run in the main process on fixed batches inside each shard, while
a writer thread copies their outputs to the host, encodes them and writes the shards. A shard is
written atomically and then marked done in `progress/`, so a killed job re-run with the same
command skips finished shards and redoes only the rest, giving the same rows byte for byte. The
device and each model's precision are part of the job: a resume elsewhere is refused, never mixed.
When every shard is done, rank 0 writes `rejects.jsonl` and `manifest.json`. With `keep_images`
the canonical crops are also written, as PNG, to the parallel column `columns/image/`; with
`caption_encoder` each caption's per-token features to `columns/caption.<encoder>/` (parallel tars
keep the shards' fixed-width rows small for every reader that does not want ~100 KB of features a
row). The encoder is part of the job: a re-run with another one is a different extraction.

A finished set with teachers it does not have gets them as columns from `stages.add_columns`,
without the tokenizer (the CLI sends `arra-pipe extract` there); `extract` itself refuses it.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from pipeline import __version__, distributed
from pipeline.data.featureset import (COLUMN_FORMAT, COLUMNS, FORMAT, IMAGE, MANIFEST, PROGRESS, REJECTS, SHARDS, VERSION,
                                 FeatureSet, caption_column, column_field, feature_column, make_batch, make_column_batch, make_schema,
                                 schema_fields, set_entries_to_remove, shards_digest, write_shard)
from pipeline.data.crops import KEPT, cpu_split, crop_loader
from pipeline.data.prefetch import Prefetch
from pipeline.data.feature_stats import EMPTY_SUMS, add_sums, feature_sums, summarize
from pipeline.data.files import atomic_write_bytes, atomic_write_json, read_json
from pipeline.data.jobs import (JobError, JobResult, ShardWriter, check_same_job, job_lock, packages,
                                remove_finished_progress, shard_name, start_progress, unrecorded)
from pipeline.models.frozen import HostCopy
from pipeline.models.registry import build
from pipeline.data.sources import read_source
from stages.options import ExtractOptions

# Images per model forward when --model-batch is not given, per device (at most --batch-size). With freed
# memory reused (the CLI's `reuse_freed_memory`), a 224 px convnet on 2 CPU cores ran 1.27x faster at 64 than at 16
# (benchmarks/extract_vs_official.py --model-batches 16,32,64); without it, 64 was the slowest (fresh pages).
MODEL_BATCH = {"cpu": 64}


# ---------------------------------------------------------------------------------------------
# the job


def extract(opts: ExtractOptions, overwrite: bool = False, log=print) -> JobResult:
    """Extract or resume the set at `opts.out` (a finished one is reported up to date); a second
    job on the same folder is refused while this one runs."""
    with job_lock(opts.out):
        threads = torch.get_num_threads()
        try:
            return _extract(opts, overwrite, log)
        finally:
            torch.set_num_threads(threads)


def _different_job(out: Path) -> tuple[str, str]:
    return f"{out} was made by a different extraction", "Use another --out, or --overwrite to start again."


def _extract(opts: ExtractOptions, overwrite: bool, log) -> JobResult:
    out = Path(opts.out)
    _check_request(opts, out, overwrite)
    stale = set_entries_to_remove(out, opts.source) if overwrite else []
    ranks = distributed.init()
    device = distributed.rank_device(opts.device, ranks)
    workers, threads = cpu_split(opts.workers)
    torch.set_num_threads(threads)
    model_batch = _model_batch(opts, device.type, out, overwrite)
    source = read_source(opts.source, opts.source_format, opts.source_options)
    records = source.records
    tokenizer = build("tokenizers", opts.tokenizer, opts.tokenizer_path, resolution=opts.tokenizer_resolution).to(device).eval()
    teachers = {t.name: t.to(device).eval() for t in (opts.teacher(name) for name in opts.teachers)}
    captions, encode = _caption_encoder(opts, records, device, model_batch)
    job = _job(opts, source, tokenizer, teachers, device.type, model_batch, captions)
    if (out / MANIFEST).exists() and not overwrite:
        return _up_to_date(out, job, ranks.is_main, log)

    progress = out / PROGRESS
    if ranks.is_main:
        _remove(stale)
        for folder in [out / SHARDS] + [out / COLUMNS / column for column in _written_columns(job)]:
            folder.mkdir(parents=True, exist_ok=True)
        start_progress(progress, job, *_different_job(out))
    distributed.barrier()
    if ranks.rank and (progress / "job.json").exists():
        check_same_job(read_json(progress / "job.json"), job, *_different_job(out))

    code_len = job["tokenizer"]["code_len"]
    schema = make_schema(code_len, tokenizer.codebook_size, tokenizer.grid, {n: t.dim for n, t in teachers.items()})
    n_shards = max(1, math.ceil(len(records) / opts.shard_size))
    plan = _plan(out, len(records), n_shards, opts, ranks)
    loader = crop_loader(records, [c for _, _, c in plan], tokenizer.resolution, sorted({t.input_size for t in teachers.values()}),
                         opts.teacher_view, opts.max_pixels, workers, keep_images=opts.keep_images, max_side=opts.max_side,
                         max_file_bytes=opts.source_options.max_file_bytes, jpeg_draft=opts.jpeg_draft)
    todo = sum(len(c) for _, _, c in plan)
    if ranks.is_main:
        log(f"extracting on {device.type} (tokenizer {tokenizer.precision}, "
            f"{', '.join(f'{n} {t.precision}' for n, t in teachers.items())}), model batch {model_batch}, "
            f"{workers} decode workers and {threads} model threads per rank")
        if todo < len(records):
            log(f"resuming: {len(records) - todo} of {len(records)} records are in finished shards")
    fixed_row_bytes = code_len * schema.field("codes").type.value_type.bit_width // 8 + 2 * sum(t.dim for t in teachers.values())
    assemble = _ShardAssembler(out, records, schema, list(teachers), fixed_row_bytes, opts.keep_images, job.get("caption_encoder"))
    bar = tqdm(total=todo, unit="row", desc=f"extract rank {ranks.rank}/{ranks.world}",
               disable=not (opts.progress and ranks.is_main), dynamic_ncols=True)
    start = time.perf_counter()
    _run(plan, loader, device, tokenizer, teachers, model_batch, assemble, str(out), bar, encode)
    seconds = time.perf_counter() - start

    distributed.barrier()
    result = None
    if ranks.is_main:
        result = _finish(out, job, schema, source, n_shards, opts.max_reject_rate,
                         {"decode_workers": workers, "model_threads": threads})
        result.seconds, result.rows_extracted = seconds, todo
    distributed.barrier()
    distributed.shutdown()
    return result or JobResult("extracted", out, 0, 0, seconds, todo)


def _check_request(opts: ExtractOptions, out: Path, overwrite: bool) -> None:
    """Refuse what `extract` cannot do before any model is loaded."""
    if not opts.teachers:
        raise JobError("give at least one --teacher")
    if (out / MANIFEST).exists() and not overwrite:
        new = opts.new_teachers(FeatureSet.open(out).manifest)
        if new or opts.source is None:
            raise JobError(f"{out} is a finished set{' without ' + ', '.join(new) if new else ''}: teachers are added "
                           f"to it by `arra-pipe extract --out {out} --teacher NAME` (stages.add_columns.add_teachers)")
    if opts.source is None:
        raise JobError(f"give SOURCE: {out} is not a finished feature set to add teachers to")
    if opts.caption_encoder and (out / MANIFEST).exists() and not overwrite:
        from pipeline.models.registry import load_spec
        column = caption_column(load_spec("caption_encoders", opts.caption_encoder)["name"])
        if column not in FeatureSet.open(out).columns:
            raise JobError(f"{out} is a finished set without {column}: --caption-encoder features are written at "
                           "extraction only; extract again with --overwrite (or into another --out)")


def _written_columns(job: dict) -> list[str]:
    """The columns extract writes beside the shards: the kept crops, the caption features."""
    captions = [caption_column(job["caption_encoder"]["name"])] if "caption_encoder" in job else []
    return [IMAGE] * job["layout"]["keep_images"] + captions


def _caption_encoder(opts: ExtractOptions, records, device, model_batch: int):
    """The --caption-encoder on `device` and its function of record indices -> features (None, None
    without the flag); refused for a source with no caption to encode."""
    if not opts.caption_encoder:
        return None, None
    if not any(r.caption for r in records):
        raise JobError(f"--caption-encoder {opts.caption_encoder}: {opts.source} has no captions (every record's is "
                       "empty); give a source with captions (--caption-column, --caption-template) or leave the flag out")
    encoder = build("caption_encoders", opts.caption_encoder, opts.caption_encoder_path).to(device).eval()
    return encoder, functools.partial(_encode_captions, encoder, [r.caption for r in records], model_batch)


def _encode_captions(encoder, captions: list[str], model_batch: int, rows: list[int]) -> dict:
    """Caption features of records `rows`, padded to the longest caption among them (not to the
    encoder's max tokens: the padding is copied to the host and then cut off), and their token counts."""
    parts = [encoder.encode([captions[i] for i in rows[j:j + model_batch]]) for j in range(0, len(rows), model_batch)]
    width = max(f.shape[1] for f, _ in parts)
    pad = lambda f: torch.nn.functional.pad(f, (0, 0, 0, width - f.shape[1]))  # noqa: E731
    return {"caption": torch.cat([pad(f) for f, _ in parts]), "caption_len": torch.cat([n for _, n in parts])}


def _model_batch(opts: ExtractOptions, device: str, out: Path, overwrite: bool) -> int:
    """--model-batch, else the one the set at `out` records, else this device's default; at most --batch-size."""
    recorded = None if overwrite else _recorded_model_batch(out, device)
    return min(opts.model_batch or recorded or MODEL_BATCH.get(device, opts.batch_size), opts.batch_size)


def _recorded_model_batch(out: Path, device: str) -> int | None:
    """The model batch a set (finished, or being extracted) was made with on this device: without
    --model-batch, a re-run or resume keeps it, so a new default does not turn the command that made
    a set into "a different extraction"."""
    for made in (out / MANIFEST, out / PROGRESS / "job.json"):
        if made.is_file():
            compute = read_json(made).get("compute", {})
            return compute.get("model_batch") if compute.get("device") == device else None
    return None


def _job(opts: ExtractOptions, source, tokenizer, teachers: dict, device: str, model_batch: int, captions=None) -> dict:
    """The job's identity: everything that decides the rows, compared on resume and re-run."""
    job = {"source": {"format": source.format, "path": source.path, "fingerprint": source.fingerprint,
                       "files_fingerprint": source.files_fingerprint, "records": len(source.records),
                       "options": asdict(opts.source_options)},
            "preprocess": {"resolution": tokenizer.resolution, "crop": "center", "resample": "bicubic",
                           "teacher_view": opts.teacher_view, "max_pixels": opts.max_pixels,
                           "max_side": opts.max_side, "jpeg_draft": opts.jpeg_draft},
            "tokenizer": {**tokenizer.describe(), "code_len": tokenizer.grid[0] * tokenizer.grid[1],
                          "weights_path": str(tokenizer.weights_path.resolve())},
            "teachers": {name: t.describe() for name, t in teachers.items()},
            "layout": {"shard_size": opts.shard_size, "batch_size": opts.batch_size, "keep_images": opts.keep_images},
            "compute": {"device": device, "model_batch": model_batch, "tokenizer": tokenizer.precision,
                        "teachers": {name: t.precision for name, t in teachers.items()}}}
    if captions:
        job["caption_encoder"] = {**captions.describe(), "weights_path": str(captions.weights_path.resolve())}
        job["compute"]["caption_encoder"] = captions.precision
    return job


def _up_to_date(out: Path, job: dict, is_main: bool, log) -> JobResult:
    """A finished set re-run with the command that made it; any other command is refused."""
    previous = read_json(out / MANIFEST)
    comparable, missing = unrecorded(previous, job)
    check_same_job({k: previous.get(k) for k in comparable}, comparable, *_different_job(out))
    if missing:
        log(f"{out} was made by arra-pipe {previous.get('arra_pipe', '?')}, which did not record "
            f"{', '.join(missing)}; compared on the rest")
    if is_main:
        remove_finished_progress(out / PROGRESS)
    distributed.shutdown()
    return JobResult("up-to-date", out, previous["rows"], previous["rejects"]["total"])


def _remove(stale: list[Path]) -> None:
    """--overwrite: remove the set's own entries (set_entries_to_remove lists only what a set holds)."""
    for entry in stale:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _plan(out: Path, n_records: int, n_shards: int, opts: ExtractOptions, ranks) -> list[tuple[int, bool, list[int]]]:
    """This rank's work: (shard, last batch of the shard?, record indices) for each record batch of
    its shards not marked done; a killed run's half-written tars of those shards are removed."""
    mine = [s for s in range(ranks.rank, n_shards, ranks.world) if not (out / PROGRESS / f"{shard_name(s)}.json").exists()]
    plan = []
    for s in mine:
        for tmp in (out / SHARDS).glob(f".{shard_name(s)}.tar.tmp-*"):
            tmp.unlink()
        idx = list(range(s * opts.shard_size, min((s + 1) * opts.shard_size, n_records)))
        chunks = [idx[i:i + opts.batch_size] for i in range(0, len(idx), opts.batch_size)] or [[]]
        plan += [(s, j == len(chunks) - 1, c) for j, c in enumerate(chunks)]
    return plan


def _run(plan: list, loader, device, tokenizer, teachers: dict, model_batch: int, assemble, where: str, bar,
         captions=None) -> None:
    """The models on each planned batch, decoded ahead (`Prefetch`: on its thread when there are no
    decoding workers) and their outputs handed to the writer thread (`assemble`); `captions`: record
    indices -> caption features, when the set has them."""
    n_rejects = 0
    batches = iter(loader) if plan else iter(())  # fork the decoding workers before the threads start
    with Prefetch(batches, pin=device, depth=2) as batches, ShardWriter(where, assemble) as writer:
        for (s, last, _), (ok, crops, views, bad) in zip(plan, batches):
            outputs = HostCopy({**_forward(tokenizer, teachers, crops, views, model_batch),
                                **(captions(ok) if captions else {})}) if ok else None
            writer.put(shard_name(s), s, last, ok, bad, outputs, views.get(KEPT))
            n_rejects += len(bad)
            bar.update(len(ok) + len(bad))
            bar.set_postfix(rejects=n_rejects, refresh=False)
    bar.close()


def _forward(tokenizer, teachers: dict, crops, views: dict, model_batch: int) -> dict:
    """Codes and teacher features of one record batch, the models run on `model_batch` images at a time."""
    parts = [{"codes": tokenizer.encode(crops[i:i + model_batch]).view(len(crops[i:i + model_batch]), -1),
              **{feature_column(n): t(views[t.input_size][i:i + model_batch]) for n, t in teachers.items()}}
             for i in range(0, len(crops), model_batch)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class _ShardAssembler:
    """Turns each batch's model outputs into a record batch and, after a shard's last batch, writes
    the shard, its kept crops and its progress record (on the writer thread)."""

    def __init__(self, out: Path, records, schema, teachers: list[str], fixed_row_bytes: int, keep_images: bool,
                 caption_encoder: dict | None = None):
        self.out, self.records, self.schema, self.teachers = out, records, schema, teachers
        self.fixed_row_bytes, self.keep_images = fixed_row_bytes, keep_images
        self.image_field = column_field(IMAGE, {"kind": "image"})
        self.caption_field = caption_encoder and column_field(caption_column(caption_encoder["name"]),
                                                              {"kind": "caption", "caption_encoder": caption_encoder})
        self._new_shard()

    def _new_shard(self) -> None:
        self.batches, self.images, self.captions, self.rejects, self.payload = [], [], [], [], 0
        self.sums = dict.fromkeys(self.teachers, EMPTY_SUMS)

    def __call__(self, s: int, last: bool, ok: list[int], bad: list, outputs: HostCopy | None, kept) -> None:
        records = self.records
        if ok:
            ok, bad, codes, feats, kept, captions = self._finite(ok, bad, outputs.numpy(), kept)
        self.rejects += [{"key": records[i].key, "origin": records[i].origin, "reason": reason} for i, reason in sorted(bad)]
        if ok:
            self.sums = {n: add_sums(self.sums[n], feature_sums(feats[n])) for n in self.teachers}
            self.payload += sum(self.fixed_row_bytes + len(records[i].key.encode()) + len(records[i].caption.encode())
                                for i in ok)
            self.batches.append(make_batch(self.schema, [records[i].key for i in ok], [records[i].caption for i in ok],
                                           [records[i].label for i in ok], codes, feats))
            if self.keep_images:
                self.images.append(make_column_batch([records[i].key for i in ok], self.image_field, kept))
            if self.caption_field:
                self.captions.append(make_column_batch([records[i].key for i in ok], self.caption_field, captions))
        if last:
            name = shard_name(s)
            entry = write_shard(self.out / SHARDS / f"{name}.tar", self.batches)
            columns = {"image_shard": (IMAGE, self.images) if self.keep_images else None,
                       "caption_shard": (self.caption_field.name, self.captions) if self.caption_field else None}
            atomic_write_json(self.out / PROGRESS / f"{name}.json",
                              {**entry, "payload_bytes": self.payload, "rejects": self.rejects, "feature_sums": self.sums,
                               **{k: c and write_shard(self.out / COLUMNS / c[0] / f"{name}.tar", c[1], f"{COLUMNS}/{c[0]}/{name}.tar")
                                  for k, c in columns.items()}})
            self._new_shard()

    def _finite(self, ok: list[int], bad: list, arrays: dict, kept):
        """Rows whose teacher features are NaN or inf as stored (float16) become rejects instead of
        rows: such a target trains as a NaN loss, and every reader refuses a shard holding one."""
        with np.errstate(over="ignore"):  # what float16 cannot hold becomes inf, found below
            feats = {n: arrays[feature_column(n)].astype(np.float16) for n in self.teachers}
        why: dict[int, str] = {}
        captions = None
        if self.caption_field:
            with np.errstate(over="ignore"):
                captions = [f[:n].astype(np.float16) for f, n in zip(arrays["caption"], arrays["caption_len"].tolist())]
            for j in [j for j, f in enumerate(captions) if not np.isfinite(f).all()]:
                why.setdefault(j, "non-finite-feature: caption encoder gave NaN, inf or values beyond float16's range")
        for n in self.teachers:
            raw = arrays[feature_column(n)]
            for j in np.flatnonzero(~np.isfinite(feats[n]).all(axis=1)).tolist():
                what = "NaN" if np.isnan(raw[j]).any() else "inf" if np.isinf(raw[j]).any() else "values beyond float16's range"
                why.setdefault(j, f"non-finite-feature: teacher {n} gave {what}")
        keep = [j for j in range(len(ok)) if j not in why]
        return ([ok[j] for j in keep], bad + [(ok[j], reason) for j, reason in why.items()], arrays["codes"][keep],
                {n: f[keep] for n, f in feats.items()}, kept and [kept[j] for j in keep],
                captions and [captions[j] for j in keep])


def _finish(out: Path, job: dict, schema, source, n_shards: int, max_reject_rate: float, throughput: dict) -> JobResult:
    """Merge every shard's progress record into rejects.jsonl and manifest.json (rank 0). `throughput`
    (how the CPUs were split) is recorded outside the job: it is no part of what a resume compares."""
    progress = out / PROGRESS
    done = []
    for s in range(n_shards):
        p = progress / f"{shard_name(s)}.json"
        if not p.exists():
            raise JobError(f"{out}: shard {s} was not finished by its rank; re-run the same command to resume")
        done.append(read_json(p))
    rejects = [r for d in done for r in d["rejects"]]
    by_reason: dict[str, int] = {}
    for r in rejects:
        category = r["reason"].split(":", 1)[0]
        by_reason[category] = by_reason.get(category, 0) + 1
    atomic_write_bytes(out / REJECTS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects).encode("utf-8"))
    inputs = len(source.records)
    rate = len(rejects) / inputs if inputs else 0.0
    if rate > max_reject_rate:
        raise JobError(f"{len(rejects)} of {inputs} records rejected ({rate:.1%}), more than --max-reject-rate "
                           f"{max_reject_rate:.1%}; reasons {by_reason}; see {out / REJECTS}")
    stats = {name: summarize(functools.reduce(add_sums, (d["feature_sums"][name] for d in done))) for name in job["teachers"]}
    manifest = {"format": FORMAT, "version": VERSION, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "arra_pipe": __version__, "packages": packages(), **job, "feature_stats": stats,
                "schema": schema_fields(schema), "rows": sum(d["rows"] for d in done),
                "shards": [{k: d[k] for k in ("name", "rows", "bytes", "sha256")} for d in done],
                "payload_bytes": sum(d["payload_bytes"] for d in done),
                "labels": {"classes": max((r.label for r in source.records), default=-1) + 1,
                           "unlabelled": sum(r.label < 0 for r in source.records)},
                "rejects": {"total": len(rejects), "by_reason": by_reason, "file": REJECTS},
                "skipped": source.skipped, "throughput": throughput}
    if job["layout"]["keep_images"]:
        _column_manifest(out, manifest, IMAGE, [d["image_shard"] for d in done],
                         {"kind": "image", "encoding": "png", "resolution": job["preprocess"]["resolution"]})
    if "caption_encoder" in job:
        _column_manifest(out, manifest, caption_column(job["caption_encoder"]["name"]), [d["caption_shard"] for d in done],
                         {"kind": "caption", "caption_encoder": job["caption_encoder"]})
    atomic_write_json(out / MANIFEST, manifest)
    shutil.rmtree(progress)
    return JobResult("extracted", out, manifest["rows"], len(rejects))



def _column_manifest(out: Path, manifest: dict, name: str, shards: list[dict], column: dict) -> None:
    """The manifest of a column extract wrote beside the shards (`column`: its kind and what made it)."""
    atomic_write_json(out / COLUMNS / name / MANIFEST, {
        "format": COLUMN_FORMAT, "version": VERSION, "name": name, **column,
        "schema": schema_fields(pa.schema([column_field(name, column)])),
        "rows": sum(e["rows"] for e in shards), "shards": shards, "shards_sha256": shards_digest(manifest["shards"])})
