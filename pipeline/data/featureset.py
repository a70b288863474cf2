"""The feature set: the contract between extraction and every later stage.

    <set>/manifest.json   provenance, schema, shard list with rows/bytes/sha256, stats
    <set>/shards/*.tar    WebDataset shards; each member `NNNNN.arrow` is one Arrow IPC stream
                          holding one record batch of many rows
    <set>/rejects.jsonl   every input row that was not extracted, with its reason
    <set>/columns/<name>/ columns added later (a teacher extracted afterwards, the kept canonical
                          crops `image`, or a caption encoder's features `caption.<encoder>`,
                          written beside the shards by extract): `manifest.json` plus one tar per shard with
                          the same member names, each member holding `key` and the column, with
                          the same keys in the same order as the shard's member

Columns: `key`, `caption`, `label` (int32, -1 when none), `codes` (fixed-size list of uint16, or
uint32 for codebooks over 65536), one `feat.<teacher>` (fixed-size list of float16) per teacher;
`image` (PNG bytes) when kept; `caption.<encoder>` (a list of float16 fixed-size lists: one per
caption token, at most the encoder's max_tokens) with --caption-encoder. Plain `webdataset` + `pyarrow` read it: each sample's "arrow" field
is an IPC stream. `FeatureSet` joins the added columns to the shards' rows and refuses a column
whose keys do not line up.

Every tar is checked as `FeatureSet` reads it, before any of its rows is handed out: it is read
whole (a tar is written whole too) and its size, sha256, members' schema, row count and the
finiteness of its teacher features are compared with the manifest. `check_files` is the cheap
up-front part (present, size) for a reader that starts late, such as training after its model
is built. A damaged manifest is named with the key it lacks.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.errors import ArraError
from pipeline.data.files import atomic_write_bytes, read_json
from pipeline.data.lock import LOCK
from pipeline.data.remote import RemoteDir, file_size, set_path

FORMAT = "arra-pipe-featureset"
VERSION = 1
MANIFEST = "manifest.json"
SHARDS = "shards"
REJECTS = "rejects.jsonl"
COLUMNS = "columns"
COLUMN_FORMAT = "arra-pipe-column"
IMAGE = "image"
PROGRESS = "progress"  # an unfinished extraction's job file and per-shard done markers
STATS = "stats"  # caches of later stages (eval's Inception features of the set's images)
OWN_ENTRIES = (MANIFEST, REJECTS, SHARDS, COLUMNS, PROGRESS, STATS)


class FeatureSetError(ArraError):
    """A feature set is missing, incomplete or does not match what the caller needs."""


class Manifest(dict):
    """A manifest's JSON object (and each object in it): a key it lacks raises FeatureSetError
    naming the file and the key, where a plain dict would give a bare KeyError deep in a stage."""

    def __init__(self, items: dict, file: Path, where: str = ""):
        super().__init__((k, _wrap(v, file, f"{where}{k}")) for k, v in items.items())
        self.file, self.where = file, where

    def __missing__(self, key):
        raise FeatureSetError(f"{self.file}: no key '{self.where}{key}'; the manifest is damaged or was edited: "
                              "restore it, or re-extract the set")


def _wrap(value, file: Path, where: str):
    if isinstance(value, dict):
        return Manifest(value, file, f"{where}.")
    if isinstance(value, list):
        return [_wrap(v, file, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def read_manifest(path: Path) -> Manifest:
    """A set's or column's manifest.json; a truncated or non-JSON file is refused by name."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8")) if isinstance(path, RemoteDir) else read_json(path)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise FeatureSetError(f"{path}: not a readable manifest ({exc}); restore it, or re-extract the set") from None
    if not isinstance(data, dict):
        raise FeatureSetError(f"{path}: not a manifest (a JSON {type(data).__name__}, not an object)")
    return Manifest(data, path)


def feature_column(teacher: str) -> str:
    return f"feat.{teacher}"


def caption_column(encoder: str) -> str:
    """The column (and folder under columns/) of a caption encoder's per-token features."""
    return f"caption.{encoder}"


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


