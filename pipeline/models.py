"""What every teacher and tokenizer shares: a manifest spec, checkpoint files and their sha256,
and batched inference on uint8 image batches (bf16 autocast on CUDA)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from pipeline.weights import checkpoint_files, fingerprint


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

    def autocast(self, enabled: bool = True):
        """bf16 autocast on CUDA; on CPU models run in fp32 (exact and deterministic)."""
        if enabled and self.device.type == "cuda":
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
