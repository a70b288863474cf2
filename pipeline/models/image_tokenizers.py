"""Image tokenizers: uint8 images in, a grid of integer codes out, and back.

`kmeans` is patch vector quantisation: each `patch`x`patch` RGB patch is replaced by the nearest
of `codebook_size` centroids fitted with faiss k-means on the dataset itself. It is the one
tokenizer that can be built with no download, hence the offline default.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.errors import ArraError
from pipeline.models.frozen import FrozenModel
from pipeline.models.registry import RegistryError, register


def load_recorded_tokenizer(ref: dict, override: str | None = None, device: str | torch.device = "cpu") -> "Tokenizer":
    """The image tokenizer a feature set or an exported model recorded (name, weights path, sha256):
    from `override`, else the recorded path, else wherever the registry finds that name (so a
    model or set moved to another machine still decodes); refused unless its sha256 is the recorded one."""
    from pipeline.models.registry import build
    recorded = ref.get("weights_path")
    path = override or (recorded if recorded and Path(recorded).exists() else None)
    want = ref["weights_sha256"]
    try:
        tok = build("tokenizers", ref["name"], path)
    except (ValueError, OSError) as exc:  # WeightsError, RegistryError
        raise RegistryError(f"the {ref['name']} image tokenizer is not at the recorded {recorded!r}, nor where the registry "
                            f"looks: {exc}\nPass --tokenizer-path (weights with sha256 {want[:12]}...)") from exc
    if tok.weights_sha256 != want:
        raise RegistryError(f"{tok.weights_path}: sha256 {tok.weights_sha256[:12]}... is not the {ref['name']} tokenizer "
                            f"recorded ({want[:12]}...); pass --tokenizer-path")
    return tok.to(device).eval()


class Tokenizer(FrozenModel):
    """The VQ families (LlamaGen, Chameleon) live in `vq`, `llamagen` and `chameleon`."""

    resolution: int
    grid: tuple[int, int]
    codebook_size: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 BxHxWx3 at `resolution` -> int64 codes Bxhxw."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """int codes Bxhxw -> uint8 images BxHxWx3."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "loader": self.spec["loader"], "resolution": self.resolution,
                "grid": list(self.grid), "codebook_size": self.codebook_size, **self.describe_weights()}


KMEANS_FORMAT = "arra-pipe-kmeans-v1"


@register("tokenizers", "kmeans")
class KMeansTokenizer(Tokenizer):
    precision = "fp32"  # a nearest-code search, never autocast, on every device

    def __init__(self, spec: dict, weights: Path, resolution: int | None = None):
        super().__init__(spec, weights)
        from safetensors import safe_open
        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != KMEANS_FORMAT or "codebook" not in f.keys():
                raise RegistryError(f"{weights}: not a kmeans codebook written by `arra-pipe tokenizer fit` "
                                    f"(metadata format {meta.get('format')!r}, tensors {list(f.keys())})")
            codebook = f.get_tensor("codebook").float()
        self.patch = int(meta["patch"])
        self.resolution = int(meta["resolution"])
        if resolution and resolution != self.resolution:
            raise RegistryError(f"{weights}: this codebook was fitted at {self.resolution} px; fit another for {resolution} px")
        side = self.resolution // self.patch
        self.grid = (side, side)
        self.codebook_size = codebook.shape[0]
        if codebook.shape[1] != self.patch * self.patch * 3:
            raise RegistryError(f"{weights}: codebook rows are {codebook.shape[1]}-d, "
                                f"expected {self.patch}x{self.patch}x3 = {self.patch ** 2 * 3}")
        self.register_buffer("codebook", codebook)
        self.register_buffer("codebook_sq", (codebook * codebook).sum(1))

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = to_patches(images.to(self.device), self.patch)
        return nearest(x.reshape(-1, x.shape[-1]), self.codebook, self.codebook_sq).view(images.shape[0], *self.grid)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        b, p, (h, w) = codes.shape[0], self.patch, self.grid
        x = self.codebook[codes.to(self.device).long().view(b, h * w)].view(b, h, w, p, p, 3)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, h * p, w * p, 3)
        return x.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def nearest(vectors: torch.Tensor, codebook: torch.Tensor, codebook_sq: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Index of the nearest codebook row (squared L2) for each row of `vectors`, in chunks so that
    the distance matrix stays small (8192 x 16384 floats at most)."""
    return torch.cat([(codebook_sq - 2 * part @ codebook.T).argmin(1) for part in vectors.split(chunk)])


def to_patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    """uint8 BxHxWx3 -> float patches Bx(h*w)x(patch*patch*3) in [0, 1], row-major."""
    b, hp, wp, _ = images.shape
    h, w = hp // patch, wp // patch
    x = images.float().div_(255).view(b, h, patch, w, patch, 3)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h * w, patch * patch * 3)


def fit_kmeans_codebook(patches: np.ndarray, codebook_size: int, iterations: int = 25, seed: int = 0) -> np.ndarray:
    """faiss k-means on float32 patch vectors -> (codebook_size, dim) centroids."""
    import faiss
    if len(patches) < codebook_size:
        raise ArraError(f"{len(patches)} patches cannot fit a codebook of {codebook_size}; use more images")
    km = faiss.Kmeans(patches.shape[1], codebook_size, niter=iterations, seed=seed,
                      max_points_per_centroid=max(256, len(patches) // codebook_size + 1))
    km.train(np.ascontiguousarray(patches, dtype=np.float32))
    return km.centroids


def save_kmeans_codebook(path: str | Path, codebook: np.ndarray, patch: int, resolution: int) -> None:
    from safetensors.torch import save_file
    save_file({"codebook": torch.from_numpy(np.ascontiguousarray(codebook, dtype=np.float32))}, str(path),
              metadata={"format": KMEANS_FORMAT, "patch": str(patch), "resolution": str(resolution)})
