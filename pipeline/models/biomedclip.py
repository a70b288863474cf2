"""BiomedCLIP in its official open_clip layout: `open_clip_config.json` + `open_clip_pytorch_model.bin`.

The image tower is open_clip's `TimmModel`: a timm ViT named by `vision_cfg.timm_model_name`
(`vit_base_patch16_224`), whose classifier is removed and whose pooled output (`timm_pool` ""
keeps timm's default, the CLS token after the final norm) goes through a bias-free linear
projection to `embed_dim` (512). The network is written here with timm's parameter names, so the
checkpoint's `visual.trunk.*` / `visual.head.proj.weight` tensors load as they are; neither
open_clip nor timm is needed. The text tower (`text.*`: PubMedBERT and a projection) is opened
only for CLIP-Score, with the tokenizer files the release ships beside the weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.registry import RegistryError, register
from pipeline.models.teachers import TextTower, ViTTeacher, check_state_dict, load_tokenizer
from pipeline.models.weights import load_torch

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


def tower_state(weights: Path, prefix: str) -> dict:
    """The tensors under `prefix` (`visual.`, `text.`) in an open_clip checkpoint, prefix removed."""
    state = load_torch(weights / "open_clip_pytorch_model.bin")
    state = state.get("state_dict", state)  # open_clip training checkpoints nest it (with DDP's "module.")
    return {k.removeprefix("module.")[len(prefix):]: v for k, v in state.items()
            if k.removeprefix("module.").startswith(prefix)}


class OpenCLIPHFTextTower(TextTower):
    """open_clip's `HFTextEncoder` as BiomedCLIP configures it: BERT, the CLS token of the last
    hidden state, then an MLP (Linear-GELU-Linear, no biases) or linear projection to `embed_dim`.
    The release has no BERT config, so it is read off the tensor shapes (heads = width / 64, as
    in every BERT-base/large)."""

    POOLERS = ("cls_last_hidden_state_pooler",)
    PROJECTIONS = ("mlp", "linear")

    def __init__(self, spec: dict, folder: Path, config: dict):
        name = spec["name"]
        from transformers import BertConfig, BertModel
        text = config["text_cfg"]
        pooler, proj = text.get("hf_pooler_type"), text.get("hf_proj_type")
        if pooler not in self.POOLERS or proj not in self.PROJECTIONS:
            raise RegistryError(f"{name}: text tower with hf_pooler_type {pooler!r} / hf_proj_type {proj!r} is not "
                                f"supported (pooler {self.POOLERS}, projection {self.PROJECTIONS})")
        super().__init__(load_tokenizer(spec, folder), int(text.get("context_length", 77)))
        state = {k: v for k, v in tower_state(folder, "text.").items()
                 if not re.match(r"transformer\.(embeddings\.position_ids$|pooler\.)", k)}
        try:
            vocab, width = state["transformer.embeddings.word_embeddings.weight"].shape
            layers = 1 + max(int(m[1]) for k in state if (m := re.match(r"transformer\.encoder\.layer\.(\d+)\.", k)))
            bert = BertConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=width // 64,
                              intermediate_size=state["transformer.encoder.layer.0.intermediate.dense.weight"].shape[0],
                              max_position_embeddings=state["transformer.embeddings.position_embeddings.weight"].shape[0],
                              type_vocab_size=state["transformer.embeddings.token_type_embeddings.weight"].shape[0],
                              pad_token_id=self.tokenizer.pad_token_id)
        except (KeyError, ValueError) as exc:
            raise RegistryError(f"{name}: {folder / 'open_clip_pytorch_model.bin'} has no BERT text tower under "
                                f"text.transformer.* ({exc!r})") from exc
        self.transformer = BertModel(bert, add_pooling_layer=False)
        dim = config["embed_dim"]
        self.proj = (nn.Linear(width, dim, bias=False) if proj == "linear" else
                     nn.Sequential(nn.Linear(width, (width + dim) // 2, bias=False), nn.GELU(),
                                   nn.Linear((width + dim) // 2, dim, bias=False)))
        check_state_dict(name, self, state)
        self.load_state_dict(state)

    def embed(self, input_ids, attention_mask):
        return self.proj(self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0])


@register("teachers", "open-clip-timm")
class BiomedCLIPTeacher(ViTTeacher):
    """`cls` = open_clip's `encode_image` (projected CLS, not normalised), the feature ARRA uses;
    `avgpool` projects the mean of the final-norm patch tokens."""

    has_text_tower = True

    def __init__(self, spec: dict, weights: Path, **options):
        super().__init__(spec, weights, **options)
        self.config = config = json.loads((weights / "open_clip_config.json").read_text())["model_cfg"]
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
        state = tower_state(weights, "visual.")
        check_state_dict(self.name, self.visual, state)
        self.visual.load_state_dict(state)
        self.visual.eval()

    def tokens(self, x):
        h = self.visual.trunk(x)
        return h[:, 0], h[:, 1:]

    def head(self, pooled):
        return self.visual.head.proj(pooled)

    def text_tower(self) -> OpenCLIPHFTextTower:
        return OpenCLIPHFTextTower(self.spec, self.weights_path, self.config).to(self.device).eval()
