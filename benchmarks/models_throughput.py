"""Throughput of each teacher and tokenizer as arra-pipe runs it, against the bare model forward.

"ours" is what extraction calls: uint8 BxHxWx3 images in, normalisation, the network, the
aggregation (teachers) or the chunked nearest-code search (tokenizers), results back on the
host. "bare" is the network alone on an already normalised float batch on the device, at the
same batch size and precision (bf16 autocast and channels_last on CUDA, fp32 on CPU): for
teachers the transformers / timm forward, for tokenizers transformers' `JanusVQVAE.encode` /
`ChameleonVQVAE.encode` and the decoder. The ratio ours/bare says what the wrapping costs.

Weights are random, written in each model's published layout at its real size
(tests/model_checkpoints.py), and loaded through the registry like real checkpoints; only
EfficientNet-Lite0 uses its real weights. Not a test: it prints a table.

    .venv/bin/python benchmarks/models_throughput.py [--device cuda] [--batch-size 64] [--iters 10]
        [--models clip-l,llamagen-vq16,...]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import model_checkpoints as mc  # noqa: E402
from pipeline.models.registry import build  # noqa: E402

WRITERS = {  # name: (kind, writer(folder) -> path or None for packaged weights, build options)
    "efficientnet-lite0": ("teachers", None, {}),
    "biomedclip": ("teachers", lambda d: mc.write_biomedclip(d / "biomedclip", tiny=False), {}),
    "clip-l": ("teachers", lambda d: mc.write_clip(d / "clip", tiny=False), {}),
    "dinov2-s": ("teachers", lambda d: mc.write_dinov2(d / "dinov2-s", 384, tiny=False), {}),
    "dinov2-b": ("teachers", lambda d: mc.write_dinov2(d / "dinov2-b", 768, tiny=False), {}),
    "dinov2-l": ("teachers", lambda d: mc.write_dinov2(d / "dinov2-l", 1024, tiny=False), {}),
    "medsam": ("teachers", lambda d: mc.write_sam(d / "sam", tiny=False), {}),
    "llamagen-vq16": ("tokenizers", lambda d: mc.write_llamagen(d / "vq_ds16_c2i.pt", tiny=False), {}),
    "llamagen-vq16@512": ("tokenizers", lambda d: mc.write_llamagen(d / "vq_ds16_c2i.pt", tiny=False), {"resolution": 512}),
    "chameleon": ("tokenizers", lambda d: mc.write_chameleon(d / "tokenizer", tiny=False), {}),
}
CPU_DEFAULT = "efficientnet-lite0,biomedclip,dinov2-s,llamagen-vq16,chameleon"

BARE_TEACHER = {  # loader: bare forward of the network on a normalised float batch
    "clip": lambda t, x: t.net(pixel_values=x).image_embeds,
    "dinov2": lambda t, x: t.net(pixel_values=x).pooler_output,
    "sam": lambda t, x: t.net(pixel_values=x).last_hidden_state,
    "open-clip-timm": lambda t, x: t.visual.head.proj(t.visual.trunk(x)[:, 0]),
    "efficientnet-lite": lambda t, x: t.net.extract_features(x),
}


def rate(fn, batch: int, iters: int, device: torch.device) -> float:
    """Images per second of `fn()`: batch size over the median time of `iters` calls after a
    warm-up call (the median keeps a busy shared machine from skewing one side of a ratio)."""
    times = []
    with torch.inference_mode():
        for i in range(iters + 1):
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times[1:])


def float_batch(images: torch.Tensor, model, device) -> torch.Tensor:
    x = images.to(device).permute(0, 3, 1, 2).float().div(255).contiguous(memory_format=torch.channels_last)
    return (x - model.mean) / model.std if hasattr(model, "std") else x * 2 - 1


def measure(name: str, folder: Path, args, device: torch.device) -> list[tuple]:
    kind, write, options = WRITERS[name]
    model = build(kind, name.split("@")[0], str(write(folder)) if write else None, **options).to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    b = args.batch_size
    size = model.input_size if kind == "teachers" else model.resolution
    images = torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8)
    x = float_batch(images, model, device)
    rows = []
    if kind == "teachers":
        bare = BARE_TEACHER[model.spec["loader"]]
        with model.autocast():
            bare_rate = rate(lambda: bare(model, x), b, args.iters, device)
        rows.append((name, "features", size, rate(lambda: model(images).cpu(), b, args.iters, device), bare_rate))
    else:
        with model.autocast():
            bare_rate = rate(lambda: model.vq.encode(x).image_tokens, b, args.iters, device)
        rows.append((name, "encode", size, rate(lambda: model.encode(images).cpu(), b, args.iters, device), bare_rate))
        codes = model.encode(images)
        with torch.inference_mode():
            latents = model.codebook()[codes.to(device)].permute(0, 3, 1, 2).contiguous()
        with model.autocast():
            bare_rate = rate(lambda: model.vq.decoder(model.vq.post_quant_conv(latents)), b, args.iters, device)
        rows.append((name, "decode", size, rate(lambda: model.decode(codes).cpu(), b, args.iters, device), bare_rate))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 on CUDA, 4 on CPU")
    p.add_argument("--iters", type=int, default=None, help="timed batches per model (default: 10 on CUDA, 3 on CPU)")
    p.add_argument("--models", default=None, help=f"comma-separated, from {', '.join(WRITERS)} (default on CPU: {CPU_DEFAULT}; on CUDA: all)")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.batch_size = args.batch_size or (64 if cuda else 4)
    args.iters = args.iters or (10 if cuda else 3)
    names = (args.models or (",".join(WRITERS) if cuda else CPU_DEFAULT)).split(",")
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else f'{torch.get_num_threads()} threads'}), "
          f"{'bf16 autocast' if cuda else 'fp32'}, batch {args.batch_size}, {args.iters} timed batches; random weights")
    print(f"{'model':20s} {'what':8s} {'px':>5s} {'ours img/s':>11s} {'bare img/s':>11s} {'ours/bare':>9s}")
    for name in names:
        with tempfile.TemporaryDirectory(prefix="arra-bench-") as tmp:
            for model, what, size, ours, bare in measure(name, Path(tmp), args, device):
                print(f"{model:20s} {what:8s} {size:5d} {ours:11.3g} {bare:11.3g} {ours / bare:9.2f}", flush=True)
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
