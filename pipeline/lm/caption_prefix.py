"""LlamaGen's text-to-image condition for preset LMs: cached caption-encoder features (FLAN-T5-XL's,
written by `extract --caption-encoder`) through an MLP become the first `tokens` (120) input
embeddings of every sequence, in place of condition tokens.

The prefix always has `tokens` positions: a caption's n features take the last n (next to <boi>,
where LlamaGen moves the valid tokens) and the positions before them hold the first tokens - n rows
of the learned unconditional embedding. A dropped caption (--cond-dropout, the guidance branch at
sampling) is the unconditional embedding whole (n = 0). Every row thus has one prefix length:
nothing is masked or padded, in training and in generation alike (LlamaGen masks the unused
positions instead; here they carry the unconditional rows, so a short caption reads as "this
caption, and nothing else").

Sequences hold `tokens` placeholder ids (0, the layout's one condition row) where the prefix goes.
A forward hook on the LM's input embedding replaces the first `tokens` positions' embeddings of any
call that starts at the sequence's start (training, the first step of generation; cached
generation steps are shorter and pass through), so the LM stays a plain transformers model and
the embedder rides beside it (`arra_captions.safetensors` in an export; in training, in
`CaptionARRAModel`, pipeline/lm/caption_arra.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import ArraError

CAPTIONS_FILE = "arra_captions.safetensors"
PLACEHOLDER = 0  # the token id the prefix positions carry


class CaptionEmbedder(nn.Module):
    """Linear(feature_dim -> width), GELU (tanh), Linear(width -> width) and a learned unconditional
    embedding (tokens x feature_dim, init randn / sqrt(feature_dim)), as LlamaGen's CaptionEmbedder."""

    def __init__(self, feature_dim: int, width: int, tokens: int):
        super().__init__()
        self.tokens, self.fed = tokens, None
        self.mlp = nn.Sequential(nn.Linear(feature_dim, width), nn.GELU(approximate="tanh"), nn.Linear(width, width))
        self.uncond = nn.Parameter(torch.randn(tokens, feature_dim) / feature_dim ** 0.5)
        for layer in (self.mlp[0], self.mlp[2]):  # LlamaGen's init of every Linear
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, caption: torch.Tensor, caption_len: torch.Tensor) -> torch.Tensor:
        """caption: B x tokens x feature_dim, each row's features at its end (`right_aligned`);
        caption_len: B token counts (0: unconditional). Returns B x tokens x width."""
        real = torch.arange(self.tokens, device=caption.device) >= (self.tokens - caption_len.to(caption.device))[:, None]
        return self.mlp(torch.where(real[..., None], caption.to(self.uncond.dtype), self.uncond))

    @contextmanager
    def feeding(self, caption: torch.Tensor, caption_len: torch.Tensor):
        """The captions of the rows the LM is called on inside this block."""
        self.fed = (caption, caption_len)
        try:
            yield
        finally:
            self.fed = None

    def attach(self, lm: nn.Module) -> None:
        """Replace the prefix embeddings of `lm`'s calls by this embedder's, from what it is being fed."""
        lm.get_input_embeddings().register_forward_hook(self._replace)

    def _replace(self, _module, _args, out: torch.Tensor) -> torch.Tensor:
        if out.shape[1] < self.tokens:  # a cached generation step: the prefix is in the cache already
            return out
        if self.fed is None:
            raise ArraError("a caption-features LM was called without caption features (CaptionEmbedder.feeding)")
        return torch.cat([self(*self.fed).to(out.dtype), out[:, self.tokens:]], dim=1)


def right_aligned(rows: list[np.ndarray | None], tokens: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row caption features (n x dim, n <= tokens; None: unconditional) -> (B x tokens x dim
    float16 with each row's features at its end, B token counts)."""
    caption = np.zeros((len(rows), tokens, dim), dtype=np.float16)
    lengths = np.zeros(len(rows), dtype=np.int64)
    for i, r in enumerate(rows):
        if r is not None and len(r):
            caption[i, tokens - len(r):], lengths[i] = r, len(r)
    return torch.from_numpy(caption), torch.from_numpy(lengths)


def load_embedder(model_dir: Path, record: dict, width: int) -> CaptionEmbedder:
    """The caption embedder an export carries (`record`: its layout file's "captions")."""
    from safetensors.torch import load_file
    path = Path(model_dir) / record["file"]
    if not path.is_file():
        raise ArraError(f"{model_dir}: a caption-features model needs its caption embedder {record['file']} beside it")
    embedder = CaptionEmbedder(record["dim"], width, record["tokens"])
    try:
        embedder.load_state_dict(load_file(str(path)))
    except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
        raise ArraError(f"{path}: not the caption embedder {model_dir / 'arra_vocab.json'} describes ({exc})") from None
    return embedder.eval()
