"""Stage 1 (`extract`) against the official ARRA way of storing features, on the same images and models.

The official ARRA code extracts one image at a time and writes two files per image: the VQ tokens
(`{stem}_tokens.pt`) and the teacher feature as a float32 [1, dim] tensor (`{stem}_visual_feature.pt`),
both with `torch.save`. arra-pipe decodes in DataLoader workers, runs the models on batches and
writes float16 features + uint16 codes as Arrow record batches in WebDataset tar shards.

Both pipelines here read the same N JPEGs (Fashion-MNIST upscaled to 256x256 RGB, so decode + resize
cost something), use the same kmeans tokenizer codebook and the same EfficientNet-Lite0 teacher, and
feed the teacher the canonical crop resized to its input size (arra-pipe's default `teacher_view="crop"`).
Printed: rows/s, bytes per row on disk against the raw payload (codes + features + key + caption),
files per row, how close end-to-end extraction gets to the bare batched model forward (no I/O), and
the bare forward's rows/s at each of --model-batches, measured side by side (what `MODEL_BATCH` rests on),
and the CPU time of extract's own decode + crop per image, with the ceiling it sets on end to end / bare
forward when the models' cores also decode (0 workers).
The three run in turn, once per round (--rounds), and each ratio is the median of the rounds' ratios.

    .venv/bin/python benchmarks/extract_vs_official.py [--images N] [--teacher-resolution R] [--workers W]
        [--batch-size B] [--model-batch M] [--model-batches 4,16,64] [--rounds 3] [--no-heap-reuse] [--inline-arm]
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.data.featureset import read_shard  # noqa: E402
from pipeline.data.images import DEFAULT_MAX_PIXELS, center_crop, resize_square, to_array  # noqa: E402
from pipeline.models.registry import build  # noqa: E402
from pipeline.data.sources import FASHION_MNIST_CLASSES, read_idx, read_source  # noqa: E402
import stages.extract  # noqa: E402
from stages.extract import ExtractOptions, extract  # noqa: E402
from pipeline.data.crops import CropDataset, cpu_split  # noqa: E402
from pipeline.distributed import torch_threads  # noqa: E402
from pipeline.host_memory import reuse_freed_memory  # noqa: E402
from stages.tokenizer_fit import fit_tokenizer  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--images", type=int, default=1000)
p.add_argument("--teacher-resolution", type=int, default=None, help="default: the teacher's native size")
p.add_argument("--workers", type=int, default=None, help="default: extract's own split of the CPUs")
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--model-batch", type=int, default=None, help="default: extract's per-device MODEL_BATCH")
p.add_argument("--model-batches", default="4,16,64", help="bare forward batch sizes compared side by side")
p.add_argument("--size", type=int, default=256, help="side of the JPEGs written from Fashion-MNIST")
p.add_argument("--rounds", type=int, default=3, help="each pipeline runs once per round; ratios are medians over rounds")
p.add_argument("--no-heap-reuse", action="store_true", help="leave glibc's malloc as it is (the CLI sets reuse_freed_memory)")
p.add_argument("--inline-arm", action="store_true",
               help="also run arra-pipe with each batch decoded when the models ask for it (no Prefetch thread) every round")
args = p.parse_args()
if not args.no_heap_reuse:
    reuse_freed_memory()  # as the CLI does for every command: all three pipelines below run under it
N, R, B = args.images, args.teacher_resolution, args.batch_size


def cpu_seconds():  # (busy CPU seconds of the whole machine, of this process and its reaped children)
    v, t = [int(x) for x in open("/proc/stat").readline().split()[1:]], os.times()
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system


def timed(fn):
    """fn() -> (its result, seconds, share of the machine's CPU that other processes used meanwhile)."""
    (all0, me0), t = cpu_seconds(), time.perf_counter()
    out = fn()
    (all1, me1), s = cpu_seconds(), time.perf_counter() - t
    return out, s, max(0.0, (all1 - all0) - (me1 - me0)) / (s * os.cpu_count())


def sizes(folder):  # (files, bytes, bytes allocated on disk)
    files = [f for f in Path(folder).rglob("*") if f.is_file()]
    return len(files), sum(f.stat().st_size for f in files), sum(f.stat().st_blocks * 512 for f in files)


tmp = tempfile.TemporaryDirectory(prefix="arra-bench-")
root = Path(tmp.name)

# ---- 1. N real images as JPEG files in class subfolders, and one kmeans codebook for both pipelines
fm = Path("/usr/share/datasets/fashion-mnist")
fm = fm if fm.is_dir() else Path(__file__).resolve().parents[1] / "data" / "fashion-mnist-mini"
pixels = read_idx(str(fm / "train-images-idx3-ubyte.gz"))
labels = read_idx(str(fm / "train-labels-idx1-ubyte.gz"))
N = min(N, len(pixels))
images = root / "images"
paths = []
for i in range(N):
    d = images / FASHION_MNIST_CLASSES[labels[i]].replace("/", "-").replace(" ", "_")
    d.mkdir(parents=True, exist_ok=True)
    paths.append(d / f"{i:05d}.jpg")
    Image.fromarray(pixels[i]).convert("RGB").resize((args.size, args.size), Image.BICUBIC).save(paths[-1], quality=90)
codebook = str(root / "codebook.safetensors")
fit_tokenizer(str(images), codebook, resolution=32, patch=4, codebook_size=1024, max_images=min(N, 1000),
              iterations=10, workers=cpu_split(args.workers)[0], progress=False, log=lambda m: None)
tokenizer = build("tokenizers", "kmeans", codebook).eval()
teacher = build("teachers", "efficientnet-lite0", None, input_size=R).eval()
R = teacher.input_size
print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, "
      f"load average {os.getloadavg()[0]:.2f} at start")