def column_field(name: str, column: dict) -> pa.Field:
    """The Arrow field of an added column, from its manifest."""
    if column["kind"] == "teacher":
        return pa.field(feature_column(name), pa.list_(pa.float16(), column["teacher"]["dim"]), nullable=False)
    if column["kind"] == "caption":
        return pa.field(name, pa.list_(pa.list_(pa.float16(), column["caption_encoder"]["dim"])), nullable=False)
    return pa.field(IMAGE, pa.binary(), nullable=False)


def make_column_batch(keys, field: pa.Field, values) -> pa.RecordBatch:
    """One member of an added column: the shard member's keys and the column's values."""
    array = (fixed_list(np.asarray(values).astype(np.float16), pa.float16()) if pa.types.is_fixed_size_list(field.type)
             else token_lists(values, field.type.value_type.list_size) if pa.types.is_list(field.type)
             else pa.array(values, pa.binary()))
    schema = pa.schema([pa.field("key", pa.string(), nullable=False), field])
    return pa.RecordBatch.from_arrays([pa.array(keys, pa.string()), array], schema=schema)


def token_lists(rows: list[np.ndarray], dim: int) -> pa.ListArray:
    """Variable-length rows of `dim`-wide float16 vectors (one per token) as one list array."""
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int32)
    flat = np.concatenate([np.asarray(r, dtype=np.float16).reshape(-1, dim) for r in rows]) if rows else np.zeros((0, dim), np.float16)
    return pa.ListArray.from_arrays(pa.array(offsets), fixed_list(flat, pa.float16()))


def token_rows(column: pa.Array) -> list[np.ndarray]:
    """A `token_lists` column back as one (tokens x dim) float16 array per row (views, no copy)."""
    dim = column.type.value_type.list_size
    flat = column.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    offsets = (column.offsets.to_numpy() - column.offsets[0].as_py()).tolist()
    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def keys_mismatch(keys: pa.Array, expected: pa.Array) -> str | None:
    """Why two key columns do not line up (None when they do)."""
    if keys.equals(expected):
        return None
    if len(keys) != len(expected):
        return f"{len(keys)} rows where the shard has {len(expected)}"
    row = next(i for i, (a, b) in enumerate(zip(keys.to_pylist(), expected.to_pylist())) if a != b)
    return f"row {row} has key {keys[row].as_py()!r} where the shard has {expected[row].as_py()!r}"


