"""Feature sets addressed by URL: `s3://`, `gs://`, `http(s)://`, `memory://`, ... through fsspec.

`set_path(url_or_path)` gives a plain `Path` for a local folder (and for `file://`), and a
`RemoteDir` for any other URL: the few pathlib calls `FeatureSet` makes (`/`, `is_file`, `glob`,
`read_bytes`, `stat`) done by the URL's fsspec filesystem, whose credentials come from that
backend's standard places (environment, config files). Its `str()` is the URL with any embedded
credentials replaced by `***`, so every message, manifest, log and run folder that names a set
shows the redacted form (`redact`).

Shards are fetched one at a time as a reader reaches them (`RemoteDir.fetch_checked`), each
checked against its manifest size and sha256 as it arrives; a failed read or a failed check is
retried `ARRA_PIPE_RETRIES` times in all (default 4) with a short back-off, then reported naming
the shard. With a cache folder (`--cache-dir`, or ARRA_PIPE_CACHE) a checked shard is kept under
its sha256 (`<cache>/<2 hex>/<sha256>`, written to a unique temporary name and renamed, so that
several processes on a node may fill it at once), and later reads take it from there after
checking its hash again.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from pipeline.errors import ArraError

CACHE_ENV = "ARRA_PIPE_CACHE"
RETRIES_ENV = "ARRA_PIPE_RETRIES"
DEFAULT_TRIES = 4
# schemes whose fsspec backend is not in the default install, and the extra that brings it
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_SECRET_QUERY = re.compile(r"([?&](?:[A-Za-z0-9_.-]*(?:signature|token|secret|password|credential|key|sig))=)[^&#\s]*",
                           re.IGNORECASE)


class RemoteError(ArraError):
    """A URL that cannot be opened: an unknown scheme, or a backend that is not installed."""


def is_url(value) -> bool:
    """A `scheme://...` string (a Windows drive letter or a plain path is not one)."""
    return isinstance(value, str) and bool(_URL.match(value))


def redact(text) -> str:
    """`text` with the user:password of every URL in it, and the values of query parameters that
    carry secrets (signature, token, key, ...), replaced by `***`."""
    text = _USERINFO.sub(r"\1***@", str(text))
    return _SECRET_QUERY.sub(r"\1***", text)


def set_path(value) -> "Path | RemoteDir":
    """A feature set's location: a Path for a plain path or a file:// URL, else a RemoteDir."""
    if isinstance(value, (Path, RemoteDir)):
        return value
    value = os.fspath(value)
    if not is_url(value):
        return Path(value)
    if value.startswith("file://"):
        from urllib.parse import unquote, urlparse
        return Path(unquote(urlparse(value).path))
    return RemoteDir(value)


def filesystem(url: str):
    """(fsspec filesystem, its path) of `url`; a missing backend is named with its extra."""
    import fsspec
    scheme = url.split("://", 1)[0].lower()
    if scheme in EXTRAS and ":" in url.split("://", 1)[1].split("/", 1)[0].rpartition("@")[0]:
        # s3fs, gcsfs and adlfs take no user:password from the URL: it would be read as part of the
        # bucket's name, which their errors then quote in full
        raise RemoteError(f"{redact(url)}: {scheme}:// URLs cannot carry credentials (user:password@); give them "
                          "in the backend's standard places (environment variables, its config files)")
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        extra = EXTRAS.get(scheme)
        hint = f"pip install 'arra-pipe[{extra}]'" if extra else "install the fsspec backend for it"
        raise RemoteError(f"{redact(url)}: reading {scheme}:// needs a backend that is not installed ({exc}); {hint}") from None
    except ValueError as exc:  # "Protocol not known"
        raise RemoteError(f"{redact(url)}: {exc}") from None


def tries() -> int:
    try:
        return max(1, int(os.environ.get(RETRIES_ENV, DEFAULT_TRIES)))
    except ValueError:
        raise RemoteError(f"{RETRIES_ENV}={os.environ[RETRIES_ENV]!r} is not a whole number") from None


def cache_dir() -> Path | None:
    value = os.environ.get(CACHE_ENV)
    return Path(value) if value else None


class _Stat:
    def __init__(self, size: int):
        self.st_size = size


