"""Chameleon's image tokenizer in Meta's release layout: `vqgan.yaml` + `vqgan.ckpt`
(a taming-transformers VQGAN: 8192 codes, 512 px -> 32x32).

transformers' `ChameleonVQVAE` has the encoder, quantizer and both 1x1 convs under the
checkpoint's own names, but no decoder (transformers does not generate Chameleon images). The
decoder is taming's, assembled here from the same transformers blocks with the checkpoint's
names (`decoder.up.<level>.block.<i>`, levels indexed from full resolution), so images can be
made from codes. `vqgan.yaml`'s `model.params` gives the architecture; the checkpoint is a
Lightning file (its training objects are read as inert placeholders, never run) whose
`state_dict` also holds entries that are not the VQGAN (`loss.*`, `*custom_layer*`), left out.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from pipeline.models.registry import RegistryError, register
from pipeline.models.teachers import check_state_dict
from pipeline.models.vq import VQTokenizer, without_init
from pipeline.models.weights import load_torch_tensors


class TamingDecoder(nn.Module):
    """taming-transformers' `Decoder` (no timestep embedding, no tanh)."""

    def __init__(self, config, out_channels: int):
        super().__init__()
        from transformers.models.chameleon.modeling_chameleon import (
            ChameleonVQVAEEncoderAttnBlock as Attention, ChameleonVQVAEEncoderResnetBlock as ResBlock)
        from transformers.models.janus.modeling_janus import JanusVQVAEConvUpsample as Upsample
        mult, base = config.channel_multiplier, config.base_channels
        attention_at = set(config.attn_resolutions or ())
        size = config.resolution // 2 ** (len(mult) - 1)
        channels = base * mult[-1]
        self.conv_in = nn.Conv2d(config.latent_channels, channels, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResBlock(config, channels, channels)
        self.mid.attn_1 = Attention(channels)
        self.mid.block_2 = ResBlock(config, channels, channels)
        ups = []
        for level in reversed(range(len(mult))):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                up.block.append(ResBlock(config, channels, base * mult[level]))
                channels = base * mult[level]
                if size in attention_at:
                    up.attn.append(Attention(channels))
            if level:
                up.upsample = Upsample(channels)
                size *= 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = nn.GroupNorm(32, channels, eps=1e-6)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[i](h)
            if level:
                h = up.upsample(h)
        h = self.norm_out(h)
        return self.conv_out(h * torch.sigmoid(h))


def chameleon_config(yaml_path: Path):
    """ChameleonVQVAEConfig from taming's `vqgan.yaml` (the renaming transformers' conversion script does)."""
    import yaml
    from transformers import ChameleonVQVAEConfig
    params = yaml.safe_load(yaml_path.read_text())["model"]["params"]
    dd = params["ddconfig"]
    if dd.get("double_z"):
        raise RegistryError(f"{yaml_path}: double_z is a KL autoencoder setting, not a VQGAN's")
    config = ChameleonVQVAEConfig(
        embed_dim=params["embed_dim"], num_embeddings=params["n_embed"], latent_channels=dd["z_channels"],
        resolution=dd["resolution"], in_channels=dd["in_channels"], base_channels=dd["ch"],
        channel_multiplier=list(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
        attn_resolutions=list(dd.get("attn_resolutions") or []), dropout=dd.get("dropout", 0.0))
    return config, dd["out_ch"]


@register("tokenizers", "taming-vqgan")
class ChameleonVQGAN(VQTokenizer):
    l2_normalised = False

    def __init__(self, spec: dict, weights: Path, resolution: int | None = None):
        super().__init__(spec, weights, resolution)
        from transformers import ChameleonVQVAE
        config, out_channels = chameleon_config(weights / "vqgan.yaml")
        with without_init():
            vq = ChameleonVQVAE(config)
            vq.decoder = TamingDecoder(config, out_channels)
        checkpoint = load_torch_tensors(weights / "vqgan.ckpt")
        state = checkpoint.get("state_dict", checkpoint)
        # Meta's file also holds entries that are not the VQGAN (`loss.*`, `*custom_layer*`): those are
        # left out, saying so; anything else that differs from the architecture is still refused
        parts = {k.split(".")[0] for k in vq.state_dict()}
        dropped = sorted(k for k in state if k.split(".")[0] not in parts or "custom_layer" in k)
        if dropped:
            warnings.warn(f"{weights / 'vqgan.ckpt'}: {len(dropped)} entries that are not part of the VQGAN "
                          f"were not loaded: {', '.join(dropped[:6])}{' …' if len(dropped) > 6 else ''}", stacklevel=2)
        state = {k: v for k, v in state.items() if k not in dropped}
        check_state_dict(self.name, vq, state)
        vq.load_state_dict(state)
        self.attach(vq, 2 ** (len(config.channel_multiplier) - 1))
