"""Feature sets at s3:// URLs (issue 18) against a loopback S3: moto's server, started here on
127.0.0.1 with a free port and stopped at the end, reached by s3fs through the standard AWS
environment variables (fake credentials, AWS_ENDPOINT_URL). `extract --out s3://...` gives the
folder's set; `inspect`, `verify` and `train` from the URL give what they give from the folder; the
secret key never reaches an output, a run folder, the cache or the bucket."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("s3fs", reason="s3fs is not installed (pip install 'arra-pipe[test]' or 'arra-pipe[s3]')")
pytest.importorskip("moto.server", reason="moto's server is not installed (pip install 'moto[server]', in the test extra)")

from moto.server import ThreadedMotoServer  # noqa: E402
from s3fs import S3FileSystem  # noqa: E402

from conftest import TEACHER_RES, write_image  # noqa: E402
from pipeline.data.featureset import FeatureSet  # noqa: E402
from pipeline.data.remote import CACHE_ENV, RETRIES_ENV  # noqa: E402
from stages.cli import main  # noqa: E402

BUCKET = "arra-sets"
KEY_ID, SECRET = "AKIAMOTOTESTKEY", "moto-s3cr3t-Kq7vW2xZ"
# variables that could point botocore at a real account or another endpoint instead of the server
CLEARED = ["AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3",
           "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
           "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", CACHE_ENV]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The moto server (its .url) with an empty bucket, the environment set for botocore (in this
    process and the ones it starts) while the module runs."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    server.url = f"http://{host}:{port}"
    nothing = tmp_path_factory.mktemp("aws") / "none"             # no ~/.aws config or credentials files
    with pytest.MonkeyPatch.context() as mp:
        for name in CLEARED:
            mp.delenv(name, raising=False)
        for name, value in {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": server.url,
                            "AWS_CONFIG_FILE": str(nothing), "AWS_SHARED_CREDENTIALS_FILE": str(nothing),
                            "AWS_EC2_METADATA_DISABLED": "true", RETRIES_ENV: "2"}.items():
            mp.setenv(name, value)
        S3FileSystem.clear_instance_cache()                          # none made before this environment
        S3FileSystem().mkdir(BUCKET)
        try:
            yield server
        finally:
            S3FileSystem.clear_instance_cache()
            server.stop()


def flags(codebook):
    return ["--tokenizer-path", codebook, "--teacher-resolution", str(TEACHER_RES), "--batch-size", "4",
            "--workers", "0", "--shard-size", "8", "--no-progress", "--max-reject-rate", "1.0"]


@pytest.fixture(scope="module")
def sets(s3, codebook, tmp_path_factory):
    """One small source extracted to s3://BUCKET/sets/x and to a folder: (url, folder, staging
    root, the extraction's output)."""
    root = tmp_path_factory.mktemp("s3src")
    for i in range(20):
        write_image(root / "images" / f"c{i % 2}" / f"{i:03d}.png", seed=i)
    url, local, cache = f"s3://{BUCKET}/sets/x", root / "local", root / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(cache))                             # the staging folder goes under it
        done = CliRunner().invoke(main, ["extract", str(root / "images"), "--out", url, *flags(codebook)],
                                  catch_exceptions=False)
    assert done.exit_code == 0, done.output
    ref = CliRunner().invoke(main, ["extract", str(root / "images"), "--out", str(local), *flags(codebook)],
                             catch_exceptions=False)
    assert ref.exit_code == 0, ref.output
    return url, local, cache, done.output


