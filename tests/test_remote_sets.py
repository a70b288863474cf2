"""Feature sets read from a URL (issue 18): a loopback HTTP server started here serves a set; every
command that reads a set gives from the URL what it gives from the folder; a server that fails
some requests is retried a bounded number of times and then named; a corrupted shard is caught by
its checksum; the sha256-keyed cache serves a second read; credentials in a URL never reach an
output."""

from __future__ import annotations

import base64
import functools
import json
import os
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.data.featureset import FeatureSet, FeatureSetError
from pipeline.data.remote import CACHE_ENV, RETRIES_ENV, RemoteDir, RemoteError, redact, set_path
from pipeline.data.train_data import TrainStream
from stages.cli import main
from test_evaluate import image_folder
from test_rank_split import LAYOUT, TEACHER, row_set, rows_in

USER, PASSWORD = "arra", "s3cr3t-pw"


class Handler(SimpleHTTPRequestHandler):
    """Files under the server's folder; GETs of a path listed in `faults` fail once per fault, in
    order: "500", "drop" (the connection closes half-way through the body), "truncate" (a complete
    response holding half the file), "corrupt" (one byte flipped)."""

    def log_message(self, *args):
        pass

    def _authorised(self) -> bool:
        want = self.server.auth
        if want is None or self.headers.get("Authorization") == "Basic " + base64.b64encode(want.encode()).decode():
            return True
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="sets"')
        self.send_header("Content-Length", "0")
        self.end_headers()
        return False

    def do_HEAD(self):
        if self._authorised():
            super().do_HEAD()

    def do_GET(self):
        if not self._authorised():
            return
        self.server.gets.append(self.path)
        faults = self.server.faults.get(self.path)
        if not faults:
            return super().do_GET()
        fault = faults.pop(0)
        if fault == "500":
            self.send_error(500, "injected")
            return
        data = Path(self.translate_path(self.path)).read_bytes()
        if fault == "corrupt":
            data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
        body = data[:len(data) // 2] if fault in ("drop", "truncate") else data
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) if fault == "drop" else len(body)))
        self.end_headers()
        self.wfile.write(body)
        if fault == "drop":
            self.wfile.flush()
            self.close_connection = True


@pytest.fixture
def serve():
    """serve(folder, auth="user:password" or None) -> the server (its .url, .faults, .gets); every
    server is stopped when the test ends."""
    servers = []

    def start(folder, auth=None):
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        server.auth, server.faults, server.gets = auth, {}, []
        server.url = f"http://127.0.0.1:{server.server_port}"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setenv(RETRIES_ENV, "3")
    monkeypatch.delenv(CACHE_ENV, raising=False)


def hand_set(root: Path) -> FeatureSet:
    """test_rank_split's 35-row set (row r knows its number), finished with a manifest file."""
    fs = row_set(root / "set")
    manifest = {**fs.manifest, "format": "arra-pipe-featureset", "version": 1, "rejects": {"total": 0}}
    (root / "set" / "manifest.json").write_text(json.dumps(manifest))
    (root / "set" / "rejects.jsonl").write_text("")
    return FeatureSet.open(root / "set")


def stream_rows(fs: FeatureSet, epoch: int = 0) -> list[int]:
    stream = TrainStream([fs], TEACHER, LAYOUT, micro_batch=5, seed=4, shuffle_buffer=10, cond_dropout=0.0)
    batches = stream.epoch(epoch)
    return [r for _ in range(stream.steps_per_epoch(1)) for r in rows_in(next(batches))]


# ---- the reader, on a set written by hand


def test_the_training_stream_from_a_url_is_the_stream_from_the_folder(tmp_path, serve):
    local = hand_set(tmp_path)
    server = serve(tmp_path)
    remote = FeatureSet.open(f"{server.url}/set")
    assert isinstance(remote.path, RemoteDir) and remote.manifest == local.manifest
    assert remote.verify() == [] and local.verify() == []
    for epoch in (0, 1):
        assert stream_rows(remote, epoch) == stream_rows(local, epoch)
    assert remote.table().equals(local.table())


