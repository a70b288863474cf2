"""Decoding and cropping in DataLoader workers: record indices in, batches of uint8 crops out.

Each item is decoded once and yields the canonical crop (the tokenizer's view) plus one view per
teacher input size, and the crop as PNG bytes when it is kept in the set; a record that cannot be
used comes back as its reject reason instead. `kept_crop_loader` reads those kept crops back
(for teachers added later) instead of the source.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.data.images import DEFAULT_MAX_SIDE, Rejected, center_crop, resize_square, to_array
from pipeline.data.sources import DEFAULT_MAX_FILE_BYTES, DUPLICATE, Record, load_image

KEPT = "png"  # views key of the kept canonical crops


class CropDataset(Dataset):
    """Record index -> (index, (canonical crop, {teacher size: teacher view})) or (index, reason);
    with `keep_images` the views also hold the crop as PNG bytes under `KEPT`.

    `view="crop"`: teachers see the canonical crop resized to their input size.
    `view="original"`: teachers see the original image through their own resize + centre crop
    (what the official code does). With `jpeg_draft` a JPEG is reduced on decode to the largest
    size these views need (`decode_rgb`).
    """

    def __init__(self, records: list[Record], resolution: int, teacher_sizes: list[int], view: str, max_pixels: int,
                 keep_images: bool = False, max_side: int = DEFAULT_MAX_SIDE, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                 jpeg_draft: bool = False):
        self.records, self.resolution, self.teacher_sizes = records, resolution, teacher_sizes
        self.draft = (max([resolution, *teacher_sizes]) if view == "original" else resolution) if jpeg_draft else None
        self.view, self.max_pixels, self.keep_images = view, max_pixels, keep_images
        self.max_side, self.max_file_bytes = max_side, max_file_bytes
        self.claims = claims(records)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i: int):
        record = self.records[i]
        reason = self._taken(i) if i in self.claims.get(record.key, ()) else record.reject
        if reason:
            return i, reason
        return i, self._load(record)

    def _taken(self, i: int) -> str | None:
        """Record i's duplicate-key reason when an earlier record with its key loads (and so holds
        it); None when none does: a record rejected on decoding does not take a good one's key."""
        for j in self.claims[self.records[i].key]:
            if j == i:
                return None
            if not isinstance(self._load(self.records[j]), str):
                return f"{DUPLICATE}: {self.records[i].key!r} first seen at {self.records[j].origin}"

    def holder(self, key: str) -> int | None:
        """Which of the records in `claims[key]` is extracted: the first whose image loads."""
        return next((j for j in self.claims[key] if not isinstance(self._load(self.records[j]), str)), None)

    def _load(self, record: Record):
        """(canonical crop, views) of a record, or its reject reason."""
        try:
            img = load_image(record.ref, self.max_pixels, self.max_side, self.max_file_bytes, self.draft)
            crop = center_crop(img, self.resolution, self.max_pixels)
            views = {s: to_array(resize_square(crop, s) if self.view == "crop" else center_crop(img, s, self.max_pixels))
                     for s in self.teacher_sizes}
        except Rejected as exc:
            return str(exc)
        except Exception as exc:  # a decoder bug on untrusted input must not kill the job
            return f"corrupt: {type(exc).__name__}: {exc}"
        if self.keep_images:
            views[KEPT] = png(crop)
        return to_array(crop), views


def claims(records: list[Record]) -> dict[str, list[int]]:
    """Key -> the records that may hold it, in order, for keys that several records have: the
    source marked all but the first a duplicate, and those rejected for another reason claim nothing."""
    by_key: dict[str, list[int]] = {}
    for j, r in enumerate(records):
        if r.reject is None or r.reject.startswith(DUPLICATE):
            by_key.setdefault(r.key, []).append(j)
    return {key: same for key, same in by_key.items() if len(same) > 1}


