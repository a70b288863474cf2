"""What every teacher and tokenizer shares: a manifest spec, checkpoint files and their sha256,
and batched inference on uint8 image batches (bf16 autocast on CUDA)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.models.weights import checkpoint_files, fingerprint


class FrozenModel(nn.Module):
    def __init__(self, spec: dict, weights: Path):
        super().__init__()
        self.spec = spec
        self.name: str = spec["name"]
        self.weights_path = Path(weights)
        files = checkpoint_files(spec, self.weights_path)
        self.weights_sha256, self.weights_files = fingerprint(files)

    @property
    def device(self) -> torch.device:
        return next(self.buffers(), next(self.parameters(), torch.empty(0))).device

    @property
    def precision(self) -> str:
        """What `autocast` runs this model at on its device: the one rule, also recorded with every
        feature set so that codes and features of two precisions never mix in one set."""
        return "bf16-autocast" if self.device.type == "cuda" else "fp32"

    def autocast(self, enabled: bool = True):
        """bf16 autocast on CUDA; on CPU models run in fp32 (exact and deterministic)."""
        if enabled and self.precision == "bf16-autocast":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def describe_weights(self) -> dict:
        """Checkpoint provenance for the manifest: file names, one sha256 over all, and each file's."""
        return {"weights": " + ".join(self.weights_files), "weights_sha256": self.weights_sha256,
                "weights_files": self.weights_files}


def to_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 BxHxWx3 -> float Bx3xHxW in [0, 1] on `device` (channels_last for convnets)."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last)


class HostCopy:
    """Device outputs on their way to host memory, read on another thread (the shard writer).

    On CUDA each tensor is copied with `non_blocking=True` into pinned memory, queued on the
    current stream right behind the forward that made it, and an event marks the end of the
    copies: the models' thread never waits, and `numpy()` waits for the event before anything
    reads the buffers (until then they may hold half-copied data). A plain `.cpu()` would be
    correct but would block the models' thread until the GPU had finished the batch; done on the
    writer's thread instead, it would queue behind the next batch's forward on the same stream.
    On the CPU the tensors are used as they are.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors, self._done, self._device = dict(tensors), None, None
        cuda = [t.device for t in tensors.values() if t.is_cuda]
        if cuda:
            self._device = cuda[0]
            self._tensors = {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                             for k, t in tensors.items()}
            self._done = torch.cuda.Event()
            self._done.record(torch.cuda.current_stream(self._device))

    def numpy(self) -> dict[str, np.ndarray]:
        if self._done is not None:
            # a new thread's CUDA calls go to GPU 0, opening a context there on every rank; aim them at ours
            with torch.cuda.device(self._device):
                self._done.synchronize()
        return {k: t.numpy() for k, t in self._tensors.items()}
