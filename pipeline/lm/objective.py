"""The ARRA objective's settings: CE + lambda * GVA (+ z-loss), which hidden state is aligned, at
which positions and how. Kept apart from the model (pipeline/lm/arra.py) so that the CLI and the
reader can use them without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.options import OptionError, check, option


@dataclass(frozen=True)
class Objective:
    """The ARRA objective's settings, checked on construction. The reader takes `align_positions`
    (which positions carry the alignment), the model the rest."""

    lam: float = option(1.0, "Weight of the GVA loss; 0 = plain AR baseline, no projector.", name="--lambda", min=0)
    align_layer: int = option(1, "hidden_states index aligned: 1 = output of the first block (official).", min=0)
    align_positions: str = option("image", "image: every position that predicts an image code; boi: only the <boi> "
                                  "position; rep-token: a dedicated <rep> token between the condition and <boi> (the "
                                  "paper's <REP>; adds one vocabulary row).", choices=("image", "boi", "rep-token"))
    align_loss: str = option("cosine", "Alignment loss: 1 - cos, or the squared error.", choices=("cosine", "mse"))
    projector_hidden: int | None = option(None, "Projector hidden width (default: the teacher dim, as the official 512->512).", min=1)
    z_loss: float = option(0.0, "z-loss weight (independent of GVA).", min=0)

    def __post_init__(self):
        check(self)

    def check_depth(self, n_layers: int) -> None:
        """--align-layer against the LM's depth (0 = embeddings, k = output of block k)."""
        if self.align_layer > n_layers:
            raise OptionError(f"--align-layer {self.align_layer} is outside 0..{n_layers} (0 = embeddings, k = output of block k)")
