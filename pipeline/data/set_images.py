"""A feature set's images at the canonical crop: read again from its source (which must be unchanged),
or, when the source is gone, decoded from the set's codes, saying which. Eval's reference side and
the report's originals."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data.crops import crop_loader
from pipeline.data.featureset import FeatureSet
from pipeline.data.images import DEFAULT_MAX_SIDE
from pipeline.data.sources import SourceOptions, read_source


def column_array(table, name: str) -> np.ndarray:
    """A fixed-size-list column of a feature-set table as a float32 (rows, width) array."""
    return np.stack(table.column(name).to_numpy(zero_copy_only=False)).astype(np.float32)


def reference_images(fs: FeatureSet, tokenizer_path: str | None, limit: int | None = None,
                     workers: int = 2, table=None, device: str | torch.device = "cpu") -> tuple[np.ndarray, str]:
    """The set's images (the first `limit` rows) at the canonical crop, from its source; else
    decoded from its codes."""
    m = fs.manifest
    table = table if table is not None else fs.table()
    keys = table.column("key").to_pylist()[:limit]
    try:
        src = m["source"]
        options = SourceOptions(**src["options"])
        source = read_source(src["path"], src["format"], options)
        recorded = [k for k in ("fingerprint", "files_fingerprint") if k in src]  # older sets lack the second
        if [src[k] for k in recorded] != [getattr(source, k) for k in recorded]:
            raise ValueError("the source changed since extraction")
        index = {r.key: i for i, r in enumerate(source.records) if not r.reject}
        order = [index[k] for k in keys]
        batches = [order[i:i + 256] for i in range(0, len(order), 256)]
        pre = m["preprocess"]
        loader = crop_loader(source.records, batches, pre["resolution"], [], "crop", pre["max_pixels"], workers,
                             max_side=pre.get("max_side", DEFAULT_MAX_SIDE), max_file_bytes=options.max_file_bytes)
        crops = []
        for _, batch, _, bad in loader:
            if bad:
                raise ValueError(f"source record {bad[0][1]} can no longer be read")
            crops.append(batch.numpy())
        return np.concatenate(crops), "source images"
    except (ValueError, KeyError, OSError) as exc:
        from pipeline.models.image_tokenizers import load_recorded_tokenizer
        tok = load_recorded_tokenizer(m["tokenizer"], tokenizer_path, device)
        codes = column_array(table, "codes")[:limit].astype(np.int64).reshape(-1, *m["tokenizer"]["grid"])
        images = np.concatenate([tok.decode(torch.from_numpy(codes[i:i + 256])).cpu().numpy()
                                 for i in range(0, len(codes), 256)])
        return images, f"tokenizer reconstructions (source unavailable: {exc})"