print(f"settings: {N} images {args.size}x{args.size} JPEG from {fm}, tokenizer kmeans 32px/4px/1024 codes, "
      f"teacher efficientnet-lite0 @ {R}px ({teacher.dim}-d), batch size {B}")



# ---- 2. official pattern: one image at a time, batch of 1, two torch.save files per image
def official_one(path, out):
    crop = center_crop(Image.open(path).convert("RGB"), tokenizer.resolution)
    codes = tokenizer.encode(torch.tensor(to_array(crop))[None])
    feat = teacher(torch.tensor(to_array(resize_square(crop, R)))[None])
    if out is not None:
        torch.save(codes, out / f"{path.stem}_tokens.pt")
        torch.save(feat.float().reshape(1, -1), out / f"{path.stem}_visual_feature.pt")
    return codes


def official_run(r):
    out = root / f"official-{r}"
    out.mkdir()
    codes, s, busy = timed(lambda: {p.stem: official_one(p, out).flatten() for p in paths})
    return {"rate": N / s, "busy": busy, "codes": codes, "sizes": sizes(out)}


# ---- 3. arra-pipe
class Inline:
    """Prefetch's interface without its thread: each batch is decoded when the models ask for it."""

    def __init__(self, batches, pin, depth):
        self.batches = batches

    def __enter__(self):
        return self.batches

    def __exit__(self, *exc):
        pass


def arra_run(r, inline=False):
    out = root / f"set-{r}{'-inline' if inline else ''}"
    opts = ExtractOptions(source=str(images), out=str(out), tokenizer_path=codebook, teacher_resolution=R,
                          workers=args.workers, batch_size=B, model_batch=args.model_batch, progress=False)
    prefetch, stages.extract.Prefetch = stages.extract.Prefetch, Inline if inline else stages.extract.Prefetch
    try:
        res, wall, busy = timed(lambda: extract(opts, log=lambda m: None))
    finally:
        stages.extract.Prefetch = prefetch
    return {"rate": res.rows / res.seconds, "wall_rate": res.rows / wall, "busy": busy, "res": res, "set": out}


# ---- 4. bare batched forward on pre-decoded, pre-cropped uint8 tensors (no I/O, no decode), at extract's threads
crops = [center_crop(Image.open(p).convert("RGB"), tokenizer.resolution) for p in paths]
x32 = torch.from_numpy(np.stack([to_array(c) for c in crops]))
xr = torch.from_numpy(np.stack([to_array(resize_square(c, R)) for c in crops]))


dataset = CropDataset(read_source(str(images)).records, tokenizer.resolution, [R], "crop", DEFAULT_MAX_PIXELS)


def decode_cpu_seconds():
    """CPU seconds of extract's own decode + crop + teacher view for all N images, on one thread: what
    the models' 2 cores must also find time for when no worker decodes."""
    t = os.times()
    for i in range(len(dataset)):
        dataset[i]
    u = os.times()
    return (u.user + u.system) - (t.user + t.system)


def bare(m, threads):  # (rows/s, others' CPU share)
    with torch_threads(threads):
        forward = lambda: [(tokenizer.encode(x32[i:i + m]), teacher(xr[i:i + m])) for i in range(0, N, m)]  # noqa: E731
        _, s, busy = timed(forward)
    return N / s, busy


