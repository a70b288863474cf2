"""Whether CPU extraction could run its teachers under bf16 autocast: features against fp32, and speed.

Issue 19 asks for bf16 on CPUs that execute it natively, only where features stay within a tested
tolerance of fp32. This prints, for each real teacher that ships in a package (EfficientNet-Lite0/1/2),
on the same --images Fashion-MNIST crops fed at the teacher's native size: the cosine and the relative
error of each bf16 feature against fp32 (the float16 storage rounding beside it, as the floor a set
already has), and rows/s of both precisions at --model-batch, side by side in one run. Whether this
CPU has native bf16 (oneDNN's own check) is printed first: without it, the bf16 speed is emulation.

    .venv/bin/python benchmarks/teacher_bf16.py [--images 64] [--model-batch 16]
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
from pipeline.models.frozen import to_float  # noqa: E402
from pipeline.models.registry import build  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--images", type=int, default=64)
p.add_argument("--model-batch", type=int, default=16)
args = p.parse_args()
reuse_freed_memory()  # as the CLI runs

fm = Path("/usr/share/datasets/fashion-mnist")
fm = fm if fm.is_dir() else Path(__file__).resolve().parents[1] / "data" / "fashion-mnist-mini"
pixels = torch.from_numpy(read_idx(str(fm / "t10k-images-idx3-ubyte.gz"))[:args.images].copy())
print(f"native bf16 on this CPU (torch.ops.mkldnn._is_mkldnn_bf16_supported): {torch.ops.mkldnn._is_mkldnn_bf16_supported()}; "
      f"{torch.get_num_threads()} threads, {len(pixels)} Fashion-MNIST test images")


def features(teacher, x, bf16):
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return torch.cat([teacher.features((to_float(x[i:i + args.model_batch], teacher.device) - teacher.mean) / teacher.std).float()
                          for i in range(0, len(x), args.model_batch)])


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, len(pixels) / (time.perf_counter() - start)


print(f"\n{'teacher':<20} {'cos min':>8} {'cos mean':>9} {'rel err max':>12} {'fp16 storage rel err max':>25} "
      f"{'fp32 rows/s':>12} {'bf16 rows/s':>12}")
for name in ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"):
    teacher = build("teachers", name, None).eval()
    rgb = pixels[:, None].expand(-1, 3, -1, -1).float()
    x = F.interpolate(rgb, size=teacher.input_size, mode="bicubic").clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    features(teacher, x[:args.model_batch], False), features(teacher, x[:args.model_batch], True)  # warm-up
    (full, fp32_rate), (half, bf16_rate) = timed(lambda: features(teacher, x, False)), timed(lambda: features(teacher, x, True))
    rel = lambda a: ((a - full).norm(dim=1) / full.norm(dim=1)).max().item()  # noqa: E731
    cos = F.cosine_similarity(full, half)
    print(f"{name:<20} {cos.min().item():>8.4f} {cos.mean().item():>9.4f} {rel(half):>12.3f} "
          f"{rel(full.half().float()):>25.5f} {fp32_rate:>12.1f} {bf16_rate:>12.1f}")
