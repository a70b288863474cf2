"""The ARRA objective for a caption-features LM (pipeline/lm/caption_prefix.py): its own module
because the objective's module imports the train-time reader, which imports the prefix's helpers."""

from __future__ import annotations

from torch import nn

from pipeline.lm.arra import ARRAModel
from pipeline.lm.caption_prefix import CaptionEmbedder


class CaptionARRAModel(ARRAModel):
    """The ARRA objective around an LM whose prefix is `captions` (attached to it); batches carry
    `caption` and `caption_len` beside the token sequences."""

    def __init__(self, lm: nn.Module, captions: CaptionEmbedder, teacher_dim: int | None, objective):
        super().__init__(lm, teacher_dim, objective)
        self.captions = captions

    def forward(self, caption, caption_len, **batch):
        with self.captions.feeding(caption, caption_len):
            return super().forward(**batch)