# ---- 5. the rounds: each pipeline once per round, in the same order, so that the machine's drift
# (its speed moved 1.5x between minutes here) falls on all of them alike; ratios are per round
official_one(paths[0], None)  # warm-up, not timed
rounds, ceilings = [], []
for r in range(args.rounds):
    off, arra = official_run(r), arra_run(r)
    manifest = json.loads((arra["set"] / "manifest.json").read_text())
    M, split = manifest["compute"]["model_batch"], manifest["throughput"]
    sweep = {m: bare(m, split["model_threads"]) for m in sorted({int(x) for x in args.model_batches.split(",")} | {M})}
    inline = arra_run(r, inline=True) if args.inline_arm else None
    decode = decode_cpu_seconds()
    rounds.append((off, arra, sweep, inline))
    # the bare forward keeps `threads` cores busy for N / rate seconds; decoding adds `decode` CPU seconds
    # that those cores must also run, so at best end to end takes N / rate + decode / threads
    bare_s = N / sweep[M][0]
    ceilings.append(bare_s / (bare_s + decode / split["model_threads"]))
    print(f"         decode + crop: {decode / N * 1000:.2f} CPU-ms per image ({decode:.1f} CPU-s), "
          f"{decode / (bare_s * split['model_threads']):.1%} of the bare forward's CPU; ceiling of end to end / bare "
          f"forward with both on {split['model_threads']} cores: {ceilings[-1]:.1%}", flush=True)
    print(f"round {r + 1}: official {off['rate']:.1f} rows/s, arra-pipe {arra['rate']:.1f}, bare forward batch {M} "
          f"{sweep[M][0]:.1f}: {arra['rate'] / off['rate']:.2f}x the official loop, {arra['rate'] / sweep[M][0]:.1%} of "
          f"the bare forward (others' CPU {off['busy']:.0%} / {arra['busy']:.0%} / {sweep[M][1]:.0%})"
          + (f"; decoded inline {inline['rate']:.1f} rows/s, {inline['rate'] / sweep[M][0]:.1%} of the bare forward "
             f"(others' CPU {inline['busy']:.0%})" if inline else ""), flush=True)

print(f"arra-pipe: model batch {M}, {split['decode_workers']} decode workers, {split['model_threads']} model threads")
off, arra, sweep, _ = rounds[-1]
res = arra["res"]
payload = manifest["payload_bytes"] / res.rows
(off_files, off_bytes, off_alloc), (arra_files, arra_bytes, arra_alloc) = off["sizes"], sizes(arra["set"])
same = sum(np.array_equal(off["codes"][Path(k).stem].numpy(), c)
           for shard in arra["set"].rglob("*.tar") for b in read_shard(shard)
           for k, c in zip(b.column("key").to_pylist(), b.column("codes").to_numpy(zero_copy_only=False)))
median = lambda xs: float(np.median(xs))  # noqa: E731
rates = {"official": [o["rate"] for o, _, _, _ in rounds], "loop": [a["rate"] for _, a, _, _ in rounds],
         "wall": [a["wall_rate"] for _, a, _, _ in rounds], "bare": [s[M][0] for _, _, s, _ in rounds],
         "inline": [i["rate"] for _, _, _, i in rounds if i]}
per_row = (arra_bytes / res.rows, arra_alloc / res.rows, arra_files / res.rows)
rows = [("official (1 image, 2 torch.save files)", rates["official"], (off_bytes / N, off_alloc / N, off_files / N)),
        ("arra-pipe, loop (result.seconds)", rates["loop"], per_row),
        ("arra-pipe, wall (incl. model load)", rates["wall"], per_row),
        (f"bare forward, batch {M} (no I/O)", rates["bare"], None)]
print(f"\n{'pipeline':<40} {'rows/s (median)':>16} {'per round':>24} {'bytes/row':>10} {'disk/row':>9} {'files/row':>10}")
for name, rate, sizes_ in rows:
    print(f"{name:<40} {median(rate):>16.1f} {' '.join(f'{x:.1f}' for x in rate):>24} "
          + (f"{sizes_[0]:>10.0f} {sizes_[1]:>9.0f} {sizes_[2]:>10.4f}" if sizes_ else f"{'-':>10} {'-':>9} {'-':>10}"))
print(f"(bytes/row = sum of file sizes / rows; disk/row = allocated blocks / rows; raw payload = {payload:.0f} bytes/row:\n"
      f" codes + features + key + caption; others' CPU per part is in the round lines)\n")
print(f"rows: official {N}, arra-pipe {res.rows} (+{res.rejects} rejects); codes identical for {same}/{res.rows} rows")
ratio = lambda a, b: [x / y for x, y in zip(rates[a], rates[b])]  # noqa: E731
print(f"speed-up arra-pipe / official:     {median(ratio('loop', 'official')):6.2f}x loop, "
      f"{median(ratio('wall', 'official')):6.2f}x wall   (median of the rounds' ratios; goal >= 1.5x)")
print(f"arra-pipe bytes/row / payload:     {arra_bytes / res.rows / payload:6.3f}x   (goal <= 1.05x)")
print(f"official bytes/row / payload:      {off_bytes / N / payload:6.3f}x")
print(f"end-to-end / bare forward:         {median(ratio('loop', 'bare')):6.1%} loop, {median(ratio('wall', 'bare')):6.1%} wall"
      f"   (goal >= 90 %; ceiling with decoding on the models' cores {median(ceilings):.1%})")
print("bare forward by model batch:       " + ", ".join(
    f"{m}: {median([s[m][0] for _, _, s, _ in rounds]):.1f} rows/s ({median([s[M][0] / s[m][0] for _, _, s, _ in rounds]):.2f}x the time of {M})"
    for m in sweep))
if rates["inline"]:
    print(f"decoded inline (no Prefetch):      {median(ratio('inline', 'bare')):6.1%} of the bare forward, "
          f"decode-ahead / inline {median(ratio('loop', 'inline')):.2f}x")
tmp.cleanup()
