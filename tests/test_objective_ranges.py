"""The objective's settings (pipeline/lm/objective.py): defaults and the exact edges of their ranges.
The loss relies on them (e.g. `lam > 0` decides the projector, a negative --lambda or --z-loss would
reward a worse fit), so each edge is pinned: the last allowed value passes, the next one is refused
naming the flag."""

from __future__ import annotations

import pytest

from pipeline.lm.objective import Objective
from pipeline.options import OptionError


def test_defaults_are_the_official_settings():
    o = Objective()
    assert (o.lam, o.align_layer, o.align_positions, o.align_loss, o.projector_hidden, o.z_loss) == \
        (1.0, 1, "image", "cosine", None, 0.0)


@pytest.mark.parametrize("field, allowed, refused, message", [
    ("lam", 0.0, -0.5, "--lambda must be >= 0, not -0.5"),
    ("lam", 0.0, -1e-9, "--lambda must be >= 0"),
    ("z_loss", 0.0, -0.5, "--z-loss must be >= 0, not -0.5"),
    ("align_layer", 0, -1, "--align-layer must be >= 0, not -1"),
    ("projector_hidden", 1, 0, "--projector-hidden must be >= 1, not 0"),
    ("align_positions", "boi", "text", "--align-positions must be one of image, boi, rep-token, not 'text'"),
    ("align_loss", "mse", "l1", "--align-loss must be one of cosine, mse, not 'l1'"),
])
def test_each_setting_is_refused_just_past_its_range(field, allowed, refused, message):
    assert getattr(Objective(**{field: allowed}), field) == allowed
    with pytest.raises(OptionError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        Objective(**{field: refused})


def test_align_layer_reaches_the_last_block_and_no_further():
    Objective(align_layer=2).check_depth(2)            # the output of the last of 2 blocks
    Objective(align_layer=0).check_depth(2)            # the embeddings
    with pytest.raises(OptionError, match=r"^--align-layer 3 is outside 0\.\.2 \(0 = embeddings"):
        Objective(align_layer=3).check_depth(2)
