"""Train-time reading: arra-pipe feature-set shards against the official ARRA per-sample files.

Both arms turn the same rows (grid 32x32 = 1024 codes from a 8192-code codebook, one 512-d teacher
feature, as the paper's Chameleon codes + BiomedCLIP) into device-ready batches of tensors, single
process, page cache warm for both:

- arra-pipe: `TrainStream.epoch(0)` over Arrow-in-tar shards (float16 features, uint16 codes, 64-row
  record batches, 4096-row shards, as `extract` writes them), shuffle buffer, sequence layout.
- official: per row one pickle {"token": [ints], "label": [ints]} (`pickle.load`) and one
  `torch.save`d [1, D] float32 tensor (`torch.load`), read in shuffled order and collated by padding.

Printed: rows/s, rows/s per thread, rows per CPU-second, the ratio, and bytes on disk per row.

    .venv/bin/python benchmarks/train_reader.py [--rows N] [--official-rows M] [--grid G] [--dim D] [--micro-batch B] [--repeats R]
"""

import argparse
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.data.featureset import FeatureSet  # noqa: E402
from pipeline.data.train_data import IGNORE, TrainStream  # noqa: E402
from pipeline.lm.vocab import VocabLayout  # noqa: E402
from synthetic_set import write_synthetic_set  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--rows", type=int, default=20000, help="rows in the feature set (and timed through TrainStream)")
p.add_argument("--official-rows", type=int, default=8000, help="rows written and timed in the official layout")
p.add_argument("--grid", type=int, default=32)
p.add_argument("--codebook", type=int, default=8192)
p.add_argument("--dim", type=int, default=512)
p.add_argument("--classes", type=int, default=10)
p.add_argument("--micro-batch", type=int, default=32)
p.add_argument("--shard-size", type=int, default=4096)
p.add_argument("--repeats", type=int, default=3, help="timed passes per arm, alternating arms; the median is shown")
p.add_argument("--member-rows", type=int, default=64, help="rows per Arrow record batch (extract's --batch-size)")
args = p.parse_args()
N, M, L, D, B = args.rows, min(args.official_rows, args.rows), args.grid * args.grid, args.dim, args.micro_batch

tmp = tempfile.TemporaryDirectory(prefix="arra-reader-")
root = Path(tmp.name)
rng = np.random.default_rng(0)
labels = rng.integers(0, args.classes, N)
codes = rng.integers(0, args.codebook, (N, L)).astype(np.uint16)
feats = rng.standard_normal((N, D)).astype(np.float16)
layout = VocabLayout("class", args.classes + 1, args.codebook, (args.grid, args.grid), {"name": "synthetic"})


def disk(files):  # (apparent bytes, allocated bytes)
    st = [f.stat() for f in files]
    return sum(s.st_size for s in st), sum(s.st_blocks * 512 for s in st)


def warm(files):
    for f in files:
        f.read_bytes()


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    rows = fn()
    return rows, time.perf_counter() - t, time.process_time() - c


# ---- arra-pipe feature set: shards written directly, manifest with what FeatureSet/TrainStream read
fs_dir = root / "set"
write_synthetic_set(fs_dir, labels, codes, feats, args.grid, args.codebook, args.classes, args.shard_size,
                    args.member_rows)
fs = FeatureSet.open(fs_dir)

# ---- official layout: per row a pickle of token/label lists and a torch.save'd [1, D] float32 tensor
off_dir = root / "official"
off_dir.mkdir()
t0 = time.perf_counter()
for i in range(M):
    token = [int(labels[i]), layout.boi, *(codes[i].astype(np.int64) + layout.image_offset).tolist(), layout.eoi]
    with open(off_dir / f"{i:08d}.pkl", "wb") as f:
        pickle.dump({"token": token, "label": [IGNORE, IGNORE] + token[2:]}, f)
    torch.save(torch.from_numpy(feats[i:i + 1].astype(np.float32)), off_dir / f"{i:08d}_visual_feature.pt")
write_official = time.perf_counter() - t0


def read_ours():
    stream = TrainStream([fs], "synthetic", layout, B, seed=0)
    rows = 0
    for batch in stream.epoch(0):
        rows += len(batch["input_ids"])
        if rows + B > N:
            return rows


def official_collate(samples):  # pad as the official (Lumina-mGPT style) trainer does: torch.tensor per sample
    t = max(len(s["token"]) for s in samples)
    ids = torch.full((len(samples), t), layout.pad, dtype=torch.long)
    lab = torch.full((len(samples), t), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(samples), t), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["token"])
        ids[i, :n], lab[i, :n], attn[i, :n] = torch.tensor(s["token"]), torch.tensor(s["label"]), 1
    return {"input_ids": ids, "attention_mask": attn, "labels": lab,
            "teacher": torch.cat([s["feat"] for s in samples])}


class PlainUnpickler(pickle.Unpickler):
    """The official rows hold only dicts and lists of ints: refuse any class or function a pickle
    names, so reading one runs nothing (as fast as pickle.load for plain data)."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"{module}.{name}: only plain data is read")


def read_official():
    order, rows = np.random.default_rng(0).permutation(M), 0
    for i in range(0, len(order) - B + 1, B):
        samples = []
        for j in order[i:i + B]:
            with open(off_dir / f"{j:08d}.pkl", "rb") as f:
                s = PlainUnpickler(f).load()
            s["feat"] = torch.load(off_dir / f"{j:08d}_visual_feature.pt")
            samples.append(s)
        rows += len(official_collate(samples)["input_ids"])
    return rows


ours_files, off_files = fs.shard_paths(), sorted(off_dir.iterdir())
warm(ours_files), warm(off_files)
runs = {read_ours: [], read_official: []}
for r in range(args.repeats):  # alternate the arms so load from other jobs hits both alike
    for fn in ((read_ours, read_official) if r % 2 == 0 else (read_official, read_ours)):
        runs[fn].append(timed(fn))
med = {fn: sorted(v, key=lambda x: x[0] / x[1])[len(v) // 2] for fn, v in runs.items()}  # median by rows/s
results = {"arra-pipe shards": (med[read_ours], disk(ours_files), len(ours_files) / N),
           "official pkl + pt": (med[read_official], disk(off_files), len(off_files) / M)}

threads, cores = torch.get_num_threads(), os.cpu_count()
print(f"rows: {N} in the feature set, {M} in the official layout (written in {write_official:.1f} s); "
      f"grid {args.grid}x{args.grid} codes of {args.codebook}, {D}-d teacher; micro-batch {B}; "
      f"torch threads {threads}, cpu_count {cores}; median of {args.repeats} passes per arm")
print(f"{'':20s} {'rows':>6s} {'rows/s':>9s} {'rows/s/thread':>13s} {'rows/CPU-s':>10s} {'B/row':>7s} {'alloc B/row':>11s} {'files/row':>9s}")
speed, per_cpu = {}, {}
for name, ((rows, wall, cpu), (size, alloc), files) in results.items():
    speed[name], per_cpu[name] = rows / wall, rows / max(cpu, 1e-9)
    per_row = N if name.startswith("arra") else M
    print(f"{name:20s} {rows:6d} {rows / wall:9.0f} {rows / wall / threads:13.0f} {rows / max(cpu, 1e-9):10.0f} "
          f"{size / per_row:7.0f} {alloc / per_row:11.0f} {files:9.4f}")
(a, o), (ac, oc) = speed.values(), per_cpu.values()
print(f"ratio arra-pipe / official: {a / o:.1f}x rows/s, {ac / oc:.1f}x rows per CPU-second (issue goal: >= 100x)")
