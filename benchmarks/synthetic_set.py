"""A synthetic feature set written as `extract` writes it (Arrow-in-tar shards of record batches, a
manifest with what FeatureSet and TrainStream read), for the reader benchmarks."""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.data.featureset import FORMAT, MANIFEST, SHARDS, VERSION, make_batch, make_schema, write_shard  # noqa: E402


def write_synthetic_set(folder: Path, labels: np.ndarray, codes: np.ndarray, feats: np.ndarray, grid: int,
                        codebook: int, classes: int, shard_size: int, member_rows: int) -> list[dict]:
    """Rows i = (labels[i], codes[i], feats[i]) keyed by i, in shards of `shard_size` rows of
    `member_rows`-row record batches, one teacher "synthetic"; returns the shard entries."""
    n, d = len(labels), feats.shape[1]
    (folder / SHARDS).mkdir(parents=True)
    schema = make_schema(grid * grid, codebook, (grid, grid), {"synthetic": d})
    shards = []
    for s, start in enumerate(range(0, n, shard_size)):
        stop = min(start + shard_size, n)
        cuts = [(a, min(a + member_rows, stop)) for a in range(start, stop, member_rows)]
        batches = [make_batch(schema, [f"{i:08d}" for i in range(a, b)], [""] * (b - a), labels[a:b], codes[a:b],
                              {"synthetic": feats[a:b]}) for a, b in cuts]
        shards.append(write_shard(folder / SHARDS / f"shard-{s:06d}.tar", batches))
    manifest = {"format": FORMAT, "version": VERSION, "rows": n, "shards": shards,
                "tokenizer": {"name": "synthetic", "code_len": grid * grid, "codebook_size": codebook, "grid": [grid] * 2},
                "teachers": {"synthetic": {"dim": d}}, "labels": {"classes": classes, "unlabelled": 0}}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return shards
