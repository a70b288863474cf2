"""Input datasets, read into one flat, ordered list of `Record`s.

Five formats are understood (auto-detected, `--source-format` overrides): ARRA/Lumina-mGPT
conversation JSON, image folders, tables (CSV/TSV/JSONL/Parquet), img2dataset output folders and
Fashion-MNIST idx files. Reading a source never decodes an image; records that are already known
to be bad (duplicate key, caption that is not UTF-8, ...) carry a `reject` reason and flow through
extraction like the others, so that every input row ends up either in a shard or in rejects.

What is read: a folder source (image folder, img2dataset or Fashion-MNIST folder) is read only
inside the folder. A file in it that is a symlink leading outside (an image, a `.txt` caption, a
tar, parquet or idx file) is not followed unless `follow_symlinks` (--follow-symlinks): an image
or caption makes its record an `outside-root` reject, a tar, parquet or idx file stops the read
with a `SourceError`; links to folders are never walked. Images that a conversation JSON or a
table names were named on purpose and may be anywhere. Whatever the source, only regular files
are opened (a FIFO, device or folder is a `not-a-file` reject, found without blocking on it), and
no file of more than `max_file_bytes` (--max-file-bytes) is read.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import json
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import ArraError
from pipeline.data.images import Rejected, decode_rgb
from pipeline.options import check, option

FORMATS = ("conversations", "imagefolder", "table", "img2dataset", "fashion-mnist")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
FASHION_MNIST_CLASSES = ("T-shirt/top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot")
FASHION_MNIST_SPLITS = {"train": "train", "test": "t10k"}
DEFAULT_MAX_FILE_BYTES = 256 << 20
DUPLICATE = "duplicate-key"  # a reject category that extraction revisits (pipeline.data.crops)
CSV_FIELD_LIMIT = 16 << 20  # the csv module's own default (128 KiB) would fail a long report's whole table


class SourceError(ArraError):
    """The source as a whole cannot be read (wrong path, missing column, bad header...)."""


@dataclass(frozen=True)
class Record:
    """One input row. `ref` says how to load its image: ("file", path), ("tar", path, offset,
    size) or ("idx", path, index)."""

    key: str
    caption: str
    label: int
    ref: tuple
    origin: str
    reject: str | None = None


@dataclass
class SourceOptions:
    """Flags that only some formats use; each reader takes what it needs."""

    image_column: str | None = option(None, "Tables: column with the image path (default: image, image_path, path, file, filename).")
    caption_column: str | None = option(None, "Tables: column with the caption (default: caption, text, prompt, impression).")
    caption_template: str | None = option(None, 'Tables: build captions from columns, e.g. "{view} view chest X-ray image, {impression}".')
    label_column: str | None = option(None, "Tables: integer class label column (optional).")
    key_column: str | None = option(None, "Tables: column with a unique record key (default: the image path).")
    image_root: str | None = option(None, "Resolve relative image paths against this folder (default: the file's folder).")
    split: str = option("train", "Fashion-MNIST folders: which split.", choices=tuple(FASHION_MNIST_SPLITS))
    follow_symlinks: bool = option(False, "Folder sources: also read files that are symlinks leading outside the folder "
                                          "(default: reject them).")
    max_file_bytes: int = option(DEFAULT_MAX_FILE_BYTES, "Reject image and caption files larger than this, before "
                                                         "reading them.", min=1)

    def __post_init__(self):
        check(self)


@dataclass
class Source:
    format: str
    path: str
    records: list[Record]
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """sha256 over every record's key, caption, label and image reference (paths relative to
        the source, so that a moved dataset keeps its fingerprint)."""
        h = hashlib.sha256()
        for r in self.records:
            ref = [self._relative(x) if isinstance(x, str) else x for x in r.ref]
            h.update(json.dumps([r.key, r.caption, r.label, ref, r.reject]).encode("utf-8", "surrogatepass"))
        return h.hexdigest()

    @property
    def files_fingerprint(self) -> str:
        """sha256 over the size and mtime_ns of every file that images are read from (an image file,
        tar or idx file; relative paths as in `fingerprint`), so that pixels changed in place change
        it. A stat per file: content hashes would read the whole dataset. Copies that keep mtimes
        (mv, cp -p, rsync -a) keep it."""
        h = hashlib.sha256()
        for path in dict.fromkeys(r.ref[1] for r in self.records if not r.reject):
            try:
                st = os.stat(path)
                stamp = [st.st_size, st.st_mtime_ns]
            except OSError:  # gone: its record will be rejected as missing
                stamp = None
            h.update(json.dumps([self._relative(path), stamp]).encode("utf-8", "surrogatepass"))
        return h.hexdigest()

    @functools.cached_property
    def _root(self) -> str:
        return str(Path(self.path) if Path(self.path).is_dir() else Path(self.path).parent).rstrip("/") + "/"

    def _relative(self, path: str) -> str:
        return path.removeprefix(self._root)


# ---------------------------------------------------------------------------------------------
# detection and entry point


def detect_format(path: Path) -> str:
    if path.is_file():
        name = path.name.lower()
        if name.endswith(".json"):
            return "conversations"
        if name.endswith(TABLE_SUFFIXES):
            return "table"
        if "-images-idx3-ubyte" in name:
            return "fashion-mnist"
        raise SourceError(f"{path}: cannot tell the source format from the file name; "
                          f"pass --source-format (one of {', '.join(FORMATS)})")
    if not path.is_dir():
        raise SourceError(f"{path}: no such file or directory")
    names = {p.name for p in path.iterdir()}
    if any("-images-idx3-ubyte" in n for n in names):
        return "fashion-mnist"
    if any(n.endswith(".tar") and n[:-4] + ".parquet" in names for n in names):
        return "img2dataset"
    return "imagefolder"


def read_source(path: str | os.PathLike, fmt: str | None = None, options: SourceOptions | None = None) -> Source:
    """Enumerate a dataset into records (cheap: no image is decoded)."""
    path = Path(path).resolve()
    options = options or SourceOptions()
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise SourceError(f"unknown --source-format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not path.exists():
        raise SourceError(f"{path}: no such file or directory")
    reader = {"conversations": _read_conversations, "imagefolder": _read_imagefolder,
              "table": _read_table, "img2dataset": _read_img2dataset,
              "fashion-mnist": _read_fashion_mnist}[fmt]
    records, skipped = reader(path, options)
    return Source(fmt, str(path), _reject_duplicates(records), skipped)


def _reject_duplicates(records: list[Record]) -> list[Record]:
    first: dict[str, str] = {}
    out = []
    for r in records:
        if r.reject is None and r.key in first:
            r = Record(r.key, r.caption, r.label, r.ref, r.origin,
                       f"{DUPLICATE}: {r.key!r} first seen at {first[r.key]}")
        elif r.reject is None:
            first[r.key] = r.origin
        out.append(r)
    return out


def _text(value, what: str) -> tuple[str, str | None]:
    """Return (text, reject reason) for a caption that may be bytes or hold lone surrogates."""
    if value is None:
        return "", None
    if isinstance(value, (list, dict, bool)):  # JSON that is not text: never store its Python repr
        return "", f"bad-row: {what} is a JSON {type(value).__name__}, not text"
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), None
        except UnicodeDecodeError:
            return value.decode("utf-8", "replace"), f"bad-utf8: {what} is not valid UTF-8"
    value = str(value)
    try:
        value.encode("utf-8")
        return value, None
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), f"bad-utf8: {what} is not valid UTF-8"


def _escapes(file: Path, root: Path, options: SourceOptions) -> str | None:
    """The reject reason of a file of a folder source that is a symlink leading outside the folder,
    unless --follow-symlinks; None when it may be read. `root` is resolved and the folders walked
    are real (links to folders are not walked), so only the file itself can lead out."""
    if options.follow_symlinks or not file.is_symlink():
        return None
    real = file.resolve()
    if real.is_relative_to(root):
        return None
    return (f"outside-root: {file.relative_to(root)} is a symlink to {real}, outside the source folder "
            f"(--follow-symlinks reads it)")


def _container(file: Path, root: Path, options: SourceOptions) -> Path:
    """A tar, parquet or idx file of a folder source, checked like images before it is opened."""
    reason = _escapes(file, root, options)
    if reason is None and not file.is_file():
        reason = f"not-a-file: {file} is not a regular file"
    if reason:
        raise SourceError(reason)
    return file


NOT_REGULAR = {"p": "a FIFO", "c": "a character device", "b": "a block device", "d": "a folder"}


def read_file(path: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes` bytes, or `Rejected`. It is opened
    non-blocking (a FIFO never blocks), refused unless fstat says it is a regular file, and read
    with a bound, so neither its size nor growth while it is read can exhaust memory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise Rejected(f"missing: no file {path}") from None
    except OSError as exc:
        raise Rejected(f"unreadable: {path}: {exc.strerror}") from None
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = NOT_REGULAR.get(stat.filemode(st.st_mode)[0], "a special file")
            raise Rejected(f"not-a-file: {path} is {kind}, not a regular file")
        if st.st_size > max_bytes:
            raise Rejected(f"oversized: {path} has {st.st_size} bytes, more than --max-file-bytes {max_bytes}")
        data = f.read(st.st_size + 1)
    if len(data) > st.st_size:
        raise Rejected(f"unreadable: {path} grew while it was read")
    return data


def _resolve(image: str, base: Path, image_root: str | None) -> str:
    p = Path(image)
    if not p.is_absolute():
        p = Path(image_root or base) / p
    return str(p)


# ---------------------------------------------------------------------------------------------
# readers: each returns (records, skipped counts)


def _read_conversations(path: Path, options: SourceOptions):
    """ARRA / Lumina-mGPT: [{"conversations": [{"from": "human", "value": PROMPT}, ...], "image": [PATH]}]."""
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(items, list):
        raise SourceError(f"{path}: expected a JSON list of conversation items, got {type(items).__name__}")
    if not items:
        raise SourceError(f"{path}: the list of conversation items is empty")
    records = []
    for i, item in enumerate(items):
        origin = f"{path.name} item {i}"
        images = item.get("image") if isinstance(item, dict) else None
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or len(images) != 1 or not isinstance(images[0], str):
            n = len(images) if isinstance(images, list) else 0
            records.append(Record(f"{path.name}#{i}", "", -1, ("file", ""), origin,
                                  f"bad-row: expected exactly one image path per item, got {n}"))
            continue
        turns = item.get("conversations")
        prompt = next((t.get("value", "") for t in (turns if isinstance(turns, list) else [])
                       if isinstance(t, dict) and t.get("from") == "human"), "")
        caption, bad = _text(prompt, "prompt")
        key, bad_key = _text(Path(images[0]).as_posix(), "image path")
        records.append(Record(key, caption, -1, ("file", _resolve(images[0], path.parent, options.image_root)),
                              origin, bad_key or bad))
    return records, {}


CAPTION_SIDECARS = (".txt",)


def _read_imagefolder(path: Path, options: SourceOptions):
    """A folder of images; immediate subfolders are classes (label = sorted index), a `.txt`
    file with the same stem is the caption, otherwise the class name is. Images and captions that
    are symlinks leading outside the folder are rejects (see the module's docstring)."""
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    label_of = {c: i for i, c in enumerate(classes)}
    records = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.lower().endswith(CAPTION_SIDECARS):
                continue
            file = Path(root) / name
            rel = file.relative_to(path)
            top = rel.parts[0] if len(rel.parts) > 1 else None
            label = label_of.get(top, -1)
            sidecar = file.with_suffix(".txt")
            caption, bad = (top or "").replace("_", " "), None
            if sidecar.exists():
                caption, bad = "", _escapes(sidecar, path, options)
                if bad is None:
                    try:
                        caption, bad = _text(read_file(str(sidecar), options.max_file_bytes).strip(),
                                             f"caption file {sidecar.name}")
                    except Rejected as exc:
                        bad = str(exc)
            key, bad_name = _text(rel.as_posix(), "file name")
            records.append(Record(key, caption, label, ("file", str(file)), key,
                                  bad_name or _escapes(file, path, options) or bad))
    if not records:
        raise SourceError(f"{path}: no files found in this image folder")
    return records, {}


def _table_rows(path: Path):
    """Yield dict rows of a CSV/TSV/JSONL/Parquet file, with bad UTF-8 kept as surrogates."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        yield from pq.read_table(path).to_pylist()
        return
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        if suffix == ".jsonl":
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        row = {"__error__": f"bad-row: line {n} is not valid JSON ({exc.msg})"}
                    yield row if isinstance(row, dict) else {"__error__": f"bad-row: line {n} is not a JSON object"}
        else:
            csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            while True:  # a row the csv module cannot parse is that row's reject; reading goes on
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    yield {"__error__": f"bad-row: {exc}"}  # the record's origin names the row
                    continue
                if None in row:  # more fields than the header: an unquoted separator in a caption
                    yield {"__error__": f"bad-row: line {reader.line_num} has more fields than the header"}
                else:
                    yield row


def _pick(columns, wanted: str | None, candidates: tuple[str, ...], what: str, path: Path, flag: str):
    if wanted:
        if wanted not in columns:
            raise SourceError(f"{path}: no column {wanted!r} for {flag}; columns are {sorted(columns)}")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    raise SourceError(f"{path}: cannot find the {what} column; name it with {flag} (columns are {sorted(columns)})")


def _read_table(path: Path, options: SourceOptions):
    """CSV/TSV/JSONL/Parquet with an image-path column and a caption column (or a template
    such as "{view} view chest X-ray image, {impression}" over several columns)."""
    rows = list(_table_rows(path))
    if not rows:
        raise SourceError(f"{path}: the table has no rows")
    columns = set().union(*(r.keys() for r in rows if "__error__" not in r))
    image_col = _pick(columns, options.image_column, ("image", "image_path", "path", "file", "filename"),
                      "image path", path, "--image-column")
    caption_col = None
    if options.caption_template is None:
        caption_col = _pick(columns, options.caption_column, ("caption", "text", "prompt", "impression"),
                            "caption", path, "--caption-column")
    for flag, col in (("--label-column", options.label_column), ("--key-column", options.key_column)):
        if col and col not in columns:
            raise SourceError(f"{path}: no column {col!r} for {flag}; columns are {sorted(columns)}")
    records = []
    for i, row in enumerate(rows):
        origin = f"{path.name} row {i + 1}"
        if "__error__" in row:
            records.append(Record(f"{path.name}#{i + 1}", "", -1, ("file", ""), origin, row["__error__"]))
            continue
        image = row.get(image_col)
        if options.caption_template is not None:
            try:
                raw = options.caption_template.format(**{k: ("" if v is None else v) for k, v in row.items()})
            except KeyError as exc:
                raise SourceError(f"{path}: --caption-template names column {exc} which is not in the table") from None
        else:
            raw = row.get(caption_col)
        caption, bad = _text(raw, "caption")
        key_value = row.get(options.key_column) if options.key_column else image
        key, bad_key = _text(key_value, "key")
        label = row.get(options.label_column) if options.label_column else None
        try:
            if isinstance(label, bool) or (isinstance(label, float) and not label.is_integer()):
                raise ValueError  # int() would make True 1 and 3.7 3
            label = -1 if label in (None, "") else int(label)
            if not -1 <= label < 2 ** 31:
                raise ValueError
        except (ValueError, TypeError):
            bad = bad or f"bad-row: label {label!r} is not an integer in 0..2**31-1"
            label = -1
        if not image:
            records.append(Record(key or f"{path.name}#{i + 1}", caption, label, ("file", ""), origin, "bad-row: no image path"))
            continue
        ref = ("file", _resolve(str(image), path.parent, options.image_root))
        records.append(Record(key, caption, label, ref, origin, bad_key or bad))
    return records, {}


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def _read_img2dataset(path: Path, options: SourceOptions):
    """img2dataset output: NNNNN.tar beside NNNNN.parquet. Keys are img2dataset's; rows whose
    status is not "success" were never downloaded and are counted as skipped."""
    import pyarrow.parquet as pq
    records, skipped = [], {}
    for tar_path in sorted(path.glob("*.tar")):
        meta_path = tar_path.with_suffix(".parquet")
        if not meta_path.exists():
            raise SourceError(f"{tar_path}: no {meta_path.name} beside it (img2dataset writes both)")
        _container(tar_path, path, options)
        _container(meta_path, path, options)
        members = {}
        with tarfile.open(tar_path) as tf:
            for m in tf:
                stem, _, ext = m.name.rpartition(".")
                if m.isfile() and ext.lower() in IMAGE_EXTS:
                    members[Path(stem).name] = (m.offset_data, m.size)
        for i, row in enumerate(pq.read_table(meta_path).to_pylist()):
            status = row.get("status", "success")
            if status != "success":
                reason = f"img2dataset status {status!r}"
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            key = str(row["key"])
            caption, bad = _text(row.get("caption"), "caption")
            origin = f"{meta_path.name} row {i + 1}"
            if key not in members:
                records.append(Record(key, caption, -1, ("file", ""), origin, f"missing: image {key} is not in {tar_path.name}"))
                continue
            records.append(Record(key, caption, -1, ("tar", str(tar_path), *members[key]), origin, bad))
    if not records and not skipped:
        raise SourceError(f"{path}: no img2dataset shards (NNNNN.tar + NNNNN.parquet) found")
    return records, skipped


def _idx_pair(path: Path, options: SourceOptions) -> tuple[Path, Path]:
    root = path if path.is_dir() else path.parent
    if path.is_dir():
        prefix = FASHION_MNIST_SPLITS[options.split]  # SourceOptions allows only these
        found = sorted(path.glob(f"{prefix}-images-idx3-ubyte*"))
        if not found:
            raise SourceError(f"{path}: no {prefix}-images-idx3-ubyte[.gz] file for split {options.split!r}")
        path = found[0]
    labels = path.with_name(path.name.replace("-images-idx3-ubyte", "-labels-idx1-ubyte"))
    if not labels.exists():
        raise SourceError(f"{path}: the labels file {labels.name} is missing")
    return _container(path, root, options), _container(labels, root, options)


@functools.lru_cache(maxsize=4)
def read_idx(path: str) -> np.ndarray:
    """Read an idx file (gzip or raw) into a numpy array; images are (n, rows, cols) uint8."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise SourceError(f"{path}: not an unsigned-byte idx file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise SourceError(f"{path}: holds {len(data) - offset} bytes of data, header says {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _read_fashion_mnist(path: Path, options: SourceOptions):
    """Fashion-MNIST idx files; captions are "a photo of a <class>", labels are kept."""
    images, labels_path = _idx_pair(path, options)
    labels, pixels = read_idx(str(labels_path)), read_idx(str(images))
    for file, array, shape in ((images, pixels, "3-d (n, rows, cols)"), (labels_path, labels, "1-d (n)")):
        if array.ndim != int(shape[0]):
            raise SourceError(f"{file}: holds {array.ndim}-d data {list(array.shape)}; it must be {shape}")
    n = pixels.shape[0]
    if len(labels) != n:
        raise SourceError(f"{images}: {n} images but {len(labels)} labels in {labels_path.name}")
    split = "test" if images.name.startswith("t10k") else "train"
    classes = len(FASHION_MNIST_CLASSES)
    return [Record(f"fashion-mnist/{split}/{i:05d}", f"a photo of a {FASHION_MNIST_CLASSES[label]}" if label < classes else "",
                   label if label < classes else -1, ("idx", str(images), i), f"{images.name} image {i}",
                   None if label < classes else f"bad-row: label {label} is not a Fashion-MNIST class (0..{classes - 1})")
            for i, label in enumerate(int(x) for x in labels)], {}


# ---------------------------------------------------------------------------------------------
# loading one record's image


def load_image(ref: tuple, max_pixels: int, max_side: int, max_file_bytes: int, draft: int | None = None) -> Image.Image:
    """Load and decode the image a record points at, as 8-bit RGB (a JPEG reduced on decode to
    `draft` px, see `decode_rgb`); raise `Rejected` if unusable."""
    kind = ref[0]
    if kind == "idx":
        return Image.fromarray(read_idx(ref[1])[ref[2]], mode="L").convert("RGB")
    if kind == "tar":
        if ref[3] > max_file_bytes:
            raise Rejected(f"oversized: {ref[1]} holds a {ref[3]}-byte image, more than --max-file-bytes {max_file_bytes}")
        with open(ref[1], "rb") as f:
            f.seek(ref[2])
            data = f.read(ref[3])
        if len(data) != ref[3]:
            raise Rejected(f"corrupt: truncated tar member in {ref[1]}")
        return decode_rgb(data, max_pixels, max_side, draft)
    if not ref[1]:
        raise Rejected("bad-row: no image path")
    return decode_rgb(read_file(ref[1], max_file_bytes), max_pixels, max_side, draft)