class RemoteDir:
    """A file or folder at a URL, with the pathlib calls a feature set's reader makes."""

    def __init__(self, url: str, _fs=None, _path: str | None = None, _ahead: dict | None = None):
        self.url = url.rstrip("/")
        if _fs is None:
            _fs, _path = filesystem(self.url)
        self.fs, self.fspath = _fs, _path.rstrip("/")
        self._ahead = {} if _ahead is None else _ahead  # name -> Future of fetch_checked, shared below this folder

    def __truediv__(self, name) -> "RemoteDir":
        name = str(name).strip("/")
        return RemoteDir(f"{self.url}/{name}", self.fs, f"{self.fspath}/{name}", self._ahead)

    def __str__(self) -> str:
        return redact(self.url)

    def __repr__(self) -> str:
        return f"RemoteDir({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemoteDir) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: "RemoteDir") -> bool:  # sorted() as for Paths: by parts
        return self.url.split("/") < other.url.split("/")

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "RemoteDir":
        return RemoteDir(self.url.rsplit("/", 1)[0], self.fs, self.fspath.rsplit("/", 1)[0])

    def resolve(self) -> "RemoteDir":
        return self

    def _retried(self, what: str, call):
        """`call()`, retried on any failure but a missing file; the last failure is raised as an
        OSError naming this file (credentials redacted)."""
        n = tries()
        for attempt in range(n):
            try:
                return call()
            except FileNotFoundError:
                raise FileNotFoundError(f"{self}: not found") from None
            except Exception as exc:  # aiohttp / botocore / OSError: the backends raise their own kinds
                last = exc
                if attempt + 1 < n:
                    time.sleep(min(0.1 * 2 ** attempt, 2.0))
        raise OSError(f"{self}: {what} failed {n} times; last: {type(last).__name__}: {redact(last)}") from None

    def exists(self) -> bool:
        return self._retried("looking up", lambda: self.fs.exists(self.fspath))

    def is_file(self) -> bool:
        """False for a missing file; a lookup that fails otherwise (an endpoint that cannot be
        reached, refused credentials) is retried, then raised: fsspec's own `isfile` answers
        False to every error, which would report a set at an unreachable URL as missing and let
        `extract --out URL` extract it all before its first upload fails."""
        def look() -> bool:
            try:
                return self.fs.info(self.fspath)["type"] == "file"
            except FileNotFoundError:
                return False
        return self._retried("looking up", look)

    def is_dir(self) -> bool:
        return self._retried("looking up", lambda: self.fs.isdir(self.fspath))

    def stat(self) -> _Stat:
        return _Stat(int(self._retried("looking up", lambda: self.fs.size(self.fspath))))

    def read_bytes(self) -> bytes:
        return self._retried("reading", lambda: self.fs.cat_file(self.fspath))

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def glob(self, pattern: str) -> list["RemoteDir"]:
        """Files or folders matching `pattern` below this folder; a backend that cannot list
        (an HTTP server without index pages) finds none."""
        try:
            found = self._retried("listing", lambda: self.fs.glob(f"{self.fspath}/{pattern}"))
        except (FileNotFoundError, OSError, NotImplementedError):
            return []
        out = []
        for p in sorted(found):
            p = p.rstrip("/")
            rel = p[len(self.fspath) + 1:] if p.startswith(self.fspath + "/") else None
            if rel is None:  # backends that strip the protocol: compare without it
                bare = self.fs._strip_protocol(self.fspath)
                rel = p[len(bare) + 1:] if p.startswith(bare + "/") else None
            if rel:
                out.append(self / rel)
        return out

    def cached(self, size: int, sha256: str) -> Path | None:
        """The cache's file for these contents, when it holds one of that size (its hash is
        checked when it is read)."""
        cache = cache_dir()
        hit = cache / sha256[:2] / sha256 if cache is not None else None
        try:
            return hit if hit is not None and hit.stat().st_size == size else None
        except OSError:
            return None

    def prefetch(self, name: str, size: int, sha256: str) -> None:
        """Start fetching (and checking) `name` on a background thread, so that a reader that
        reaches it next finds it read: the network time of one shard overlaps the reading of the
        one before. At most `_AHEAD` files are held ahead; one held already is not fetched again."""
        with _LOCK:
            if name in self._ahead or len(self._ahead) >= _AHEAD or self.cached(size, sha256):
                return
            self._ahead[name] = _pool().submit(self._fetch_checked, name, size, sha256)

    def fetch_checked(self, name: str, size: int, sha256: str) -> tuple[bytes | None, list[str]]:
        """The bytes of the file `name` below this folder once they have `size` bytes and `sha256`
        (from the cache when it holds them), or (None, [the problem, naming the file]) after the
        retries. A missing file is reported at once."""
        with _LOCK:
            ahead: Future | None = self._ahead.pop(name, None)
        if ahead is not None:  # fetched ahead, with its retries
            return ahead.result()
        return self._fetch_checked(name, size, sha256)

    def _fetch_checked(self, name: str, size: int, sha256: str) -> tuple[bytes | None, list[str]]:
        cache = cache_dir()
        if cache is not None:
            hit = cache / sha256[:2] / sha256
            try:
                data = hit.read_bytes()
            except OSError:
                data = None
            if data is not None:
                if len(data) == size and hashlib.sha256(data).hexdigest() == sha256:
                    return data, []
                hit.unlink(missing_ok=True)  # damaged in the cache: fetch it again
        target, n, why = self / name, tries(), ""
        for attempt in range(n):
            try:
                data = self.fs.cat_file(target.fspath)
            except FileNotFoundError:
                return None, [f"{name}: missing"]
            except Exception as exc:  # a dropped connection, an HTTP 5xx, a timeout
                why = f"read failed ({type(exc).__name__}: {redact(exc)})"
            else:
                if len(data) != size:
                    why = f"{len(data)} bytes read, manifest says {size} (truncated or replaced)"
                elif (digest := hashlib.sha256(data).hexdigest()) != sha256:
                    why = f"sha256 {digest[:16]}... differs from the manifest's {sha256[:16]}..."
                else:
                    if cache is not None:
                        _cache_put(cache / sha256[:2] / sha256, data)
                    return data, []
            if attempt + 1 < n:
                time.sleep(min(0.1 * 2 ** attempt, 2.0))
        return None, [f"{name}: {why}; {n} attempts"]


_AHEAD = 2  # files fetched ahead of the reader, per set
_LOCK = threading.Lock()
_POOL: list[ThreadPoolExecutor] = []


def _pool() -> ThreadPoolExecutor:
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(_AHEAD, thread_name_prefix="arra-prefetch"))
    return _POOL[0]


def _cache_put(path: Path, data: bytes) -> None:
    """Write a cache entry under a name no other process or thread uses, then rename it into place
    (a rename is atomic: a reader sees the whole file or none). A cache that cannot be written is
    not an error: the shard was read."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def file_size(path, entry: dict | None = None) -> int | None:
    """Size of a local or remote file, None when it is missing (or, locally, not a file). A remote
    file whose manifest `entry` the cache holds is not looked up."""
    if isinstance(path, RemoteDir):
        if entry is not None and path.cached(entry["bytes"], entry["sha256"]):
            return entry["bytes"]
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return None
    return path.stat().st_size if path.is_file() else None
