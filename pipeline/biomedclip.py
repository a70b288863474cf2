"""BiomedCLIP in its official open_clip layout: `open_clip_config.json` + `open_clip_pytorch_model.bin`.

The image tower is open_clip's `TimmModel`: a timm ViT named by `vision_cfg.timm_model_name`
(`vit_base_patch16_224`), whose classifier is removed and whose pooled output (`timm_pool` ""
keeps timm's default, the CLS token after the final norm) goes through a bias-free linear
projection to `embed_dim` (512). The network is written here with timm's parameter names, so the
checkpoint's `visual.trunk.*` / `visual.head.proj.weight` tensors load as they are; neither
open_clip nor timm is needed. The text tower (`text.*`, `logit_scale`) is not used.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.registry import RegistryError, register
from pipeline.teachers import ViTTeacher, check_state_dict
from pipeline.weights import load_torch

# timm ViT sizes: width, depth, heads (MLP 4x width, LayerNorm eps 1e-6, qkv bias, exact GELU)
TIMM_VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(width, 3 * width)
        self.attn.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(width, 4 * width)
        self.mlp.fc2 = nn.Linear(4 * width, width)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class TimmViT(nn.Module):
    """timm's VisionTransformer (class token, learned position embedding, pre-norm blocks)."""

    def __init__(self, width: int, depth: int, heads: int, patch: int, image_size: int):
        super().__init__()
        self.patch = patch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """The learned grid, bicubically resized when the input is not the training size (as timm does)."""
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        side = int(grid.shape[1] ** 0.5)
        if (h, w) != (side, side):
            grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        return torch.cat([cls, grid], dim=1)

    def forward(self, x):
        x = self.patch_embed.proj(x)
        h, w = x.shape[-2:]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        x = x + self.position_embedding(h, w)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def timm_vit(name: str, image_size: int) -> TimmViT:
    match = re.fullmatch(r"vit_(\w+?)_patch(\d+)_(\d+)", name)
    if not match or match[1] not in TIMM_VIT_SIZES:
        raise RegistryError(f"timm model {name!r} is not a plain ViT this loader knows "
                            f"(vit_{{{'|'.join(TIMM_VIT_SIZES)}}}_patchP_R)")
    width, depth, heads = TIMM_VIT_SIZES[match[1]]
    return TimmViT(width, depth, heads, int(match[2]), image_size)


@register("teachers", "open-clip-timm")
class BiomedCLIPTeacher(ViTTeacher):
    """`cls` = open_clip's `encode_image` (projected CLS, not normalised), the feature ARRA uses;
    `avgpool` projects the mean of the final-norm patch tokens."""

    def __init__(self, spec: dict, weights: Path, **options):
        super().__init__(spec, weights, **options)
        config = json.loads((weights / "open_clip_config.json").read_text())["model_cfg"]
        vision = config["vision_cfg"]
        if vision.get("timm_pool", "") or vision.get("timm_proj", "linear") != "linear":
            raise RegistryError(f"{self.name}: only timm_pool \"\" with timm_proj \"linear\" is supported, "
                                f"got {vision.get('timm_pool')!r} / {vision.get('timm_proj')!r}")
        self.check_width(config["embed_dim"])
        trunk = timm_vit(vision["timm_model_name"], vision.get("image_size", 224))
        self.visual = nn.Module()
        self.visual.trunk = trunk
        self.visual.head = nn.Module()
        self.visual.head.proj = nn.Linear(trunk.norm.normalized_shape[0], config["embed_dim"], bias=False)
        state = load_torch(weights / "open_clip_pytorch_model.bin")
        state = state.get("state_dict", state)  # open_clip training checkpoints nest it (with DDP's "module.")
        state = {k.removeprefix("module.")[len("visual."):]: v for k, v in state.items()
                 if k.removeprefix("module.").startswith("visual.")}
        check_state_dict(self.name, self.visual, state)
        self.visual.load_state_dict(state)
        self.visual.eval()

    def tokens(self, x):
        h = self.visual.trunk(x)
        return h[:, 0], h[:, 1:]

    def head(self, pooled):
        return self.visual.head.proj(pooled)
