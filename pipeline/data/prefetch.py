"""Batches built ahead on a thread while the caller computes on the current one.

Training builds its token sequences here, and extraction decodes its images here when it has no
decoding workers (Pillow's decode and resize release the GIL, so the decode of the next batch
overlaps the models' forward on this one instead of following it).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch


def pinned(batch):
    """`batch` with every tensor in it (also inside dicts, lists and tuples) in pinned memory."""
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: pinned(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(pinned(v) for v in batch)
    return batch


class Prefetch:
    """Builds the next `depth` batches of `batches` on a thread while the caller computes, in the
    same order. For a CUDA `pin` device the tensors are put in pinned memory, so that
    `.to(device, non_blocking=True)` overlaps the copy with compute. An error raised while building a
    batch is raised by `next`, where that batch would have come. Use it as a context manager: leaving
    stops the thread."""

    def __init__(self, batches: Iterator, pin: torch.device, depth: int = 3):
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(batches, pin if pin.type == "cuda" else None),
                                        name="prefetch", daemon=True)
        self._thread.start()

    def _fill(self, batches: Iterator, pin: torch.device | None) -> None:
        try:
            if pin is not None:
                torch.cuda.set_device(pin)  # a new thread starts on GPU 0; pinning would open a context there
            for batch in batches:
                if not self._put((pinned(batch) if pin is not None else batch, None)):
                    return
            self._put((None, StopIteration()))
        except Exception as exc:  # raised by the consumer's next()
            self._put((None, exc))

    def _put(self, item: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        batch, error = self._queue.get()
        if error is not None:
            self._queue.put((None, error))  # a later `next` raises it again instead of waiting forever
            raise error
        return batch

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