def batch_to_ipc(batch: pa.RecordBatch) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def write_shard(path: Path, batches: list[pa.RecordBatch], name: str | None = None) -> dict:
    """Write batches as one tar (member i = `{i:05d}.arrow`) atomically; return its manifest entry
    (`name`: its path inside the set, default `shards/<file>`). Tar headers carry fixed owner and
    mtime, so the same rows always give the same bytes."""
    import webdataset as wds
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0, user="arra", group="arra", encoder=False) as sink:
        for i, batch in enumerate(batches):
            sink.write({"__key__": f"{i:05d}", "arrow": batch_to_ipc(batch)})
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return {"name": name or f"{SHARDS}/{path.name}", "rows": sum(b.num_rows for b in batches),
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_shard(path: Path) -> Iterator[pa.RecordBatch]:
    """Record batches of one shard, in member order."""
    for _, batch in read_members(path):
        yield batch


def read_members(path: Path) -> Iterator[tuple[str, pa.RecordBatch]]:
    """(member name, record batch) of one shard or column tar, in member order."""
    with tarfile.open(path, "r:") as tf:
        for member in tf:
            if member.isfile() and member.name.endswith(".arrow"):
                with pa.ipc.open_stream(tf.extractfile(member).read()) as reader:
                    for batch in reader:
                        yield member.name, batch


def check_tar(root: Path, entry: dict, fields: dict[str, str]) -> tuple[list[tuple[str, pa.RecordBatch]], list[str]]:
    """Read the tar of manifest `entry` whole and check it: present, size, sha256, readable, each
    member's schema against `fields`, finite teacher features (naming row keys), row count.
    Returns its (member, batch) list and the problems found, each starting with the tar's name.
    A set at a URL (`root` a RemoteDir) fetches it with retries and checks size and sha256 there."""
    name = entry["name"]
    if isinstance(root, RemoteDir):
        data, problems = root.fetch_checked(name, entry["bytes"], entry["sha256"])
        if problems:
            return [], problems
    else:
        try:
            data = (root / name).read_bytes()
        except FileNotFoundError:
            return [], [f"{name}: missing"]
        except OSError as exc:
            return [], [f"{name}: unreadable ({type(exc).__name__}: {exc})"]
        problems = []
        if len(data) != entry["bytes"]:
            problems.append(f"{name}: {len(data)} bytes on disk, manifest says {entry['bytes']} (truncated or replaced)")
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            problems.append(f"{name}: sha256 {digest[:16]}... differs from the manifest's {entry['sha256'][:16]}...")
        if problems:  # bytes known to be wrong are not parsed
            return [], problems
    members, buffer = [], pa.py_buffer(data)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for member in tf:
                if member.isfile() and member.name.endswith(".arrow"):
                    with pa.ipc.open_stream(buffer.slice(member.offset_data, member.size)) as reader:
                        for batch in reader:
                            batch.validate(full=True)  # offsets in bounds, even in a crafted file
                            if (got := schema_fields(batch.schema)) != fields:
                                diff = sorted(set(got.items()) ^ set(fields.items()))
                                return [], [f"{name}: schema differs from the manifest: {diff}"]
                            members.append((member.name, batch))
    except (tarfile.TarError, pa.ArrowException, OSError, EOFError, UnicodeDecodeError) as exc:  # OSError: Arrow's IOError
        return [], [f"{name}: unreadable ({type(exc).__name__}: {exc})"]
    problems = [f"{name}: {why}" for _, batch in members for why in _non_finite(batch)]
    rows = sum(b.num_rows for _, b in members)
    if rows != entry["rows"]:
        problems.append(f"{name}: {rows} rows, manifest says {entry['rows']}")
    return members, problems


def _non_finite(batch: pa.RecordBatch) -> list[str]:
    """Teacher columns of `batch` holding NaN or inf, with the keys of their first rows: such a target
    would train as a NaN loss and break every distance computed on it."""
    out = []
    for name in batch.schema.names:
        if name.startswith(("feat.", "caption.")):
            column = batch.column(name)
            bad = np.flatnonzero([not np.isfinite(r).all() for r in token_rows(column)] if name.startswith("caption.") else
                                 ~np.isfinite(column.flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, -1)).all(axis=1))
            if len(bad):
                out.append(f"{len(bad)} rows have non-finite {name} values, e.g. "
                           f"{[batch.column('key')[int(i)].as_py() for i in bad[:3]]}")
    return out


def shards_digest(shards: list[dict]) -> str:
    """One sha256 for a set's shards: a column records it to say which shards it lines up with."""
    return hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()


def set_entries_to_remove(path: str | Path, source: str | Path | None) -> list[Path]:
    """What `extract --overwrite` may delete at `path`: the entries of an arra-pipe set, nothing else.
    Refused (FeatureSetError) unless the folder is missing, empty or holds a set (finished or not),
    and whenever it is or holds the source or the working directory. Other files stay."""
    path = Path(path)
    if not path.exists():
        return []
    where = path.resolve()
    for what, other in (("the source", source), ("the working directory", Path.cwd())):
        if other is not None and Path(other).resolve().is_relative_to(where):
            raise FeatureSetError(f"--overwrite refused: {path} is or holds {what} ({other}); nothing was deleted")
    if not path.is_dir():
        raise FeatureSetError(f"--overwrite refused: {path} is not a folder; nothing was deleted")
    if any(p.name != LOCK for p in path.iterdir()) and not (_is_set_manifest(path / MANIFEST)
                                                           or (path / PROGRESS / "job.json").is_file()):
        raise FeatureSetError(f"--overwrite refused: {path} holds files but no arra-pipe feature set "
                              f"({MANIFEST} or {PROGRESS}/job.json); it deletes only sets it made. Nothing was deleted")
    return [path / name for name in OWN_ENTRIES if (path / name).exists() or (path / name).is_symlink()]


