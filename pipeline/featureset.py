"""The feature set: the contract between extraction and every later stage.

    <set>/manifest.json   provenance, schema, shard list with rows/bytes/sha256, stats
    <set>/shards/*.tar    WebDataset shards; each member `NNNNN.arrow` is one Arrow IPC stream
                          holding one record batch of many rows
    <set>/rejects.jsonl   every input row that was not extracted, with its reason

Columns: `key`, `caption`, `label` (int32, -1 when none), `codes` (fixed-size list of uint16, or
uint32 for codebooks over 65536), one `feat.<teacher>` (fixed-size list of float16) per teacher.
Plain `webdataset` + `pyarrow` read it: each sample's "arrow" field is an IPC stream.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.files import atomic_write_bytes, read_json, sha256_file

FORMAT = "arra-pipe-featureset"
VERSION = 1
MANIFEST = "manifest.json"
SHARDS = "shards"
REJECTS = "rejects.jsonl"


class FeatureSetError(ValueError):
    """A feature set is missing, incomplete or does not match what the caller needs."""


def feature_column(teacher: str) -> str:
    return f"feat.{teacher}"


def codes_type(codebook_size: int) -> pa.DataType:
    return pa.uint16() if codebook_size <= 1 << 16 else pa.uint32()


def make_schema(code_len: int, codebook_size: int, grid, teacher_dims: dict[str, int]) -> pa.Schema:
    fields = [pa.field("key", pa.string(), nullable=False),
              pa.field("caption", pa.string(), nullable=False),
              pa.field("label", pa.int32(), nullable=False),
              pa.field("codes", pa.list_(codes_type(codebook_size), code_len), nullable=False)]
    fields += [pa.field(feature_column(t), pa.list_(pa.float16(), d), nullable=False)
               for t, d in teacher_dims.items()]
    meta = {"arra_pipe": json.dumps({"grid": list(grid), "codebook_size": codebook_size,
                                     "teacher_dims": teacher_dims})}
    return pa.schema(fields, metadata=meta)


def schema_fields(schema: pa.Schema) -> dict[str, str]:
    """Column name -> type string, as stored in the manifest and compared by `verify`."""
    return {f.name: str(f.type) for f in schema}


def fixed_list(values: np.ndarray, type_: pa.DataType) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=type_), values.shape[1])


def make_batch(schema: pa.Schema, keys, captions, labels, codes: np.ndarray, feats: dict[str, np.ndarray]) -> pa.RecordBatch:
    arrays = [pa.array(keys, pa.string()), pa.array(captions, pa.string()),
              pa.array(np.asarray(labels, dtype=np.int32)),
              fixed_list(codes, schema.field("codes").type.value_type)]
    arrays += [fixed_list(feats[name[len("feat."):]].astype(np.float16), pa.float16())
               for name in schema.names[4:]]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def batch_to_ipc(batch: pa.RecordBatch) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def write_shard(path: Path, batches: list[pa.RecordBatch]) -> dict:
    """Write batches as one tar (member i = `{i:05d}.arrow`) atomically; return its manifest entry.
    Tar headers carry fixed owner and mtime, so the same rows always give the same bytes."""
    import webdataset as wds
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0, user="arra", group="arra", encoder=False) as sink:
        for i, batch in enumerate(batches):
            sink.write({"__key__": f"{i:05d}", "arrow": batch_to_ipc(batch)})
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return {"name": f"{SHARDS}/{path.name}", "rows": sum(b.num_rows for b in batches),
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_shard(path: Path) -> Iterator[pa.RecordBatch]:
    """Record batches of one shard, in member order."""
    with tarfile.open(path, "r:") as tf:
        for member in tf:
            if member.isfile() and member.name.endswith(".arrow"):
                with pa.ipc.open_stream(tf.extractfile(member).read()) as reader:
                    yield from reader


@dataclass
class FeatureSet:
    """A finished feature set on disk (its manifest exists)."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> "FeatureSet":
        path = Path(path)
        if not (path / MANIFEST).is_file():
            hint = " (extraction has not finished: re-run it to resume)" if (path / SHARDS).is_dir() else ""
            raise FeatureSetError(f"{path}: no {MANIFEST}; not a finished feature set{hint}")
        manifest = read_json(path / MANIFEST)
        if manifest.get("format") != FORMAT:
            raise FeatureSetError(f"{path / MANIFEST}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
        if manifest.get("version", 0) > VERSION:
            raise FeatureSetError(f"{path / MANIFEST}: version {manifest['version']} is newer than this arra-pipe reads ({VERSION})")
        return cls(path, manifest)

    @property
    def rows(self) -> int:
        return self.manifest["rows"]

    @property
    def teachers(self) -> dict[str, dict]:
        return self.manifest["teachers"]

    def shard_paths(self) -> list[Path]:
        return [self.path / s["name"] for s in self.manifest["shards"]]

    def batches(self) -> Iterator[pa.RecordBatch]:
        for p in self.shard_paths():
            yield from read_shard(p)

    def table(self) -> pa.Table:
        return pa.Table.from_batches(list(self.batches()), schema=self.schema())

    def schema(self) -> pa.Schema:
        m = self.manifest
        return make_schema(m["tokenizer"]["code_len"], m["tokenizer"]["codebook_size"], m["tokenizer"]["grid"],
                           {t: d["dim"] for t, d in m["teachers"].items()})

    def rejects(self) -> list[dict]:
        p = self.path / REJECTS
        return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()] if p.exists() else []

    def verify(self) -> list[str]:
        """Re-check every shard: present, size, sha256, readable, schema, row count.
        Returns the problems found, each naming the shard; empty when the set is intact."""
        problems = []
        expected = schema_fields(self.schema())
        for entry in self.manifest["shards"]:
            p = self.path / entry["name"]
            if not p.is_file():
                problems.append(f"{entry['name']}: missing")
                continue
            size = p.stat().st_size
            if size != entry["bytes"]:
                problems.append(f"{entry['name']}: {size} bytes on disk, manifest says {entry['bytes']} (truncated or replaced)")
            digest = sha256_file(p)
            if digest != entry["sha256"]:
                problems.append(f"{entry['name']}: sha256 {digest[:16]}... differs from the manifest's {entry['sha256'][:16]}...")
            try:
                rows = 0
                for batch in read_shard(p):
                    got = schema_fields(batch.schema)
                    if got != expected:
                        diff = sorted(set(got.items()) ^ set(expected.items()))
                        problems.append(f"{entry['name']}: schema differs from the manifest: {diff}")
                        break
                    rows += batch.num_rows
                else:
                    if rows != entry["rows"]:
                        problems.append(f"{entry['name']}: {rows} rows, manifest says {entry['rows']}")
            except (tarfile.TarError, pa.ArrowInvalid, OSError, EOFError) as exc:
                problems.append(f"{entry['name']}: unreadable ({type(exc).__name__}: {exc})")
        listed = {s["name"] for s in self.manifest["shards"]}
        for p in sorted((self.path / SHARDS).glob("*.tar")):
            if f"{SHARDS}/{p.name}" not in listed:
                problems.append(f"{SHARDS}/{p.name}: on disk but not in the manifest")
        return problems
