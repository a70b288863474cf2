"""Training-reader rows/s from a feature set at an HTTP URL (loopback) against the same set on disk.

One synthetic set (grid 32x32 = 1024 uint16 codes from a 8192-code codebook, one 512-d float16
teacher feature per row, 64-row record batches, 4096-row shards, as `extract` writes them) is read
by `TrainStream.epoch(0)` into device-ready batches, single process, in four arms:

- local:       the set's folder (page cache warm);
- url, cold:   http://127.0.0.1:PORT/set served by `python -m http.server` in another process,
               with an empty --cache-dir (every shard fetched, checked, written to the cache);
- url, warm:   the same URL with the cache filled by the cold pass (no shard fetched);
- url, none:   the same URL without a cache.

Arms alternate, `--repeats` passes each; the median rows/s is shown, with each URL arm's ratio
to local.

    .venv/bin/python benchmarks/remote_reader.py [--rows N] [--repeats R] [--micro-batch B]
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.data.featureset import MANIFEST, FeatureSet  # noqa: E402
from pipeline.data.remote import CACHE_ENV  # noqa: E402
from pipeline.data.train_data import TrainStream  # noqa: E402
from pipeline.lm.vocab import VocabLayout  # noqa: E402
from synthetic_set import write_synthetic_set  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--rows", type=int, default=20000)
p.add_argument("--grid", type=int, default=32)
p.add_argument("--codebook", type=int, default=8192)
p.add_argument("--dim", type=int, default=512)
p.add_argument("--micro-batch", type=int, default=32)
p.add_argument("--shard-size", type=int, default=4096)
p.add_argument("--member-rows", type=int, default=64)
p.add_argument("--repeats", type=int, default=3)
args = p.parse_args()
N, L, D, B = args.rows, args.grid * args.grid, args.dim, args.micro_batch

tmp = tempfile.TemporaryDirectory(prefix="arra-remote-reader-")
root = Path(tmp.name)
rng = np.random.default_rng(0)
labels = rng.integers(0, 10, N)
codes = rng.integers(0, args.codebook, (N, L)).astype(np.uint16)
feats = rng.standard_normal((N, D)).astype(np.float16)
layout = VocabLayout("class", 11, args.codebook, (args.grid, args.grid), {"name": "synthetic"})

fs_dir = root / "set"
shards = write_synthetic_set(fs_dir, labels, codes, feats, args.grid, args.codebook, 10, args.shard_size,
                             args.member_rows)
for s in shards:
    (fs_dir / s["name"]).read_bytes()  # page cache warm for every arm

with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
url = f"http://127.0.0.1:{port}/set"
for _ in range(100):
    try:
        urllib.request.urlopen(f"{url}/{MANIFEST}").read()
        break
    except OSError:
        time.sleep(0.1)


def read(where: str, cache: Path | None) -> tuple[int, float]:
    """Rows of one pass through TrainStream (opening the set included), and its seconds."""
    if cache is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = str(cache)
    t = time.perf_counter()
    stream = TrainStream([FeatureSet.open(where)], "synthetic", layout, B, seed=0)
    rows = 0
    for batch in stream.epoch(0):
        rows += len(batch["input_ids"])
        if rows + B > N:
            break
    return rows, time.perf_counter() - t


cache = root / "cache"
arms = {"local": [], "url, cache cold": [], "url, cache warm": [], "url, no cache": []}
try:
    read(url, None)  # fsspec's and aiohttp's first import and session are not timed
    for _ in range(args.repeats):
        arms["local"].append(read(str(fs_dir), None))
        shutil.rmtree(cache, ignore_errors=True)
        arms["url, cache cold"].append(read(url, cache))
        arms["url, cache warm"].append(read(url, cache))
        arms["url, no cache"].append(read(url, None))
finally:
    server.terminate()
    server.wait()

rate = {k: sorted(r / s for r, s in v)[len(v) // 2] for k, v in arms.items()}
size = sum(s["bytes"] for s in shards)
print(f"{N} rows in {len(shards)} shards, {size / 1e6:.1f} MB ({size / N:.0f} B/row), micro-batch {B}, "
      f"{args.repeats} passes per arm, median; cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
print(f"{'arm':18s} {'rows/s':>9s} {'x local':>8s}")
for k, v in rate.items():
    print(f"{k:18s} {v:9.0f} {v / rate['local']:8.2f}")
tmp.cleanup()
