"""How image codes are drawn: classifier-free guidance scale, temperature, top-k and top-p.
Kept apart from the generation loop (pipeline/lm/generate.py) so the CLI reads them without torch."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.options import check, option


@dataclass(frozen=True)
class Sampling:
    cfg: float = option(2.0, "Classifier-free guidance scale (1 = off).", min=0)
    temperature: float = option(1.0, "0 = greedy.", min=0)
    top_k: int = option(0, "Keep the k most likely image codes (0 = all).", min=0)
    top_p: float = option(1.0, "Nucleus sampling threshold.", min=0, min_open=True, max=1)

    def __post_init__(self):
        check(self)