def _is_set_manifest(path: Path) -> bool:
    try:
        return read_json(path).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class FeatureSet:
    """A finished feature set (its manifest exists) in a folder, or at a URL (`path` a RemoteDir,
    see pipeline/data/remote.py; its str() hides credentials)."""

    path: Path | RemoteDir
    manifest: dict
    _listed: dict | None = field(default=None, repr=False, compare=False)  # a remote set's columns, listed once

    @classmethod
    def open(cls, path: str | Path) -> "FeatureSet":
        path = set_path(path)
        if not (path / MANIFEST).is_file():
            hint = " (extraction has not finished: re-run it to resume)" if (path / SHARDS).is_dir() else ""
            raise FeatureSetError(f"{path}: no {MANIFEST}; not a finished feature set{hint}")
        manifest = read_manifest(path / MANIFEST)
        if manifest.get("format") != FORMAT:
            raise FeatureSetError(f"{path / MANIFEST}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
        if manifest.get("version", 0) > VERSION:
            raise FeatureSetError(f"{path / MANIFEST}: version {manifest['version']} is newer than this arra-pipe reads ({VERSION})")
        return cls(path, manifest)

    @property
    def rows(self) -> int:
        """The shards' row counts, each of which is checked when its shard is read."""
        return sum(s["rows"] for s in self.manifest["shards"])

    @property
    def teachers(self) -> dict[str, dict]:
        """Every teacher of the set: those of the first extraction and those added as columns."""
        added = {name: c["teacher"] for name, c in self.columns.items() if c["kind"] == "teacher"}
        return {**self.manifest["teachers"], **added}

    @property
    def captions(self) -> dict[str, dict]:
        """Caption-feature columns by column name (`caption.<encoder>`): the encoder's record each."""
        return {name: c["caption_encoder"] for name, c in self.columns.items() if c["kind"] == "caption"}

    @property
    def columns(self) -> dict[str, dict]:
        """Finished added columns by name (a column being added has no manifest yet and is not read)."""
        if self._listed is not None:
            return self._listed
        found = {p.parent.name: read_manifest(p) for p in sorted((self.path / COLUMNS).glob(f"*/{MANIFEST}"))}
        if isinstance(self.path, RemoteDir):  # a URL is read, never written: list it once
            self._listed = found
        return found

    def stats_dir(self) -> Path:
        """Where later stages cache what they compute from the set (eval's Inception features):
        `<set>/stats`, or for a set at a URL (never written) a local folder keyed by its shards,
        under the cache folder (ARRA_PIPE_CACHE) or else the temporary folder."""
        if not isinstance(self.path, RemoteDir):
            return self.path / STATS
        import tempfile
        from pipeline.data.remote import cache_dir
        where = (cache_dir() or Path(tempfile.gettempdir()) / "arra-pipe-cache") / STATS / shards_digest(self.manifest["shards"])[:24]
        where.mkdir(parents=True, exist_ok=True)
        return where

    def shard_paths(self) -> list[Path]:
        return [self.path / s["name"] for s in self.manifest["shards"]]

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Rows of every shard with the added `columns` joined (default: all of them)."""
        for index in range(len(self.manifest["shards"])):
            if index + 1 < len(self.manifest["shards"]):
                self.prefetch(index + 1, columns)
            yield from self.shard_batches(index, columns)

    def shard_batches(self, index: int, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Rows of shard `index` with the added `columns` joined, member by member. Every tar is
        checked whole (`check_tar`) before its first row is yielded, so no row of a damaged tar is
        ever used; raises FeatureSetError naming the tar, or a column whose members or keys do not
        line up with the shard's."""
        added = self.columns
        names = self.column_names(columns)
        schema = self.schema(names)
        shard = self.manifest["shards"][index]["name"]
        parts = {n: iter(self._read(added[n]["shards"][index], n)) for n in names}
        for member, batch in self._read(self.manifest["shards"][index]):
            arrays = list(batch.columns)
            for n, part in parts.items():
                got_member, got = next(part, (None, None))
                problem = (f"no member {member}" if got_member is None else
                           f"member {got_member} where the shard has {member}" if got_member != member else
                           keys_mismatch(got.column(0), batch.column(0)))
                if problem:
                    raise FeatureSetError(f"{added[n]['shards'][index]['name']}: does not line up with {shard}: {problem}")
                arrays.append(got.column(1))
            yield pa.RecordBatch.from_arrays(arrays, schema=schema)
        for n, part in parts.items():
            if next(part, None) is not None:
                raise FeatureSetError(f"{added[n]['shards'][index]['name']}: more members than {shard}")

    def prefetch(self, index: int, columns: list[str] | None = None) -> None:
        """A set at a URL starts fetching shard `index` (and its tars of the added `columns`) in the
        background, for a reader that reads it next; a local set does nothing."""
        if isinstance(self.path, RemoteDir):
            entries = [self.manifest["shards"][index]]
            entries += [self.columns[n]["shards"][index] for n in self.column_names(columns)]
            for e in entries:
                self.path.prefetch(e["name"], e["bytes"], e["sha256"])

    def _read(self, entry: dict, column: str | None = None) -> list[tuple[str, pa.RecordBatch]]:
        """The checked members of a tar of the set (a shard, or a tar of added `column`)."""
        members, problems = check_tar(self.path, entry, self._fields(column))
        if problems:
            raise self._damaged(problems[0], column)
        return members

    def check_files(self, index: int, columns: list[str]) -> None:
        """Shard `index` and its tars of the added `columns` are present at their manifest size: a
        stat each, cheap enough to run on every shard before a long job starts (their content is
        checked as they are read)."""
        entries = [(self.manifest["shards"][index], None)]
        if columns:
            entries += [(self.columns[n]["shards"][index], n) for n in self.column_names(columns)]
        for entry, column in entries:
            size = file_size(self.path / entry["name"], entry)
            if size is None:
                raise self._damaged(f"{entry['name']}: missing", column)
            if size != entry["bytes"]:
                raise self._damaged(f"{entry['name']}: {size} bytes on disk, manifest says "
                                    f"{entry['bytes']} (truncated or replaced)", column)

    def _damaged(self, problem: str, column: str | None) -> FeatureSetError:
        fix = (f"remove {self.path / COLUMNS / column} and add the column again"
               if column and column != IMAGE and self.columns[column]["kind"] == "teacher"
               else "re-extract the set (extract --overwrite)")
        return FeatureSetError(f"{self.path}/{problem}; `arra-pipe verify {self.path}` lists every damaged file; {fix}")

    def _fields(self, column: str | None = None) -> dict[str, str]:
        """Column name -> type of the members of a shard, or of a tar of added `column`."""
        if column is None:
            return schema_fields(self.schema([]))
        return {"key": "string", **schema_fields(pa.schema([column_field(column, self.columns[column])]))}

    def column_names(self, columns: list[str] | None = None) -> list[str]:
        """The added columns to join (default all): teachers, caption features, `image`, as in the schema."""
        added = self.columns
        names = list(added) if columns is None else list(columns)
        unknown = sorted(set(names) - set(added))
        if unknown:
            raise FeatureSetError(f"{self.path}: no added column {unknown}; it has {sorted(added)}")
        return sorted(names, key=lambda n: ("teacher", "caption").index(added[n]["kind"]) if n != IMAGE else 2)

    def table(self, columns: list[str] | None = None) -> pa.Table:
        return pa.Table.from_batches(list(self.batches(columns)), schema=self.schema(columns))

    def schema(self, columns: list[str] | None = None) -> pa.Schema:
        """Schema of the joined rows: the shards' columns, then the added `columns` (default: all)."""
        m, added = self.manifest, self.columns
        names = self.column_names(columns)
        dims = {t: d["dim"] for t, d in m["teachers"].items()}
        dims.update({n: added[n]["teacher"]["dim"] for n in names if added[n]["kind"] == "teacher"})
        schema = make_schema(m["tokenizer"]["code_len"], m["tokenizer"]["codebook_size"], m["tokenizer"]["grid"], dims)
        for n in names:
            if added[n]["kind"] == "caption":
                schema = schema.append(column_field(n, added[n]))
        return schema.append(column_field(IMAGE, added[IMAGE])) if IMAGE in names else schema

    def rejects(self) -> list[dict]:
        p = self.path / REJECTS
        return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()] if p.exists() else []

    def verify(self) -> list[str]:
        """Re-check every shard and every added column's tars as a reader does (`check_tar`), and
        for columns that member names and keys line up with the shard; and that rejects.jsonl holds
        the rejects the manifest counts. Returns the problems found, each naming the file; empty
        when the set is intact."""
        try:
            return self._verify()
        except FeatureSetError as exc:  # a manifest that lacks a key: nothing further can be compared
            return [str(exc)]

    def _verify(self) -> list[str]:
        problems, keys = self._rejects_problems(), {}
        expected = self._fields()
        for entry in self.manifest["shards"]:
            members, found = check_tar(self.path, entry, expected)
            problems += found
            keys[entry["name"]] = [(m, b.column("key")) for m, b in members]
        problems += _unlisted(self.path, SHARDS, self.manifest["shards"])
        digest = shards_digest(self.manifest["shards"])
        for name, column in self.columns.items():
            where = f"{COLUMNS}/{name}"
            if column.get("shards_sha256") != digest:
                problems.append(f"{where}: made for other shards than this set's (shards_sha256 differs); remove it and add it again")
                continue
            if len(column["shards"]) != len(self.manifest["shards"]):
                problems.append(f"{where}: {len(column['shards'])} tars for {len(self.manifest['shards'])} shards")
                continue
            fields = self._fields(name)
            for entry, shard in zip(column["shards"], self.manifest["shards"]):
                members, found = check_tar(self.path, entry, fields)
                problems += found + (_alignment(entry["name"], members, keys[shard["name"]]) if members else [])
            problems += _unlisted(self.path, where, column["shards"])
        return problems

    def _rejects_problems(self) -> list[str]:
        """rejects.jsonl is present, readable and holds as many rejects as the manifest counts."""
        total = self.manifest["rejects"]["total"]
        if not (self.path / REJECTS).is_file():
            return [f"{REJECTS}: missing (the manifest counts {total} rejects)"]
        try:
            found = len(self.rejects())
        except ValueError as exc:  # not UTF-8, or a line that is not JSON
            return [f"{REJECTS}: unreadable ({exc})"]
        return [] if found == total else [f"{REJECTS}: {found} rejects, manifest says {total}"]


def _alignment(name: str, members: list[tuple[str, pa.RecordBatch]], reference: list[tuple[str, pa.Array]]) -> list[str]:
    """Problems of a column tar whose member names or keys do not line up with its shard's."""
    if [m for m, _ in members] != [m for m, _ in reference]:
        return [f"{name}: members {[m for m, _ in members][:4]}... do not match the shard's {[m for m, _ in reference][:4]}..."]
    for (member, batch), (_, want) in zip(members, reference):
        if (why := keys_mismatch(batch.column("key"), want)) is not None:
            return [f"{name}: member {member} does not line up with the shard: {why}"]
    return []


def _unlisted(root: Path, folder: str, entries: list[dict]) -> list[str]:
    listed = {e["name"] for e in entries}
    return [f"{folder}/{p.name}: on disk but not in the manifest"
            for p in sorted((root / folder).glob("*.tar")) if f"{folder}/{p.name}" not in listed]
