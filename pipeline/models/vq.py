"""VQ image tokenizers with a learned encoder and decoder (LlamaGen VQ-16, Chameleon's VQGAN).

Both scale uint8 pixels to [-1, 1], encode to a latent grid (`encoder` then `quant_conv`), take
the nearest codebook entry at each position, and decode codebook vectors back to pixels
(`post_quant_conv` then `decoder`). A loader builds `self.vq` with those parts under
transformers' names and says whether codes are l2-normalised before the lookup (LlamaGen) or not
(Chameleon). Codes are computed here rather than by transformers' quantizer: `JanusVQVAE`'s skips
the l2 normalisation LlamaGen was trained with, and both would build one B*h*w x codebook
distance matrix at once, where chunks keep memory flat.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.frozen import to_float
from pipeline.models.registry import RegistryError
from pipeline.models.image_tokenizers import Tokenizer, nearest


class VQTokenizer(Tokenizer):
    l2_normalised: bool

    def __init__(self, spec: dict, weights: Path, resolution: int | None = None):
        super().__init__(spec, weights)
        self.resolution = int(resolution or spec["resolution"])

    def attach(self, vq: nn.Module, downsample: int) -> None:
        """Adopt the loaded network; refuse one whose codebook or downsampling differ from the manifest."""
        self.vq = vq.eval()
        self.codebook_size = vq.quantize.embedding.weight.shape[0]
        expected = (int(self.spec["codebook_size"]), int(self.spec["downsample"]))
        if (self.codebook_size, downsample) != expected:
            raise RegistryError(f"{self.name}: the checkpoint has {self.codebook_size} codes and downsamples "
                                f"{downsample}x; the manifest says {expected[0]} codes, {expected[1]}x")
        if self.resolution % downsample:
            raise RegistryError(f"{self.name}: resolution {self.resolution} is not a multiple of the downsampling {downsample}")
        self.grid = (self.resolution // downsample,) * 2

    def codebook(self) -> torch.Tensor:
        weight = self.vq.quantize.embedding.weight.float()
        return F.normalize(weight, dim=1) if self.l2_normalised else weight

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = to_float(images, self.device).mul_(2).sub_(1)
        with self.autocast():
            z = self.vq.quant_conv(self.vq.encoder(x)).float()
        vectors = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        if self.l2_normalised:
            vectors = F.normalize(vectors, dim=1)
        codebook = self.codebook()
        return nearest(vectors, codebook, (codebook * codebook).sum(1)).view(images.shape[0], *z.shape[2:])

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        latents = self.codebook()[codes.to(self.device).long()].permute(0, 3, 1, 2)
        with self.autocast():
            x = self.vq.decoder(self.vq.post_quant_conv(latents.contiguous()))
        return x.float().add(1).mul(127.5).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def without_init():
    """Build transformers modules without running their random init (the checkpoint overwrites it)."""
    from transformers.initialization import no_init_weights
    return no_init_weights()
