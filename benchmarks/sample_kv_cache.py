"""Sampling throughput with the KV cache against recomputing the whole prefix at every step.

Both arms run `pipeline.lm.generate.generate` on the same randomly initialised class-conditional
model, conditions, seeds and guidance (so both produce the same images); they alternate, and the
median of the repetitions is reported. Run it on a GPU with --device cuda.
"""

import argparse
import statistics
import time

import torch

from pipeline.lm.generate import Sampling, generate
from pipeline.lm.causal_lm import build_from_preset
from pipeline.lm.vocab import VocabLayout

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--preset", default="mini")
p.add_argument("--grid", type=int, default=8, help="image side in codes (8 -> 64 codes per image)")
p.add_argument("--codebook", type=int, default=1024)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--cfg", type=float, default=2.0)
p.add_argument("--reps", type=int, default=3)
p.add_argument("--device", default="cpu")
args = p.parse_args()

layout = VocabLayout("class", 11, args.codebook, (args.grid, args.grid), {})
torch.manual_seed(0)
model = build_from_preset(args.preset, layout.vocab_size, layout.image_tokens + 3).to(args.device).eval()
conditions, seeds = [[i % 10] for i in range(args.batch)], list(range(args.batch))
sampling = Sampling(cfg=args.cfg)
times = {True: [], False: []}
codes = {}
generate(model, layout, conditions[:2], [layout.null_class], seeds[:2], sampling)  # warm-up
for _ in range(args.reps):
    for cached in (True, False):
        start = time.perf_counter()
        codes[cached] = generate(model, layout, conditions, [layout.null_class], seeds, sampling, kv_cache=cached)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times[cached].append(time.perf_counter() - start)
rate = {k: args.batch / statistics.median(v) for k, v in times.items()}
print(f"{args.preset}, {layout.image_tokens} codes per image, batch {args.batch}, cfg {args.cfg}, {args.device}, "
      f"{torch.get_num_threads()} threads, median of {args.reps}")
print(f"{'':16s} {'images/s':>10s}")
print(f"{'KV cache':16s} {rate[True]:10.2f}")
print(f"{'recompute':16s} {rate[False]:10.2f}")
print(f"ratio {rate[True] / rate[False]:.2f}x; same images: {torch.equal(codes[True], codes[False])}")
