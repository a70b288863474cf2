"""2D RoPE over the image grid (`--rope 2d`), LlamaGen's position encoding, on transformers' Llama.

transformers' Llama rotates each head's queries and keys by the cos and sin that
`model.model.rotary_emb(hidden, position_ids)` returns (pair i is dims i and i + head_dim/2, see
`rotate_half`), so any angle per token and pair is one module away; the weights stay a plain Llama's.
`GridRotary` turns, per token:

- image code k (row r = k // w, column c = k % w): the first half of the pairs by its row, the second
  half by its column, each half with LlamaGen's frequency ladder over head_dim/2
  (`precompute_freqs_cis_2d`), both counted from `start`, the position of code 0;
- every token before the image (condition, <rep>, <boi>): its 1D position on both halves, so a
  caption keeps its order (LlamaGen instead zeroes its condition tokens' queries and keys);
- <eoi> (code N): row h, column 0, where a next row would begin.

Positions stay one number per token, so transformers' masks and KV cache see ordinary positions:
`token_positions` numbers each row so that its first code is at `start` whatever its condition's
length, and the module reads (row, column) off that number. Training and sampling both number rows
with it; for class conditions it is the plain 0, 1, 2, ... numbering.

An export stays a plain Llama checkpoint whose arra_vocab.json says `"rope": "2d"`. `arra-pipe
sample` installs the module when it loads one; any other code that loads it with plain transformers
gets 1D RoPE unless it calls `install(model, layout)` before the first forward, and must pass
`token_positions` as position_ids where rows have captions of different lengths.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import ArraError


def image_start(layout) -> int:
    """The position of code 0 in every row: after the longest condition the layout takes (one class
    token, or max_text_len caption tokens or caption-feature positions) and the image prefix, so no real
    token's is negative."""
    return (1 if layout.condition == "class" else layout.max_text_len) + len(layout.image_prefix)


def token_positions(layout, attention_mask: torch.Tensor, before_image: torch.Tensor) -> torch.Tensor:
    """Position ids (B x T) of rows whose real tokens are contiguous (padding on either side): a token's
    index among its row's real tokens; with 2D RoPE shifted so that each row's first image code, after
    `before_image` (B) real tokens, is at `image_start`. Padding takes a neighbour's (it is masked)."""
    index = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if layout.rope != "2d":
        return index
    return index + (image_start(layout) - before_image.to(index.device))[:, None]


class GridRotary(nn.Module):
    """Llama's rotary module with 2D angles for image codes (see the module docstring). No state:
    nothing joins the model's weights, and no dtype cast of the model can round a frequency."""

    def __init__(self, head_dim: int, base: float, start: int, width: int):
        super().__init__()
        self.head_dim, self.base, self.start, self.width = head_dim, base, start, width

    def angles(self, position_ids: torch.Tensor) -> torch.Tensor:
        """B x T x head_dim/2: the row's angles on the first half of the pairs, the column's on the second."""
        half = self.head_dim // 2
        freqs = 1.0 / self.base ** (torch.arange(0, half, 2, device=position_ids.device, dtype=torch.float32) / half)
        k = position_ids - self.start
        image = k >= 0
        row = torch.where(image, self.start + k.div(self.width, rounding_mode="floor"), position_ids)
        col = torch.where(image, self.start + k % self.width, position_ids)
        return torch.cat([row[..., None].float() * freqs, col[..., None].float() * freqs], dim=-1)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = self.angles(position_ids)
        emb = torch.cat([angles, angles], dim=-1)  # pair i is dims i and i + head_dim/2
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def install(lm: nn.Module, layout) -> nn.Module:
    """Give `lm` (a transformers Llama) 2D RoPE over `layout`'s grid in place, and return it. Other
    architectures, RoPE scalings and layouts with a model's own image tokens are refused: their
    rotary module or their image rows do not have the shape this one replaces."""
    config = lm.config
    rope = getattr(config, "rope_parameters", None) or {}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if config.model_type != "llama" or rope.get("rope_type") != "default" or head_dim % 4:
        raise ArraError(f"--rope 2d replaces the rotary module of a Llama with default RoPE and a head size divisible "
                        f"by 4; this LM is {config.model_type} (rope {rope.get('rope_type')}, head size {head_dim}): "
                        "use --rope 1d")
    if layout.native is not None:
        raise ArraError("--rope 2d lays out appended image codes row by row; a model with its own image tokens keeps "
                        "its own positions: use --rope 1d")
    lm.model.rotary_emb = GridRotary(head_dim, float(rope["rope_theta"]), image_start(layout), layout.grid[1])
    return lm