def png(img: Image.Image) -> bytes:
    """Lossless and fast (compress_level 1): a kept crop decodes back to exactly the crop."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def collate(items):
    """-> (ok indices, crops uint8 BxRxRx3 or None, {size: views, [KEPT: PNG bytes]}, [(index, reason)])."""
    ok = [(i, x) for i, x in items if not isinstance(x, str)]
    rejects = [(i, x) for i, x in items if isinstance(x, str)]
    crops = torch.from_numpy(np.stack([x[0] for _, x in ok])) if ok else None
    views = {s: [x[1][s] for _, x in ok] if s == KEPT else torch.from_numpy(np.stack([x[1][s] for _, x in ok]))
             for s in (ok[0][1][1] if ok else {})}
    return [i for i, _ in ok], crops, views, rejects


def rank_cpus() -> int:
    """CPUs this rank may use: its affinity mask shared among the ranks on this node (torchrun's
    LOCAL_WORLD_SIZE), at least one."""
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def decode_workers(workers: int | None) -> int:
    """`workers`, or by default one per CPU of this rank less the one that runs its models; 0
    (decoding in that process) when a rank has a single CPU."""
    return workers if workers is not None else rank_cpus() - 1


def cpu_split(workers: int | None) -> tuple[int, int]:
    """(decode workers, model threads) of an extraction: the rank's CPUs are split, not oversubscribed.
    A teacher forward at native size costs tens of ms per image on a CPU core, a JPEG decode and crop a
    few, so by default a quarter of the CPUs decode (none below 4: the models' process decodes) and the
    models' intra-op threads get the rest, at least one."""
    cpus = rank_cpus()
    workers = cpus // 4 if workers is None else workers
    return workers, max(1, cpus - workers)


def _worker_init(_):
    torch.set_num_threads(1)  # workers only decode; leave the cores' BLAS threads to the models


def crop_loader(records: list[Record], batches: list[list[int]], resolution: int, teacher_sizes: list[int],
                view: str, max_pixels: int, workers: int, keep_images: bool = False,
                max_side: int = DEFAULT_MAX_SIDE, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                jpeg_draft: bool = False) -> DataLoader:
    """A DataLoader that yields `collate` batches for exactly `batches` (lists of record indices), in order."""
    dataset = CropDataset(records, resolution, teacher_sizes, view, max_pixels, keep_images, max_side, max_file_bytes,
                          jpeg_draft)
    return batch_loader(dataset, batches, workers)


def batch_loader(dataset: CropDataset, batches: list[list[int]], workers: int) -> DataLoader:
    """A DataLoader that yields `collate` batches of `dataset` for exactly `batches`, in order (its
    consumers pin them for a GPU on their `Prefetch` thread)."""
    return DataLoader(dataset, batch_sampler=batches,
                      num_workers=workers, collate_fn=collate, worker_init_fn=_worker_init if workers else None,
                      prefetch_factor=4 if workers else None)


class KeptCropDataset(Dataset):
    """(tar path, member name) of the kept `image` column -> (keys, {teacher size: views uint8 BxSxSx3})."""

    def __init__(self, members: list[tuple[Path, str]], teacher_sizes: list[int]):
        self.members, self.teacher_sizes = members, teacher_sizes

    def __len__(self):
        return len(self.members)

    def __getitem__(self, i: int):
        path, name = self.members[i]
        with tarfile.open(path, "r:") as tf, pa.ipc.open_stream(tf.extractfile(name).read()) as reader:
            batch = reader.read_next_batch()
        crops = [Image.open(io.BytesIO(data)).convert("RGB") for data in batch.column(1).to_pylist()]
        views = {s: torch.from_numpy(np.stack([to_array(resize_square(c, s)) for c in crops])) for s in self.teacher_sizes}
        return batch.column(0).to_pylist(), views


def kept_crop_loader(members: list[tuple[Path, str]], teacher_sizes: list[int], workers: int) -> DataLoader:
    """A DataLoader that yields `KeptCropDataset` items for exactly `members`, in order."""
    return DataLoader(KeptCropDataset(members, teacher_sizes), batch_size=None, num_workers=workers,
                      worker_init_fn=_worker_init if workers else None, prefetch_factor=4 if workers else None)