def test_file_urls_and_plain_paths_open_the_same_folder(tmp_path):
    local = hand_set(tmp_path)
    by_url = FeatureSet.open(f"file://{tmp_path}/set")
    assert by_url.path == local.path and by_url.table().equals(local.table())


@pytest.mark.parametrize("fault", ["500", "drop", "truncate", "corrupt"])
def test_a_failed_read_is_retried_and_gives_the_same_rows(tmp_path, serve, fault):
    local = hand_set(tmp_path)
    server = serve(tmp_path)
    shard = "/set/" + local.manifest["shards"][2]["name"]
    server.faults[shard] = [fault, fault]                          # twice: the third attempt succeeds
    remote = FeatureSet.open(f"{server.url}/set")
    assert stream_rows(remote) == stream_rows(local)
    assert server.gets.count(shard) == 3


@pytest.mark.parametrize("fault", ["500", "drop", "truncate", "corrupt"])
def test_a_shard_that_keeps_failing_is_named_after_the_bounded_retries(tmp_path, serve, fault):
    local = hand_set(tmp_path)
    server = serve(tmp_path)
    name = local.manifest["shards"][3]["name"]
    server.faults["/set/" + name] = [fault] * 10
    remote = FeatureSet.open(f"{server.url}/set")
    with pytest.raises(FeatureSetError, match=f"{name}: .*3 attempts") as err:
        list(remote.batches())
    assert server.gets.count("/set/" + name) == 3                 # ARRA_PIPE_RETRIES, no more
    why = {"500": "read failed", "drop": "read failed", "truncate": "bytes read, manifest says",
           "corrupt": "sha256 .* differs from the manifest"}[fault]
    assert __import__("re").search(why, str(err.value)), err.value
    problems = remote.verify()
    assert len(problems) == 1 and problems[0].startswith(f"{name}: ")


def test_a_shard_corrupted_at_the_source_is_caught_by_its_checksum_and_verify_names_it(tmp_path, serve):
    local = hand_set(tmp_path)
    path = local.path / local.manifest["shards"][1]["name"]
    data = bytearray(path.read_bytes())
    data[600] ^= 0x01                                              # same size, other bytes
    path.write_bytes(bytes(data))
    server = serve(tmp_path)
    remote = FeatureSet.open(f"{server.url}/set")
    problems = remote.verify()
    assert len(problems) == 1 and "shards/shard-000001.tar: sha256" in problems[0] and "3 attempts" in problems[0]
    result = CliRunner().invoke(main, ["verify", f"{server.url}/set"])
    assert result.exit_code == 1 and "BAD shards/shard-000001.tar: sha256" in result.output


def test_a_missing_shard_is_named_at_once(tmp_path, serve):
    local = hand_set(tmp_path)
    (local.path / local.manifest["shards"][0]["name"]).unlink()
    server = serve(tmp_path)
    remote = FeatureSet.open(f"{server.url}/set")
    with pytest.raises(FeatureSetError, match="shard-000000.tar: missing"):
        TrainStream([remote], TEACHER, LAYOUT, micro_batch=5)      # before any model is built
    assert FeatureSet.open(f"{server.url}/set").verify() == ["shards/shard-000000.tar: missing"]


def test_a_url_without_a_set_is_refused_by_name(tmp_path, serve):
    server = serve(tmp_path)
    with pytest.raises(FeatureSetError, match=f"{server.url}/nothing: no manifest.json"):
        FeatureSet.open(f"{server.url}/nothing")


