"""LlamaGen's VQ tokenizers (`vq_ds16_c2i.pt`, `vq_ds16_t2i.pt`, also VQ-8) on transformers' `JanusVQVAE`.

Janus reuses LlamaGen's VQ model, so `JanusVQVAE` is the same network under other module names:
`conv_blocks.i.res` -> `down|up.i.block`, `mid.0|1|2` -> `mid.block_1|attn_1|block_2`. The
checkpoint has no config; the architecture (base channels, channel multipliers, residual blocks,
latent and codebook sizes) is read off its tensor shapes and then checked tensor by tensor.
A checkpoint is `{"model": state_dict, ...}` (or "ema" / "state_dict", as LlamaGen's own loaders
accept); the training-only `quantize.codebook_used` buffer is dropped.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.models.registry import RegistryError, register
from pipeline.models.teachers import check_state_dict
from pipeline.models.vq import VQTokenizer, without_init
from pipeline.models.weights import load_torch

RENAMES = [(r"^encoder\.conv_blocks\.(\d+)\.res\.", r"encoder.down.\1.block."),
           (r"^encoder\.conv_blocks\.", "encoder.down."),
           (r"^decoder\.conv_blocks\.(\d+)\.res\.", r"decoder.up.\1.block."),
           (r"^decoder\.conv_blocks\.", "decoder.up."),
           (r"\.mid\.0\.", ".mid.block_1."), (r"\.mid\.1\.", ".mid.attn_1."), (r"\.mid\.2\.", ".mid.block_2.")]
TRAINING_ONLY = ("quantize.codebook_used",)


def janus_state(state: dict) -> dict:
    """LlamaGen tensor names -> JanusVQVAE names."""
    out = {}
    for key, value in state.items():
        if key not in TRAINING_ONLY:
            for pattern, repl in RENAMES:
                key = re.sub(pattern, repl, key)
            out[key] = value
    return out


def janus_config(state: dict, grid: int):
    """The JanusVQVAEConfig that fits a LlamaGen state dict, from its tensor shapes."""
    from transformers import JanusVQVAEConfig
    levels = {int(m[1]) for k in state if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k))}
    blocks = {int(m[1]) for k in state if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", k))}
    base = state["encoder.conv_in.weight"].shape[0]
    codes, dim = state["quantize.embedding.weight"].shape
    return JanusVQVAEConfig(
        embed_dim=dim, num_embeddings=codes, base_channels=base, num_res_blocks=len(blocks),
        channel_multiplier=[state[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // base for i in range(len(levels))],
        latent_channels=state["encoder.conv_out.weight"].shape[0], num_patches=grid)


@register("tokenizers", "llamagen-vq")
class LlamaGenVQ(VQTokenizer):
    l2_normalised = True

    def __init__(self, spec: dict, weights: Path, resolution: int | None = None):
        super().__init__(spec, weights, resolution)
        from transformers import JanusVQVAE
        checkpoint = load_torch(weights)
        state = next((checkpoint[k] for k in ("ema", "model", "state_dict") if k in checkpoint), checkpoint)
        try:
            config = janus_config(state, self.resolution // int(spec["downsample"]))
        except (KeyError, AttributeError, ValueError) as exc:
            raise RegistryError(f"{self.name}: {weights} is not a LlamaGen VQ checkpoint "
                                f"(no usable tensor {exc}); its keys start {sorted(state)[:6]}") from None
        with without_init():
            vq = JanusVQVAE(config)
        state = janus_state(state)
        check_state_dict(self.name, vq, state)
        vq.load_state_dict(state)
        self.attach(vq, 2 ** (len(config.channel_multiplier) - 1))
