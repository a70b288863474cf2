"""How much Inception's input resize moves FID: TF 1.x's legacy bilinear (what the field's FID numbers
use) against torch's half-pixel `F.interpolate`, on the same real images.

Two disjoint sets of --n Fashion-MNIST test images (grey to RGB, at --size px as a canonical crop
would be) go through the TF-Inception network under both resizes. Printed side by side in one run:
FD between the two resizes' features of the same images (the shift a wrong resize adds on its own),
and the real-vs-real FID of the two sets under each resize (the small-n floor the shift is read against).

    .venv/bin/python benchmarks/fid_resize.py [--n 1000] [--size 32]
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.data.sources import read_idx  # noqa: E402
from pipeline.host_memory import reuse_freed_memory  # noqa: E402
from pipeline.metrics.distribution import fd  # noqa: E402
from pipeline.models.inception import Inception  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--n", type=int, default=1000)
p.add_argument("--size", type=int, default=32, help="side of the images Inception sees (the demo's crops are 32 px)")
args = p.parse_args()
reuse_freed_memory()

fm = Path("/usr/share/datasets/fashion-mnist")
fm = fm if fm.is_dir() else Path(__file__).resolve().parents[1] / "data" / "fashion-mnist-mini"
grey = torch.from_numpy(read_idx(str(fm / "t10k-images-idx3-ubyte.gz"))[:2 * args.n].copy()).float()[:, None]
images = (F.interpolate(grey, size=args.size, mode="bicubic").clamp(0, 255).round().to(torch.uint8)
          .expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy())
a, b = images[:args.n], images[args.n:]
print(f"{len(a)} + {len(b)} Fashion-MNIST test images at {args.size} px, torch {torch.__version__}, {torch.get_num_threads()} threads")
feats = {}
for resize in ("tf-legacy", "torch-bilinear"):
    net, start = Inception(resize=resize), time.perf_counter()
    feats[resize] = (net.features(a), net.features(b))
    print(f"{resize}: features of {2 * args.n} images in {time.perf_counter() - start:.0f} s")
(ta, tb), (pa, pb) = feats["tf-legacy"], feats["torch-bilinear"]
print(f"\nFD(tf-legacy features, torch-bilinear features) of the same {args.n} images: {fd(ta, pa):.2f} (set A), {fd(tb, pb):.2f} (set B)")
print(f"real-vs-real FID, set A against set B: tf-legacy {fd(ta, tb):.2f}, torch-bilinear {fd(pa, pb):.2f}")
print(f"FID of set A (torch-bilinear) against set B (tf-legacy), a wrong resize on one side: {fd(pa, tb):.2f}")