def test_the_cache_serves_the_second_read_and_replaces_a_damaged_entry(tmp_path, serve, monkeypatch):
    local = hand_set(tmp_path)
    server = serve(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    shards = ["/set/" + s["name"] for s in local.manifest["shards"]]
    first = stream_rows(FeatureSet.open(f"{server.url}/set"))
    assert sorted(server.gets.count(s) for s in shards) == [1] * 5
    entries = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert entries == sorted(s["sha256"] for s in local.manifest["shards"])   # keyed by sha256, no temporaries left
    again = stream_rows(FeatureSet.open(f"{server.url}/set"), 0)
    assert again == first and sorted(server.gets.count(s) for s in shards) == [1] * 5   # nothing fetched again
    sha = local.manifest["shards"][4]["sha256"]
    (cache / sha[:2] / sha).write_bytes(b"not the shard")
    assert stream_rows(FeatureSet.open(f"{server.url}/set"), 0) == first
    assert server.gets.count(shards[4]) == 2 and (cache / sha[:2] / sha).read_bytes() == (local.path / local.manifest["shards"][4]["name"]).read_bytes()


def test_several_processes_fill_one_cache_at_once(tmp_path, serve):
    local = hand_set(tmp_path)
    server = serve(tmp_path)
    cache = tmp_path / "cache"
    code = ("import sys; sys.path.insert(0, 'tests'); from pipeline.data.featureset import FeatureSet;"
            f"print(sum(b.num_rows for b in FeatureSet.open('{server.url}/set').batches()))")
    env = {**os.environ, CACHE_ENV: str(cache), "DS_ACCELERATOR": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env) for _ in range(4)]
    assert [p.communicate(timeout=120)[0].strip() for p in procs] == ["35"] * 4
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == sorted(s["sha256"] for s in local.manifest["shards"])
    for s in local.manifest["shards"]:
        assert (cache / s["sha256"][:2] / s["sha256"]).read_bytes() == (local.path / s["name"]).read_bytes()


def test_a_backend_that_is_not_installed_names_its_extra(monkeypatch):
    import fsspec.core

    def missing(url, **kw):
        raise ImportError("Install s3fs to access S3")
    monkeypatch.setattr(fsspec.core, "url_to_fs", missing)
    with pytest.raises(RemoteError, match=r"pip install 'arra-pipe\[s3\]'"):
        FeatureSet.open("s3://bucket/sets/x")
    monkeypatch.setattr(fsspec.core, "url_to_fs", lambda url, **kw: (_ for _ in ()).throw(ImportError("gcsfs")))
    with pytest.raises(RemoteError, match=r"arra-pipe\[gcs\]"):
        FeatureSet.open("gs://bucket/sets/x")


def test_redact_hides_user_password_and_signed_query_values():
    text = "read https://me:pa55@host/x/set?X-Amz-Signature=abc&part=2 and s3://key:secret@bucket/y failed"
    out = redact(text)
    assert "pa55" not in out and "secret" not in out and "abc" not in out
    assert out == "read https://***@host/x/set?X-Amz-Signature=***&part=2 and s3://***@bucket/y failed"
    assert str(set_path("https://me:pa55@host/set")) == "https://***@host/set"


# ---- every command on an extracted set, through a server that asks for a password


