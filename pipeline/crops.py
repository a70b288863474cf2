"""Decoding and cropping in DataLoader workers: record indices in, batches of uint8 crops out.

Each item is decoded once and yields the canonical crop (the tokenizer's view) plus one view per
teacher input size; a record that cannot be used comes back as its reject reason instead.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.images import Rejected, center_crop, resize_square, to_array
from pipeline.sources import Record, load_image


class CropDataset(Dataset):
    """Record index -> (index, (canonical crop, {teacher size: teacher view})) or (index, reason).

    `view="crop"`: teachers see the canonical crop resized to their input size.
    `view="original"`: teachers see the original image through their own resize + centre crop
    (what the official code does).
    """

    def __init__(self, records: list[Record], resolution: int, teacher_sizes: list[int], view: str, max_pixels: int):
        self.records, self.resolution, self.teacher_sizes = records, resolution, teacher_sizes
        self.view, self.max_pixels = view, max_pixels

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i: int):
        record = self.records[i]
        if record.reject:
            return i, record.reject
        try:
            img = load_image(record.ref, self.max_pixels)
            crop = center_crop(img, self.resolution)
            views = {s: to_array(resize_square(crop, s) if self.view == "crop" else center_crop(img, s))
                     for s in self.teacher_sizes}
        except Rejected as exc:
            return i, str(exc)
        except Exception as exc:  # a decoder bug on untrusted input must not kill the job
            return i, f"corrupt: {type(exc).__name__}: {exc}"
        return i, (to_array(crop), views)


def collate(items):
    """-> (ok indices, crops uint8 BxRxRx3 or None, {size: views}, [(index, reason)])."""
    ok = [(i, x) for i, x in items if not isinstance(x, str)]
    rejects = [(i, x) for i, x in items if isinstance(x, str)]
    crops = torch.from_numpy(np.stack([x[0] for _, x in ok])) if ok else None
    views = {s: torch.from_numpy(np.stack([x[1][s] for _, x in ok])) for s in (ok[0][1][1] if ok else {})}
    return [i for i, _ in ok], crops, views, rejects


def _worker_init(_):
    torch.set_num_threads(1)  # workers only decode; leave the cores' BLAS threads to the models


def crop_loader(records: list[Record], batches: list[list[int]], resolution: int, teacher_sizes: list[int],
                view: str, max_pixels: int, workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader that yields `collate` batches for exactly `batches` (lists of record indices), in order."""
    return DataLoader(CropDataset(records, resolution, teacher_sizes, view, max_pixels), batch_sampler=batches,
                      num_workers=workers, collate_fn=collate, worker_init_fn=_worker_init if workers else None,
                      prefetch_factor=4 if workers else None, pin_memory=pin_memory)
