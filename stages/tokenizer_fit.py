"""`arra-pipe tokenizer fit`: fit the kmeans patch codebook on a dataset's canonical crops."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data.crops import crop_loader, decode_workers
from pipeline.errors import ArraError
from pipeline.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE
from pipeline.data.sources import SourceOptions, read_source
from pipeline.models.image_tokenizers import fit_kmeans_codebook, save_kmeans_codebook, to_patches


def fit_tokenizer(source: str, out: str, resolution: int = 32, patch: int = 4, codebook_size: int = 1024,
                  source_format: str | None = None, source_options: SourceOptions | None = None,
                  max_images: int = 20000, patches_per_code: int = 256, iterations: int = 25, seed: int = 0,
                  workers: int | None = None, batch_size: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS,
                  max_side: int = DEFAULT_MAX_SIDE, progress: bool = True, log=print) -> dict:
    """Sample up to `max_images` images (seeded), cut every canonical crop into patches, keep at most
    `patches_per_code * codebook_size` of them and run faiss k-means. Returns a summary."""
    if resolution % patch:
        raise ArraError(f"--resolution {resolution} is not a multiple of --patch {patch}")
    source_options = source_options or SourceOptions()
    records = [r for r in read_source(source, source_format, source_options).records if not r.reject]
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(records), size=min(max_images, len(records)), replace=False).tolist())
    batches = [chosen[i:i + batch_size] for i in range(0, len(chosen), batch_size)]
    workers = decode_workers(workers)
    loader = crop_loader(records, batches, resolution, [], "crop", max_pixels, workers, max_side=max_side,
                         max_file_bytes=source_options.max_file_bytes)
    parts, used = [], 0
    for ok, crops, _, _ in tqdm(loader, total=len(batches), unit="batch", desc="read crops", disable=not progress):
        if ok:
            parts.append(to_patches(crops, patch).reshape(-1, patch * patch * 3).numpy())
            used += len(ok)
    patches = np.concatenate(parts)
    keep = min(len(patches), patches_per_code * codebook_size)
    patches = patches[rng.choice(len(patches), size=keep, replace=False)]
    log(f"fitting {codebook_size} codes on {len(patches)} patches of {patch}x{patch} from {used} images "
        f"(decoded by {workers} workers) ...")
    codebook = fit_kmeans_codebook(patches, codebook_size, iterations, seed)
    save_kmeans_codebook(out, codebook, patch, resolution)
    with torch.inference_mode():
        x = torch.from_numpy(patches[:50000])
        c = torch.from_numpy(codebook)
        err = (x - c[torch.cdist(x, c).argmin(1)]).pow(2).mean().item()
    return {"path": out, "images": used, "patches": len(patches), "codebook_size": codebook_size,
            "patch": patch, "resolution": resolution, "mse": err, "psnr_db": float(10 * np.log10(1.0 / max(err, 1e-12)))}