@pytest.fixture(scope="module")
def extracted(run_extract_module, tmp_path_factory):
    folder = image_folder(tmp_path_factory.mktemp("src") / "images", "test", 6)
    return run_extract_module(folder, name="remote", shard_size=16, batch_size=8)


ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def arra_pipe(*args, ok=True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "stages.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=600)
    assert (done.returncode == 0) == ok, done.stderr[-4000:]
    return done


def everything_written(*folders: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for f in folders for p in Path(f).rglob("*") if p.is_file())


def test_commands_read_a_url_with_credentials_as_the_folder_and_never_show_them(extracted, serve, tmp_path):
    server = serve(extracted.parent, auth=f"{USER}:{PASSWORD}")
    url = server.url.replace("http://", f"http://{USER}:{PASSWORD}@") + "/" + extracted.name
    shown = server.url.replace("http://", "http://***@") + "/" + extracted.name
    outputs = []

    def both(*args, **kw):
        """The command on the folder and on the URL: (local, remote) CompletedProcess."""
        a = arra_pipe(*[extracted if x is None else x for x in args], **kw)
        b = arra_pipe(*[url if x is None else x for x in args], **kw)
        outputs.extend([b.stdout, b.stderr])
        return a, b

    a, b = both("inspect", None)
    assert b.stdout == a.stdout.replace(str(extracted), shown)
    a, b = both("verify", None, "--cache-dir", tmp_path / "cache")
    assert b.stdout == a.stdout.replace(str(extracted), shown) and "OK" in b.stdout
    assert len(list((tmp_path / "cache").rglob("*"))) > 3            # the shards went into the cache

    runs = tmp_path / "run-local", tmp_path / "run-url"
    train = ["--micro-batch", "8", "--steps", "3", "--lr", "3e-3", "--no-progress", "--seed", "3"]
    arra_pipe("train", extracted, "--out", runs[0], *train)
    done = arra_pipe("train", url, "--out", runs[1], *train)
    outputs.extend([done.stdout, done.stderr])
    losses = [[{k: v for k, v in json.loads(line).items() if not k.endswith("_per_s")}
               for line in (r / "metrics.jsonl").read_text().splitlines()] for r in runs]
    assert len(losses[1]) == 3 and losses[1] == losses[0]
    config = json.loads((runs[1] / "train_config.json").read_text())
    assert config["sets"] == [shown] and config["options"]["sets"] == [shown]

    audits = tmp_path / "audit-local", tmp_path / "audit-url"
    arra_pipe("audit", "dedup", extracted, "--out", audits[0])
    done = arra_pipe("audit", "dedup", url, "--out", audits[1])
    outputs.extend([done.stdout, done.stderr])
    assert (audits[1] / "pairs.csv").read_text() == (audits[0] / "pairs.csv").read_text()
    assert json.loads((audits[1] / "report.json").read_text())["set"] == shown

    generated = tmp_path / "generated"
    generated.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(generated / f"{i:05d}.png")
    evals = tmp_path / "eval-local.json", tmp_path / "eval-url.json"
    arra_pipe("eval", "--generated", generated, "--reference", extracted, "--no-fid", "--out", evals[0])
    done = arra_pipe("eval", "--generated", generated, "--reference", url, "--no-fid", "--out", evals[1])
    outputs.extend([done.stdout, done.stderr])
    metrics = [json.loads(e.read_text())["metrics"] for e in evals]
    assert metrics[1] == metrics[0] and any(m["metric"].startswith("FD ") for m in metrics[1])

    wrong = server.url.replace("http://", f"http://{USER}:wrong-{PASSWORD}@") + "/" + extracted.name
    done = arra_pipe("inspect", wrong, ok=False)
    assert "Error:" in done.stderr and "http://***@127.0.0.1" in done.stderr
    outputs.extend([done.stdout, done.stderr])
    written = everything_written(*runs[1:], *audits[1:], evals[1], tmp_path / "cache")
    for text in [*outputs, written]:
        assert PASSWORD not in text


def test_two_ranks_train_from_a_url_as_from_the_folder_and_share_the_cache(extracted, serve, tmp_path):
    server = serve(extracted.parent)
    runs, cache = (tmp_path / "local", tmp_path / "url"), tmp_path / "cache"
    train = ["--micro-batch", "4", "--steps", "3", "--lr", "3e-3", "--no-progress", "--seed", "3", "--procs", "2"]
    arra_pipe("train", extracted, "--out", runs[0], *train)
    arra_pipe("train", f"{server.url}/{extracted.name}", "--out", runs[1], "--cache-dir", cache, *train)
    losses = [[{k: v for k, v in json.loads(line).items() if not k.endswith("_per_s")}
               for line in (r / "metrics.jsonl").read_text().splitlines()] for r in runs]
    assert len(losses[1]) == 3 and losses[1] == losses[0]
    shards = FeatureSet.open(extracted).manifest["shards"]
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == sorted(s["sha256"] for s in shards)