@pytest.fixture(scope="module")
def copied(sets, tmp_path_factory):
    """The set at the URL copied object by object into a folder: the same manifest (its creation
    time included), so that what a command prints for it may be compared with the URL's."""
    url, _, _, _ = sets
    folder = tmp_path_factory.mktemp("s3copy") / "x"
    for path, data in bucket_objects().items():
        target = folder / path.removeprefix(f"{BUCKET}/sets/x/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return folder



def arra_pipe(*args, ok=True, **env) -> subprocess.CompletedProcess:
    """The CLI in a new process, with this process's environment (the AWS variables included)
    and `env`."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run([sys.executable, "-m", "stages.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert (done.returncode == 0) == ok, done.stderr[-4000:]
    return done


def everything_written(*folders: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for f in folders if Path(f).exists()
                     for p in Path(f).rglob("*") if p.is_file())


def bucket_objects() -> dict[str, bytes]:
    fs = S3FileSystem()
    fs.invalidate_cache()
    return {p: fs.cat_file(p) for p in fs.find(BUCKET)}


def test_extract_to_s3_uploads_the_folders_set_and_nothing_else(sets):
    url, local, cache, output = sets
    remote, folder = FeatureSet.open(url), FeatureSet.open(local)
    entries = [{k: s[k] for k in ("name", "rows", "bytes", "sha256")} for s in remote.manifest["shards"]]
    assert entries == [{k: s[k] for k in ("name", "rows", "bytes", "sha256")} for s in folder.manifest["shards"]]
    assert len(entries) == 3 and remote.manifest["rows"] == folder.manifest["rows"] == 20
    assert remote.verify() == [] and remote.table().equals(folder.table())
    objects = bucket_objects()
    names = sorted(p.removeprefix(f"{BUCKET}/sets/x/") for p in objects)
    assert names == sorted(["manifest.json", "rejects.jsonl", *(s["name"] for s in entries)])   # no progress/ left
    for s in entries:
        assert objects[f"{BUCKET}/sets/x/{s['name']}"] == (local / s["name"]).read_bytes()
    assert not list((cache / "staging").iterdir())                   # the staging folder went with the job
    assert url in output
    for text in [output, everything_written(cache), *(b.decode("latin-1") for b in objects.values())]:
        assert SECRET not in text


def test_inspect_and_verify_from_s3_print_what_they_print_for_the_folder(sets, copied, tmp_path):
    url, local = sets[0], copied
    cache = tmp_path / "cache"
    outputs = []
    for args in (["inspect"], ["verify", "--cache-dir", cache]):
        a = arra_pipe(args[0], local, *args[1:])
        b = arra_pipe(args[0], url, *args[1:])
        assert b.stdout == a.stdout.replace(str(local), url), (a.stdout, b.stdout)
        outputs += [b.stdout, b.stderr]
    assert "OK" in outputs[2]
    shas = sorted(s["sha256"] for s in FeatureSet.open(local).manifest["shards"])
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == shas   # verify fetched every shard, checked
    missing = arra_pipe("inspect", f"s3://{BUCKET}/sets/nothing", ok=False)
    assert f"s3://{BUCKET}/sets/nothing: no manifest.json" in missing.stderr
    embedded = arra_pipe("inspect", f"s3://{KEY_ID}:{SECRET}@{BUCKET}/sets/x", ok=False)
    assert "s3://***@arra-sets/sets/x: s3:// URLs cannot carry credentials" in embedded.stderr, embedded.stderr
    for text in [*outputs, missing.stdout, missing.stderr, embedded.stdout, embedded.stderr,
                 everything_written(cache)]:
        assert SECRET not in text


def test_train_from_s3_gives_the_losses_of_the_folder(sets, tmp_path):
    url, local, _, _ = sets                                         # the independently extracted folder
    runs, cache = (tmp_path / "run-local", tmp_path / "run-s3"), tmp_path / "cache"
    train = ["--micro-batch", "8", "--steps", "2", "--lr", "3e-3", "--no-progress", "--seed", "3"]
    arra_pipe("train", local, "--out", runs[0], *train)
    done = arra_pipe("train", url, "--out", runs[1], "--cache-dir", cache, *train)
    losses = [[{k: v for k, v in json.loads(line).items() if not k.endswith("_per_s")}
               for line in (r / "metrics.jsonl").read_text().splitlines()] for r in runs]
    assert len(losses[1]) == 2 and losses[1] == losses[0]
    assert json.loads((runs[1] / "train_config.json").read_text())["sets"] == [url]
    assert len([p for p in cache.rglob("*") if p.is_file()]) == 3    # the shards, by sha256
    for text in [done.stdout, done.stderr, everything_written(runs[1], cache)]:
        assert SECRET not in text


def test_an_unreachable_endpoint_is_reported_and_not_taken_for_a_missing_set(sets, codebook, tmp_path):
    url = sets[0]
    with socket.socket() as sock:                                    # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    down = {"AWS_ENDPOINT_URL": closed, "AWS_MAX_ATTEMPTS": "1", CACHE_ENV: str(tmp_path / "cache")}
    images = tmp_path / "images"
    for i in range(4):
        write_image(images / "c0" / f"{i}.png", seed=i)
    done = arra_pipe("extract", images, "--out", f"s3://{BUCKET}/sets/y", *flags(codebook), ok=False, **down)
    assert f"s3://{BUCKET}/sets/y/manifest.json: looking up failed 2 times" in done.stderr, done.stderr
    assert not (tmp_path / "cache" / "staging").exists()            # refused before extracting anything
    read = arra_pipe("inspect", url, ok=False, **down)
    assert f"{url}/" in read.stderr and "looking up failed 2 times" in read.stderr and "no manifest" not in read.stderr
    for text in (done.stdout, done.stderr, read.stdout, read.stderr):
        assert SECRET not in text
