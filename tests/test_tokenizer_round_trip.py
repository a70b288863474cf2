"""The VQ tokenizers' round trip codes -> images -> codes pinned to numbers (issue 20: the round-trip
test in test_tokenizers compares shapes only). Computed here from the checkpoint's own modules and
codebook, independently of VQTokenizer.encode/decode: decoding looks each code up in the codebook
(l2-normalised for LlamaGen, raw for Chameleon), runs post_quant_conv + decoder and maps [-1, 1] to
8-bit pixels; encoding maps pixels to [-1, 1], runs encoder + quant_conv and takes the nearest
codebook row by brute-force Euclidean distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model_checkpoints as mc
from pipeline.models.registry import build

RES = 64


@pytest.mark.parametrize("name, write, normalised", [
    ("llamagen-vq16", lambda p: mc.write_llamagen(p / "vq_ds16_c2i.pt"), True),
    ("chameleon", lambda p: mc.write_chameleon(p / "tokenizer"), False),
])
def test_codes_to_images_to_codes_against_the_checkpoints_modules(name, write, normalised, tmp_path):
    tok = build("tokenizers", name, str(write(tmp_path)), resolution=RES)
    vq = tok.vq
    book = vq.quantize.embedding.weight.detach().float()
    book = F.normalize(book, dim=1) if normalised else book
    codes = torch.from_numpy(np.random.default_rng(4).integers(0, tok.codebook_size, (2, 4, 4)))
    with torch.inference_mode():
        x = vq.decoder(vq.post_quant_conv(book[codes].permute(0, 3, 1, 2).contiguous())).float()
        pixels = torch.clamp(torch.round((x + 1) * 127.5), 0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        decoded = tok.decode(codes)
        assert decoded.dtype == torch.uint8 and torch.equal(decoded, pixels)

        z = vq.quant_conv(vq.encoder(pixels.permute(0, 3, 1, 2).float() / 255 * 2 - 1)).float()
        v = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        v = F.normalize(v, dim=1) if normalised else v
        distances = torch.cdist(v.double(), book.double())
        expected = distances.argmin(1).view(2, 4, 4)
        again = tok.encode(decoded)
    # no tie decides the nearest row: the best distance is clearly below the second best
    best = distances.topk(2, largest=False).values
    assert (best[:, 1] - best[:, 0] > 1e-6 * best[:, 1]).all()
    assert torch.equal(again, expected)
    assert again.dtype == torch.int64 and 0 <= again.min() and again.max() < tok.codebook_size
