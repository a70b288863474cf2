"""VQ tokenizers load from tiny random checkpoints in their published layouts (LlamaGen's .pt,
Meta's vqgan.yaml + vqgan.ckpt) and round-trip codes -> images -> codes."""

from __future__ import annotations

import os
import shutil
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model_checkpoints as mc
from pipeline.models.registry import RegistryError, build
from pipeline.models.weights import Inert, load_torch, load_torch_tensors

RES = 64  # fully convolutional: 64 px -> 4x4 codes keeps CPU tests fast


def images(n, size=RES, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize("name, write, codes", [
    ("llamagen-vq16", lambda p: mc.write_llamagen(p / "vq_ds16_c2i.pt"), 16384),
    ("llamagen-vq16-t2i", lambda p: mc.write_llamagen(p / "vq_ds16_t2i.pt"), 16384),
    ("chameleon", lambda p: mc.write_chameleon(p / "tokenizer"), 8192),
    ("chameleon", lambda p: mc.write_chameleon(p / "tokenizer", attn_resolutions=(32,)), 8192),
])
def test_tokenizer_shapes_ranges_and_determinism(name, write, codes, tmp_path):
    """The tokenizer contract (the round trip's numbers are pinned in test_tokenizer_round_trip.py)."""
    tok = build("tokenizers", name, str(write(tmp_path)), resolution=RES)
    assert (tok.resolution, tok.grid, tok.codebook_size) == (RES, (4, 4), codes)
    x = images(3)
    encoded = tok.encode(x)
    assert encoded.shape == (3, 4, 4) and encoded.dtype == torch.int64
    assert 0 <= encoded.min() and encoded.max() < codes
    assert torch.equal(encoded, tok.encode(x.clone()))  # deterministic
    decoded = tok.decode(encoded)
    assert decoded.shape == (3, RES, RES, 3) and decoded.dtype == torch.uint8
    assert torch.equal(decoded, tok.decode(encoded))
    described = tok.describe()
    assert described["grid"] == [4, 4] and len(described["weights_files"]) == (2 if name == "chameleon" else 1)


def test_llamagen_codes_are_nearest_after_l2_normalisation(tmp_path):
    """LlamaGen looks codes up on the unit sphere (transformers' Janus quantizer does not)."""
    tok = build("tokenizers", "llamagen-vq16", str(mc.write_llamagen(tmp_path / "vq_ds16_c2i.pt")), resolution=RES)
    x = images(2)
    with torch.inference_mode():
        z = tok.vq.quant_conv(tok.vq.encoder(x.permute(0, 3, 1, 2).float() / 127.5 - 1))
        z = F.normalize(z.permute(0, 2, 3, 1), dim=-1)
        expected = (z @ F.normalize(tok.vq.quantize.embedding.weight, dim=1).T).argmax(-1)
    assert torch.equal(tok.encode(x), expected)


def test_chameleon_decoder_matches_transformers_janus_decoder(tmp_path):
    """Taming's decoder (levels indexed from full resolution) equals transformers' JanusVQVAEDecoder
    (indexed from the lowest) when attention sits at the lowest resolution, as in Janus."""
    from transformers import JanusVQVAEConfig
    from transformers.models.janus.modeling_janus import JanusVQVAEDecoder
    tok = build("tokenizers", "chameleon", str(mc.write_chameleon(tmp_path / "t", attn_resolutions=(32,))), resolution=RES)
    config = tok.vq.config
    janus = JanusVQVAEDecoder(JanusVQVAEConfig(base_channels=config.base_channels, latent_channels=config.latent_channels,
                                               channel_multiplier=list(config.channel_multiplier),
                                               num_res_blocks=config.num_res_blocks)).eval()
    levels = len(config.channel_multiplier)
    state = {}
    for key, value in tok.vq.decoder.state_dict().items():
        if key.startswith("up."):
            level, rest = key[3:].split(".", 1)
            key = f"up.{levels - 1 - int(level)}.{rest}"
        state[key] = value
    janus.load_state_dict(state)
    z = torch.randn(2, config.latent_channels, 4, 4)
    with torch.inference_mode():
        torch.testing.assert_close(tok.vq.decoder(z), janus(z))


def test_wrong_tokenizer_checkpoints_are_refused(tmp_path):
    path = mc.write_llamagen(tmp_path / "vq_ds16_c2i.pt")
    checkpoint = load_torch(path)  # allows the args LlamaGen saves beside the weights
    checkpoint["model"].pop("decoder.conv_out.bias")
    checkpoint["model"]["encoder.conv_blocks.0.res.0.norm1.weight"] = torch.ones(7)
    torch.save(checkpoint, path)
    with pytest.raises(RegistryError) as err:
        build("tokenizers", "llamagen-vq16", str(path))
    assert "missing keys ['decoder.conv_out.bias']" in str(err.value)
    assert "encoder.down.0.block.0.norm1.weight: checkpoint (7,) vs model (32,)" in str(err.value)

    vq8 = mc.vqgan_state("llamagen", 32, (1, 2, 2, 4), 1, 32, 16384, 8)
    torch.save({"model": vq8}, tmp_path / "vq_ds8_c2i.pt")
    with pytest.raises(RegistryError, match="downsamples 8x; the manifest says 16384 codes, 16x"):
        build("tokenizers", "llamagen-vq16", str(tmp_path / "vq_ds8_c2i.pt"))

    torch.save({"model": {"weight": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(RegistryError, match="is not a LlamaGen VQ checkpoint"):
        build("tokenizers", "llamagen-vq16", str(tmp_path / "other.pt"))

    folder = mc.write_chameleon(tmp_path / "tokenizer")
    checkpoint = load_torch_tensors(folder / "vqgan.ckpt")
    checkpoint["state_dict"]["decoder.up.9.block.0.conv1.weight"] = torch.zeros(1)
    torch.save(checkpoint, folder / "vqgan.ckpt")
    with pytest.raises(RegistryError, match=r"unexpected keys \['decoder.up.9.block.0.conv1.weight'\]"):
        build("tokenizers", "chameleon", str(folder))


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": Fraction(1, 3)}, tmp_path / "vq_ds16_c2i.pt")
    with pytest.raises(ValueError, match="holds objects other than tensors"):
        build("tokenizers", "llamagen-vq16", str(tmp_path / "vq_ds16_c2i.pt"))


class Call:
    """Unpickling this calls `fn(*args)`: what a hostile or careless checkpoint can do."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_lightning_objects_in_a_chameleon_checkpoint_load_inert(tmp_path):
    """Meta's vqgan.ckpt is a Lightning file: its pickled objects must not run, its weights must
    load, and the entries that are not the VQGAN are left out by name, saying which."""
    folder = mc.write_chameleon(tmp_path / "tokenizer")
    checkpoint = load_torch_tensors(folder / "vqgan.ckpt")
    assert isinstance(checkpoint["callbacks"]["ModelCheckpoint"], Inert)
    keep = tmp_path / "keep"
    keep.mkdir()
    checkpoint["hyper_parameters"] = Call(shutil.rmtree, str(keep))
    torch.save(checkpoint, folder / "vqgan.ckpt")
    with pytest.warns(UserWarning, match=r"2 entries that are not part of the VQGAN were not loaded: "
                                         r"encoder.custom_layer.weight, loss.discriminator.main.0.weight"):
        tok = build("tokenizers", "chameleon", str(folder))
    assert keep.is_dir()
    codebook = next(v for k, v in tok.state_dict().items() if k.endswith("quantize.embedding.weight"))
    assert torch.equal(codebook, checkpoint["state_dict"]["quantize.embedding.weight"])
    # a call into the operating system is refused outright, naming the file
    checkpoint["hyper_parameters"] = Call(os.system, f"touch {tmp_path / 'pwned'}")
    torch.save(checkpoint, folder / "vqgan.ckpt")
    with pytest.raises(ValueError, match=r"vqgan.ckpt: holds objects other than tensors .*posix.system"):
        build("tokenizers", "chameleon", str(folder))
    assert not (tmp_path / "pwned").exists()


def test_kmeans_round_trip_is_the_nearest_codebook_patch(codebook):
    """Each 4x4 patch (pixels row by row, RGB, scaled to [0, 1]) takes the code of the nearest
    codebook row in squared L2; decoding paints that row back as 8-bit pixels; encoding the decoded
    image gives the same codes again."""
    tok = build("tokenizers", "kmeans", codebook)
    centres = tok.codebook.numpy()
    x = images(2, size=16, seed=3)
    codes, expected = np.zeros((2, 4, 4), dtype=np.int64), np.zeros((2, 16, 16, 3), dtype=np.uint8)
    for b in range(2):
        for i in range(4):
            for j in range(4):
                patch = x[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4].numpy().reshape(-1) / 255
                k = int(np.argmin(((centres - patch) ** 2).sum(1)))
                codes[b, i, j] = k
                expected[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4] = np.round(centres[k] * 255).reshape(4, 4, 3)
    encoded = tok.encode(x)
    assert encoded.tolist() == codes.tolist()
    decoded = tok.decode(encoded)
    assert decoded.dtype == torch.uint8 and np.array_equal(decoded.numpy(), expected)
    assert torch.equal(tok.encode(decoded), encoded)
