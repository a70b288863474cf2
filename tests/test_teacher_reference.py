"""DINOv2 and EfficientNet-Lite teachers against their reference implementations on the same tiny
checkpoint, as test_teachers.py does for CLIP, MedSAM and BiomedCLIP.

DINOv2's global feature is the CLS token after the final LayerNorm: `x_norm_clstoken` in Meta's
code, `last_hidden_state[:, 0]` (= `pooler_output`) in transformers' Dinov2Model. EfficientNet-Lite's
is what the package's own `forward` hands its classifier: the average-pooled last feature map.
Inputs are normalised here with the published constants, not with the teacher's buffers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model_checkpoints as mc
from pipeline.models.registry import build

IMAGENET = (torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
HALF = (torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.5))  # EfficientNet-Lite: [0, 255] -> [-1, 1]


def images(n, size, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def pixels(x, constants):
    mean, std = constants
    return (x.permute(0, 3, 1, 2).float() / 255 - mean) / std


@pytest.mark.parametrize("name, hidden, swiglu", [("dinov2-s", 384, False), ("dinov2-b", 768, False),
                                                  ("dinov2-l", 1024, False), ("dinov2-g", 1536, True)])
def test_dinov2_is_the_final_norm_cls_token(name, hidden, swiglu, tmp_path):
    from transformers import Dinov2Model
    path = mc.write_dinov2(tmp_path / "dino", hidden, swiglu=swiglu)
    reference = Dinov2Model.from_pretrained(path).eval()
    with torch.no_grad():  # the final LayerNorm perturbed, so that it shows
        reference.layernorm.weight.normal_(1, 0.5), reference.layernorm.bias.normal_(0, 0.5)
    reference.save_pretrained(path)
    teacher = build("teachers", name, str(path))
    assert teacher.input_size == 224 and teacher.aggregation == "cls"
    x = images(2, 224)
    with torch.inference_mode():
        out = reference(pixel_values=pixels(x, IMAGENET), output_hidden_states=True)
        tokens = out.hidden_states[-1]                                  # the last block's output, before the norm
        normed = F.layer_norm(tokens, (hidden,), reference.layernorm.weight, reference.layernorm.bias,
                              reference.config.layer_norm_eps)
    assert tokens.shape == (2, 1 + 16 * 16, hidden)                     # CLS + 16x16 patches of 14 px
    torch.testing.assert_close(normed[:, 0], out.pooler_output)
    feats = teacher(x)
    torch.testing.assert_close(feats, normed[:, 0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(feats, normed[:, -1], rtol=1e-2, atol=1e-2)   # not the last patch token
    assert not torch.allclose(feats, tokens[:, 0], rtol=1e-2, atol=1e-2)    # not before the norm
    if name == "dinov2-s":
        avg = build("teachers", name, str(path), aggregation="avgpool")
        torch.testing.assert_close(avg(x), normed[:, 1:].mean(1), rtol=1e-4, atol=1e-4)
        both = build("teachers", name, str(path), aggregation="cls+avgpool")
        torch.testing.assert_close(both(x), torch.cat([normed[:, 0], normed[:, 1:].mean(1)], 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["efficientnet-lite1", "efficientnet-lite2"])
def test_efficientnet_lite_is_the_pooled_input_of_its_classifier(variant, tmp_path):
    """The BatchNorms get non-trivial statistics first, so that folding them into the convolutions shows."""
    from efficientnet_lite_pytorch import EfficientNet
    net = EfficientNet.from_name(variant)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if "_bn" in name and t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5 if name.endswith(("weight", "running_var"))
                        else torch.randn(t.shape, generator=gen) * 0.1)
    torch.save(net.state_dict(), tmp_path / "lite.pth")
    teacher = build("teachers", variant, str(tmp_path / "lite.pth"), input_size=64)
    x = images(2, 64)
    pooled = []
    net.eval()._fc.register_forward_pre_hook(lambda module, args: pooled.append(args[0]))
    with torch.inference_mode():
        logits = net(pixels(x, HALF))
    assert pooled[0].shape == (2, 1280)
    feats = teacher(x)
    torch.testing.assert_close(feats, pooled[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(teacher.classify(x), logits, rtol=1e-4, atol=1e-4)
